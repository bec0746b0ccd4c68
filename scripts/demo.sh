#!/usr/bin/env bash
# Sets up (scripts/setup.sh), then runs `qcompile demo` on a tiny offline FluxPipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
qcompile demo "$@"
