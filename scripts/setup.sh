#!/usr/bin/env bash
# Create .venv and install vlmscope with its test tools, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch -e ".[test]"
