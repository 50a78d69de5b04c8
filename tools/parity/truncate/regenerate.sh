#!/usr/bin/env bash
# Regenerate tests/data/parity/truncate/reference.json from a local checkout of
# zhangbaijin/From-Redundancy-to-Relevance (nothing is fetched but pip packages for the side venv).
# Usage: tools/parity/truncate/regenerate.sh R2R_CHECKOUT [VLMSCOPE_PYTHON]
set -euo pipefail
REF=$(cd "$1" && pwd)
PY=${2:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${TRUNCATE_VENV:-${TMPDIR:-/tmp}/venv-truncate}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own commit (not that of a repository it may sit inside); R2R_COMMIT for a checkout without .git.
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${R2R_COMMIT:?"$REF is not a git checkout: set R2R_COMMIT"}
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # modeling_llama_truncation.py is written against the transformers 4.31 Llama API; torch as vlmscope's (CPU).
  "$VENV/bin/pip" install -q torch==2.13.0 transformers==4.31.0 safetensors numpy
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" tools/parity/common/export.py "$WORK" --model truncation
"$VENV/bin/python" tools/parity/truncate/run_reference.py "$REF" "$WORK" "$WORK/reference_output.json"
"$PY" tools/parity/common/write_fixture.py truncate "$WORK" "$WORK/reference_output.json" \
  --repo zhangbaijin/From-Redundancy-to-Relevance \
  --commit "$COMMIT"
