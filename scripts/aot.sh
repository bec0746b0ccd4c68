#!/usr/bin/env bash
# The AOT compile gate (scripts/aot_check.py): every Triton kernel qcompile launches,
# compiled for sm_90, sm_89 and sm_80 on the Triton in .venv and on each Triton in
# AOT_TRITONS (the GPU machines run 3.6), no GPU needed. Those extra Tritons install
# beside the venv (.venv/aot/triton-X) and shadow its own through PYTHONPATH.
# Then the performance model (benchmarks/roofline.py --check) on each Triton's sm_90 code:
# a predicted ratio under its floor, or a main loop that lost its pipelining, fails
# (in-process: the gate has just cached every result it reads).
# Full results: build/aot/triton-X.json, build/aot/roofline-X.json.
set -euo pipefail
cd "$(dirname "$0")/.."
AOT_TRITONS=${AOT_TRITONS:-3.6.0}
. .venv/bin/activate
venv_triton=$(python -c 'import triton; print(triton.__version__)')
python scripts/aot_check.py --json "build/aot/triton-$venv_triton.json"
python -m benchmarks.roofline --check --jobs 1 --json "build/aot/roofline-$venv_triton.json"
for version in $AOT_TRITONS; do
    target=.venv/aot/triton-$version
    if [ ! -f "$target/triton/__init__.py" ]; then
        python -m pip install --quiet --no-deps --target "$target" "triton==$version"
    fi
    PYTHONPATH="$PWD/$target" python scripts/aot_check.py --triton "$version" \
        --json "build/aot/triton-$version.json"
    PYTHONPATH="$PWD/$target" python -m benchmarks.roofline --check --jobs 1 \
        --json "build/aot/roofline-$version.json"
done
