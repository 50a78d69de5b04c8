#!/usr/bin/env bash
# Regenerate tests/data/parity/amber/reference.json: the reference inference.py of junyangwang0410/AMBER,
# unmodified, in its own venv (nltk 3.8.1) on the crafted responses of make_inputs.py.
# Usage: tools/parity/amber/regenerate.sh AMBER_CHECKOUT NLTK_PACKAGES_DIR [VLMSCOPE_PYTHON]
#   NLTK_PACKAGES_DIR: NLTK's averaged_perceptron_tagger and WordNet packages (what `vlmscope chair setup --from`
#   takes). The English Punkt model is not needed: as for the CHAIR reference figures, an untrained
#   PunktSentenceTokenizer() is pickled in its place (vlmscope's nltk backend does the same without Punkt).
# Environment shims, not changes to the reference: tools/parity/amber/spacy_stub on PYTHONPATH replaces spaCy
# (en_core_web_lg is not installable offline); its similarities come from $AMBER_SIMILARITY_TABLE (none: 0.0).
set -euo pipefail
REF=$(cd "$1" && pwd)
NLTK_SRC=$(cd "$2" && pwd)
PY=${3:-.venv/bin/python}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
VENV=${AMBER_VENV:-${TMPDIR:-/tmp}/venv-amber}
OUT="$ROOT/tests/data/parity/amber"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ "$(git -C "$REF" rev-parse --show-toplevel 2>/dev/null)" = "$REF" ]; then
  COMMIT=$(git -C "$REF" rev-parse HEAD)
else
  COMMIT=${AMBER_COMMIT:?"$REF is not a git checkout: set AMBER_COMMIT"}
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nltk==3.8.1 tqdm
fi
cd "$ROOT"
export PYTHONPATH="$ROOT/src" OMP_NUM_THREADS=1
"$PY" tools/parity/amber/make_inputs.py "$OUT"
"$PY" -m vlmscope chair setup --from "$NLTK_SRC" --dest "$WORK/nltk_data" >&2
mkdir -p "$WORK/nltk_data/tokenizers/punkt/PY3"  # nltk 3.8.1 loads punkt/PY3/english.pickle
"$VENV/bin/python" -c "import pickle, sys; from nltk.tokenize import PunktSentenceTokenizer as P; pickle.dump(P(), open(sys.argv[1], 'wb'))" \
  "$WORK/nltk_data/tokenizers/punkt/PY3/english.pickle"
run() {  # NAME RESPONSES [TABLE]
  (cd "$REF" && env -u PYTHONPATH NLTK_DATA="$WORK/nltk_data" PYTHONPATH="$ROOT/tools/parity/amber/spacy_stub" \
     AMBER_SIMILARITY_TABLE="${3:-}" "$VENV/bin/python" inference.py --inference_data "$2" --evaluation_type a \
     2>"$WORK/$1.err") > "$WORK/$1.txt" || { cat "$WORK/$1.err" >&2; exit 1; }
}
run zero "$OUT/responses.json"
run table "$OUT/responses.json" "$OUT/similarity_table.json"
run lenient "$OUT/responses_lenient.json"
NLTK_VERSION=$("$VENV/bin/python" -c "import nltk; print(nltk.__version__)")
"$PY" tools/parity/amber/write_fixture.py "$WORK" "$OUT/reference.json" --commit "$COMMIT" --nltk "$NLTK_VERSION"
