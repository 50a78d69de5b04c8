# Shared steps of tools/parity/<method>/regenerate.sh (sourced, not run). The caller sets METHOD, REPO (owner/name
# of the reference) and PIP (the side venv's packages besides torch), and may set EXPORT_ARGS (for export.py),
# PASS_CHECKOUT=0 (its run_reference.py takes no checkout argument), COMMIT_VAR, and define install_extra (run once
# after the venv's packages are installed). Arguments: REFERENCE_CHECKOUT [VLMSCOPE_PYTHON]. Nothing is fetched
# but pip packages for the side venv.
set -euo pipefail
REF=$(cd "$1" && pwd)
PY=${2:-.venv/bin/python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
upper=$(echo "$METHOD" | tr '[:lower:]' '[:upper:]')
venv_var="${upper}_VENV"
VENV=${!venv_var:-${TMPDIR:-/tmp}/venv-$METHOD}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# The checkout's own commit (not that of a repository it may sit inside); <COMMIT_VAR> for a checkout without .git.
commit_var=${COMMIT_VAR:-${upper}_COMMIT}
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${!commit_var:-}
  [ -n "$COMMIT" ] || { echo "error: $REF is not a git checkout: set $commit_var" >&2; exit 2; }
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # torch as vlmscope's (the CPU build).
  # shellcheck disable=SC2086
  "$VENV/bin/pip" install -q torch==2.13.0 $PIP
  if declare -F install_extra >/dev/null; then install_extra; fi
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
# shellcheck disable=SC2086
"$PY" tools/parity/common/export.py "$WORK" ${EXPORT_ARGS:-}
if [ "${PASS_CHECKOUT:-1}" = 1 ]; then
  "$VENV/bin/python" "tools/parity/$METHOD/run_reference.py" "$REF" "$WORK" "$WORK/reference_output.json"
else
  "$VENV/bin/python" "tools/parity/$METHOD/run_reference.py" "$WORK" "$WORK/reference_output.json"
fi
"$PY" tools/parity/common/write_fixture.py "$METHOD" "$WORK" "$WORK/reference_output.json" \
  --repo "$REPO" --commit "$COMMIT"
