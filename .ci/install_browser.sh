#!/usr/bin/env bash
# Install what tests/test_app_browser.py needs: Debian's chromium (driven by Playwright through its
# executable_path), Voila, Playwright's python package and a Jupyter kernel. Never `playwright install`:
# it downloads its own browser build, which cannot be fetched here.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
python3 -m pip install -q voila playwright ipykernel
chromium --version
python3 -c "import voila, playwright, ipykernel; print('voila', voila.__version__, 'ipykernel', ipykernel.__version__)"
