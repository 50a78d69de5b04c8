#!/usr/bin/env bash
# Create .venv and install vlmscope with its test tools, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt torch -e ".[test]"

# The explorer's browser test (tests/test_explorer_browser.py) drives Debian's chromium through Playwright
# (Playwright's own browser download is not reachable from CI). Installed only where apt and root are at hand;
# elsewhere the test is skipped, except under CI=true where a missing chromium fails it.
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
  else
    echo "setup: chromium not installed (needs apt-get as root); the browser test will be skipped" >&2
  fi
fi
