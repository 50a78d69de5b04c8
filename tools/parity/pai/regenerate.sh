#!/usr/bin/env bash
# Regenerate tests/data/parity/pai/reference.json from a local checkout of LALBJ/PAI (nothing is fetched but pip
# packages for the side venv).
# Usage: tools/parity/pai/regenerate.sh PAI_CHECKOUT [VLMSCOPE_PYTHON]
set -euo pipefail
REF=$(cd "$1" && pwd)
PY=${2:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${PAI_VENV:-${TMPDIR:-/tmp}/venv-pai}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own commit (not that of a repository it may sit inside); PAI_COMMIT for a checkout without .git.
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${PAI_COMMIT:?"$REF is not a git checkout: set PAI_COMMIT"}
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # The reference pins transformers 4.37.0 (environment.yml); torch as vlmscope's (CPU).
  "$VENV/bin/pip" install -q torch==2.13.0 transformers==4.37.0 safetensors numpy
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" tools/parity/common/export.py "$WORK"
"$VENV/bin/python" tools/parity/pai/run_reference.py "$REF" "$WORK" "$WORK/reference_output.json"
"$PY" tools/parity/common/write_fixture.py pai "$WORK" "$WORK/reference_output.json" \
  --repo LALBJ/PAI --commit "$COMMIT"
