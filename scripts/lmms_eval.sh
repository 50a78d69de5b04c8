#!/usr/bin/env bash
# The lmms-eval plug-in, tested through the real `lmms-eval` CLI, in a second environment.
#
# Builds .lmms-venv (git-ignored, reused between runs) with lmms-eval 0.7.3, filelock<4 (lmms-eval 0.7.3's
# evaluator uses filelock 3.x internals and fails at evaluation time with filelock 4) and pytest. lmms-eval
# brings its own torch and transformers; nothing is pinned against it. vlmscope is then installed into it
# non-editably from a copy of pyproject.toml + src/ (so its `lmms_eval.models` entry point is registered:
# PYTHONPATH alone does not register entry points, and nothing is written into the worktree), on every run, so
# the entry point follows the worktree. The tests import the worktree's src/ through PYTHONPATH.
# Then it runs tests/test_lmms_eval_plugin.py and tests/test_lmms_eval_tasks.py there (about 3 minutes). Building
# the venv takes 3 minutes (pip's cache warm) to about 6 (cold) and 7 GB; it pulls its own torch 2.14 + torchvision.
# Without the package index: under CI=true it fails with one line; elsewhere it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.lmms-venv

job=lmms-eval need="the lmms-eval plug-in job" skip="the lmms-eval plug-in test"
source scripts/side_venv.sh

if [ ! -f "$venv/.built" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # The package's own dependencies (read from pyproject.toml) in the same resolution as lmms-eval's, so pip
    # picks one torch / transformers that satisfies both.
    read_package_deps
    timeout 1200 "$venv/bin/python" -m pip install "${pip_opts[@]}" "lmms-eval==0.7.3" "filelock<4" pytest "setuptools>=68" \
        "${deps[@]}" >"$log" 2>&1 || no_index "lmms-eval==0.7.3 and the package's dependencies"
    touch "$venv/.built"
fi

# vlmscope itself, without dependencies (all present above), from a scratch copy of the sources.
copy=$(mktemp -d)
# pytest's own temporary folders live in a private base: other pytest sessions of the same user prune the
# shared /tmp/pytest-of-$USER while this one still reads its files.
basetemp=$(mktemp -d)
trap 'rm -rf "$copy" "$basetemp"' EXIT
cp pyproject.toml README.md "$copy/"
cp -r src "$copy/src"
find "$copy/src" -name __pycache__ -prune -exec rm -rf {} +
timeout 300 "$venv/bin/python" -m pip install "${pip_opts[@]}" --no-deps --no-build-isolation "$copy" >"$log" 2>&1 \
    || { echo "lmms-eval: installing vlmscope into $venv failed (see $log)" >&2; exit 1; }

echo "lmms-eval: $("$venv/bin/python" -c 'import importlib.metadata as m; print("lmms-eval", m.version("lmms_eval"), "transformers", m.version("transformers"), "torch", m.version("torch"))')"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# The test starts the venv's `lmms-eval` console script: its bin/ goes first on PATH.
PATH="$PWD/$venv/bin:$PATH" PYTHONPATH="$PWD/src" \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider --basetemp="$basetemp/pytest" tests/test_lmms_eval_plugin.py tests/test_lmms_eval_tasks.py "$@"
