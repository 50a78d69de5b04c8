#!/usr/bin/env bash
# Regenerate tests/data/parity/aai/reference.json from a local checkout of Maccusl/AAI.
# Usage: tools/parity/aai/regenerate.sh CHECKOUT [VLMSCOPE_PYTHON]
# The reference pins transformers 4.37.0 (environment.yml), as PAI.
METHOD=aai REPO=Maccusl/AAI
PIP="transformers==4.37.0 safetensors numpy"
source "$(dirname "$0")/../common/regenerate.sh"
