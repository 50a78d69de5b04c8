#!/usr/bin/env bash
# Regenerate tests/data/parity/fastv/reference.json from a local checkout of pkunlp-icler/FastV.
# Usage: tools/parity/fastv/regenerate.sh CHECKOUT [VLMSCOPE_PYTHON]
# Its transformers fork (src/FastV/llava-hf/transformers, 4.39.0.dev0) is installed from the checkout.
METHOD=fastv REPO=pkunlp-icler/FastV
PIP="safetensors numpy pillow" PASS_CHECKOUT=0
install_extra() { "$VENV/bin/pip" install -q "$REF/src/FastV/llava-hf/transformers"; }
source "$(dirname "$0")/../common/regenerate.sh"
