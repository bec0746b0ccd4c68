#!/usr/bin/env bash
# Refreshes constraints.txt: resolves pyproject's ranges afresh in a scratch venv (the
# newest versions they allow), then writes every installed package's exact version.
# After it, run `bash scripts/test.sh` and `bash scripts/aot.sh`; commit the file only
# when both are green. torch stays 2.13.0 (the CPU wheel; see scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
python3 -m venv "$scratch/venv"
"$scratch/venv/bin/python" -m pip install --quiet --upgrade pip
"$scratch/venv/bin/python" -m pip install --quiet "torch==2.13.0" -e ".[test]"
{
    echo "# Exact versions CI was green with; scripts/setup.sh installs with -c constraints.txt."
    echo "# Regenerate with scripts/lock.sh (pyproject.toml keeps the ranges)."
    "$scratch/venv/bin/python" -m pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
