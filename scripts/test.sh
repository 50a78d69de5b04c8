#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The tests run tiny matrices: one BLAS thread avoids spin-waiting on a shared CI machine (about 5x faster
# there); a caller can still override it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Exact CHAIR needs NLTK's tagger and WordNet: install them from ../shared/data/nltk (kept beside the
# repository in CI) into the git-ignored .nltk_data once. Under CI=true the CHAIR tests fail without them.
if [ -d ../shared/data/nltk ] && [ ! -f .nltk_data/corpora/wordnet/index.noun ]; then
    .venv/bin/vlmscope chair setup --from ../shared/data/nltk --dest .nltk_data >&2
fi
if [ -d .nltk_data ]; then
    export NLTK_DATA="$PWD/.nltk_data${NLTK_DATA:+:$NLTK_DATA}"
fi
.venv/bin/python -m ruff check .
# The suite's wall time is printed (pass or fail) so CI logs show it creeping up: keep it under 15 minutes.
start=$SECONDS
status=0
.venv/bin/python -m pytest -q --durations=10 "$@" || status=$?
echo "pytest wall time: $((SECONDS - start)) s"
# The whole suite (no pytest arguments) ends with the compatibility subset on the newest transformers 5.x and
# the lmms-eval plug-in test, each in its own environment.
if [ "$#" -eq 0 ]; then
    bash scripts/compat.sh || status=1
    bash scripts/lmms_eval.sh || status=1
fi
exit "$status"
