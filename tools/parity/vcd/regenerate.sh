#!/usr/bin/env bash
# Regenerate tests/data/parity/vcd/reference.json from a local checkout of DAMO-NLP-SG/VCD.
# Usage: tools/parity/vcd/regenerate.sh CHECKOUT [VLMSCOPE_PYTHON]
# The reference pins transformers 4.31.0 (requirements.txt); einops and pillow are imported by its vendored LLaVA.
METHOD=vcd REPO=DAMO-NLP-SG/VCD
PIP="transformers==4.31.0 safetensors numpy einops pillow"
source "$(dirname "$0")/../common/regenerate.sh"
