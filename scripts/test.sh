#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs lint and the whole test suite, one pytest-xdist
# worker per core, idle workers stealing queued tests (pass other pytest arguments
# through, e.g. -m interpreter).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
pytest --numprocesses=auto --dist=worksteal "$@"
