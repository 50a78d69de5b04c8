#!/usr/bin/env bash
# Regenerate tests/data/parity/vcd/reference.json from a local checkout of DAMO-NLP-SG/VCD (nothing is fetched
# but pip packages for the side venv).
# Usage: tools/parity/vcd/regenerate.sh VCD_CHECKOUT [VLMSCOPE_PYTHON]
set -euo pipefail
REF=$(cd "$1" && pwd)
PY=${2:-.venv/bin/python}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
VENV=${VCD_VENV:-${TMPDIR:-/tmp}/venv-vcd}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own commit (not that of a repository it may sit inside); VCD_COMMIT for a checkout without .git.
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${VCD_COMMIT:?"$REF is not a git checkout: set VCD_COMMIT"}
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # The reference pins transformers 4.31.0 (requirements.txt); torch as vlmscope's (CPU); einops and pillow are
  # imported by its vendored LLaVA.
  "$VENV/bin/pip" install -q torch==2.13.0 transformers==4.31.0 safetensors numpy einops pillow
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
"$PY" tools/parity/common/export.py "$WORK"
"$VENV/bin/python" tools/parity/vcd/run_reference.py "$REF" "$WORK" "$WORK/reference_output.json"
"$PY" tools/parity/common/write_fixture.py vcd "$WORK" "$WORK/reference_output.json" \
  --repo DAMO-NLP-SG/VCD --commit "$COMMIT"
