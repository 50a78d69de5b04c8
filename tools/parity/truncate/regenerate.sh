#!/usr/bin/env bash
# Regenerate tests/data/parity/truncate/reference.json from a local checkout of zhangbaijin/From-Redundancy-to-Relevance.
# Usage: tools/parity/truncate/regenerate.sh CHECKOUT [VLMSCOPE_PYTHON]
# modeling_llama_truncation.py is written against the transformers 4.31 Llama API.
METHOD=truncate REPO=zhangbaijin/From-Redundancy-to-Relevance
PIP="transformers==4.31.0 safetensors numpy" EXPORT_ARGS="--model truncation" COMMIT_VAR=R2R_COMMIT
source "$(dirname "$0")/../common/regenerate.sh"
