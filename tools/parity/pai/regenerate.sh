#!/usr/bin/env bash
# Regenerate tests/data/parity/pai/reference.json from a local checkout of LALBJ/PAI.
# Usage: tools/parity/pai/regenerate.sh CHECKOUT [VLMSCOPE_PYTHON]
# The reference pins transformers 4.37.0 (environment.yml).
METHOD=pai REPO=LALBJ/PAI
PIP="transformers==4.37.0 safetensors numpy"
source "$(dirname "$0")/../common/regenerate.sh"
