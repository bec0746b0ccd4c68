#!/usr/bin/env bash
# Creates .venv and installs qcompile (editable) with its test extra, at the exact
# versions in constraints.txt (the ones CI was last green with; scripts/lock.sh
# refreshes them). torch is the CPU build this project's machines carry locally; an
# unpinned torch would pull several GB of CUDA packages. A venv set up from the same
# constraints.txt and pyproject.toml (their hash in .venv/.setup-stamp) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp" ]; then
    exit 0
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[test]"
echo "$stamp" > .venv/.setup-stamp
