#!/usr/bin/env bash
# Creates .venv and installs qcompile (editable) with its test extra, at the exact
# versions in constraints.txt (the ones CI was last green with; scripts/lock.sh
# refreshes them). torch is the CPU build this project's machines carry locally; an
# unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -c constraints.txt "torch==2.13.0" -e ".[test]"
