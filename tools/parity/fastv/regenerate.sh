#!/usr/bin/env bash
# Regenerate tests/data/parity/fastv/reference.json from a local checkout of pkunlp-icler/FastV: its transformers
# fork (src/FastV/llava-hf/transformers, 4.39.0.dev0) is installed from the checkout into the side venv.
# Usage: tools/parity/fastv/regenerate.sh FASTV_CHECKOUT [VLMSCOPE_PYTHON]
set -euo pipefail
REF=$(cd "$1" && pwd)
PY=${2:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${FASTV_VENV:-${TMPDIR:-/tmp}/venv-fastv}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own commit (not that of a repository it may sit inside); FASTV_COMMIT for a checkout without .git.
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${FASTV_COMMIT:?"$REF is not a git checkout: set FASTV_COMMIT"}
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0 safetensors numpy pillow
  "$VENV/bin/pip" install -q "$REF/src/FastV/llava-hf/transformers"
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" tools/parity/common/export.py "$WORK"
"$VENV/bin/python" tools/parity/fastv/run_reference.py "$WORK" "$WORK/reference_output.json"
"$PY" tools/parity/common/write_fixture.py fastv "$WORK" "$WORK/reference_output.json" \
  --repo pkunlp-icler/FastV --commit "$COMMIT"
