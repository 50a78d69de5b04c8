#!/usr/bin/env bash
# Compatibility subset against the newest transformers 5.x release, in a second environment.
#
# Builds .compat-venv (git-ignored, reused between runs) with the torch of constraints.txt and the newest
# transformers <6 the package index offers, then runs tests/test_compat_newest.py there (every tiny family:
# load, generate, PAI, explain). Takes about 2 minutes with a cold venv, under 1 minute warm.
# Without the package index: under CI=true it fails with one line; elsewhere it says so and skips.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.compat-venv
log="$venv/pip.log"
# Short network timeouts and one retry: an unreachable index fails in well under a minute instead of hanging.
net_opts=(--disable-pip-version-check --timeout 20 --retries 1)
pip_opts=(-q "${net_opts[@]}")

no_index() {
    if [ "${CI:-}" = true ]; then
        echo "compat: cannot get $1 from the package index (see $log); the newest-transformers job needs it" >&2
        exit 1
    fi
    echo "compat: package index unreachable ($1, see $log); skipping the newest-transformers subset" >&2
    exit 0
}

if [ ! -f "$venv/.built" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    # The package's own dependencies (read from pyproject.toml), with torch as pinned for the main suite; the
    # package itself runs from src/ through PYTHONPATH, so nothing is written into the worktree.
    mapfile -t deps < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
    torch_pin=$(grep -E '^torch==' constraints.txt)
    timeout 600 "$venv/bin/python" -m pip install "${pip_opts[@]}" "$torch_pin" "${deps[@]}" pytest >"$log" 2>&1 \
        || no_index "the package's dependencies"
    touch "$venv/.built"
fi
# Every run asks the index for the newest 5.x release: `pip install -U` would quietly keep a cached older one
# when the index is unreachable, so the version is looked up first and then pinned.
newest=$(timeout 120 "$venv/bin/python" -m pip index versions transformers "${net_opts[@]}" 2>"$log" \
    | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep -E '^5\.[0-9]+(\.[0-9]+)?$' | head -n 1) \
    || true
[ -n "$newest" ] || no_index "the list of transformers releases"
torch_pin=$(grep -E '^torch==' constraints.txt)
timeout 300 "$venv/bin/python" -m pip install "${pip_opts[@]}" "transformers==$newest" "$torch_pin" >"$log" 2>&1 \
    || no_index "transformers==$newest"

version=$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')
echo "compat: transformers $version"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PYTHONPATH="$PWD/src" "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_compat_newest.py
