#!/usr/bin/env bash
# Creates .venv and installs qcompile (editable) with its test extra.
# torch is pinned to the CPU build this project's machines carry locally; an unpinned
# torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
