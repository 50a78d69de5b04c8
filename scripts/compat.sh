#!/usr/bin/env bash
# Compatibility subset against the newest transformers 5.x release, in a second environment.
#
# Builds .compat-venv (git-ignored, reused between runs) with torch + torchvision (so every family's stock
# processor, video part included, can be built), the package's own dependencies (num2words among them, for
# SmolVLM's stock processor) and the newest transformers <6 the package index offers, then runs
# tests/test_compat_newest.py there (every tiny family: stock AutoProcessor against vlmscope's processor,
# load, generate, PAI, explain, and the CLI end to end).
# Without the package index: under CI=true it fails with one line; elsewhere it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.compat-venv
# torchvision only imports beside the torch it was built for, so the two are pinned together. These are
# newer than the main suite's torch (constraints.txt), whose release has no working torchvision on the index.
torch_pins=(torch==2.14.1 torchvision==0.29.1)

job=compat need="the newest-transformers job" skip="the newest-transformers subset"
source scripts/side_venv.sh

start=$SECONDS
# The marker holds the pins the venv was built with: changing them rebuilds it.
if [ "$(cat "$venv/.built" 2>/dev/null)" != "${torch_pins[*]}" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # The package's own dependencies (read from pyproject.toml); the package itself runs from src/ through
    # PYTHONPATH, so nothing is written into the worktree.
    read_package_deps
    timeout 900 "$venv/bin/python" -m pip install "${pip_opts[@]}" "${torch_pins[@]}" "${deps[@]}" pytest \
        >"$log" 2>&1 || no_index "the package's dependencies"
    echo "${torch_pins[*]}" >"$venv/.built"
    echo "compat: built $venv in $((SECONDS - start)) s"
fi
# Every run asks the index for the newest 5.x release: `pip install -U` would quietly keep a cached older one
# when the index is unreachable, so the version is looked up first and then pinned.
newest=$(timeout 120 "$venv/bin/python" -m pip index versions transformers "${net_opts[@]}" 2>"$log" \
    | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep -E '^5\.[0-9]+(\.[0-9]+)?$' | head -n 1) \
    || true
[ -n "$newest" ] || no_index "the list of transformers releases"
timeout 300 "$venv/bin/python" -m pip install "${pip_opts[@]}" "transformers==$newest" "${torch_pins[@]}" \
    >"$log" 2>&1 || no_index "transformers==$newest"

versions=$("$venv/bin/python" -c 'import torch, torchvision, transformers; print(f"transformers {transformers.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")')
echo "compat: $versions"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Tells the subset it runs here: torchvision must be present and the per-family CLI runs are on.
export VLMSCOPE_COMPAT_JOB=1
# The CUDA build of torch runs on the CPU here; hiding GPUs keeps the subset's numbers the CPU ones everywhere.
export CUDA_VISIBLE_DEVICES=""
status=0
PYTHONPATH="$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=5 tests/test_compat_newest.py \
    || status=$?
echo "compat: $((SECONDS - start)) s in all"
exit "$status"
