#!/usr/bin/env bash
# Side venv for the OPERA reference: torch 2.13 (CPU) and the reference's OWN vendored transformers 4.29.2
# (its generation/utils.py carries `opera_beam_search`). Nothing here touches the project's .venv.
#   bash tools/parity/opera/make_venv.sh /path/to/OPERA /path/to/venv-opera
set -euo pipefail
reference=${1:?usage: make_venv.sh REFERENCE_CHECKOUT VENV}
venv=${2:?usage: make_venv.sh REFERENCE_CHECKOUT VENV}
test -f "$reference/transformers-4.29.2/setup.py" || { echo "no transformers-4.29.2/ in $reference" >&2; exit 2; }
python3 -m venv "$venv"
"$venv/bin/pip" install "torch==2.13.0" numpy safetensors
# huggingface-hub < 0.26: the last releases that transformers 4.29 imports cleanly (tokenizers resolves to 0.13.3).
"$venv/bin/pip" install "$reference/transformers-4.29.2" "huggingface-hub<0.26"
"$venv/bin/python" -c "import transformers; assert transformers.__version__ == '4.29.2'; print('ok', transformers.__file__)"
