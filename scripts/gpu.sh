#!/usr/bin/env bash
# The one GPU command (benchmarks/gpu.py; docs/kernels.md#one-gpu-command): every kernel
# checked against its reference on the GPU, then timed at Flux's shapes, then one
# end-to-end step if the budget allows; each result appended to $OUT/gpu.jsonl.
#
#   scripts/gpu.sh [--budget SECONDS] [--out DIR]  on the GPU (default budget 480 s,
#                                                  results in $OUT, else build/gpu)
#   scripts/gpu.sh --dry-run [--out DIR]           the same plan on the CPU: Triton's
#                                                  interpreter, tiny shapes, a stand-in clock
#   scripts/gpu.sh --prepare [--python 3.12]       here, with the registry: the wheels the
#                                                  e2e step needs (diffusers and what
#                                                  `import qcompile` imports besides torch)
#                                                  into build/wheelhouse, for the GPU's Python
#   scripts/gpu.sh --report FILE [--write NAME]    the tables of a run's JSONL; --write also
#                                                  saves them to benchmarks/results/NAME.md
#                                                  and the JSONL beside them
#
# On the GPU it needs only torch and Triton: the kernels import without qcompile's
# package (and so without diffusers). A carried build/wheelhouse is installed into
# build/gpu-site for the e2e step when diffusers does not import.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

WHEELS=(diffusers transformers accelerate huggingface_hub hf_xet safetensors tokenizers
        regex pyyaml requests urllib3 idna charset_normalizer certifi tqdm packaging psutil
        importlib_metadata zipp pillow filelock fsspec)

case "${1:-}" in
--prepare)
    python_version=3.12
    if [ "${2:-}" = "--python" ]; then python_version=$3; fi
    rm -rf build/wheelhouse && mkdir -p build/wheelhouse
    pins=()
    for name in "${WHEELS[@]}"; do
        version=$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))" 2>/dev/null || true)
        pins+=("$name${version:+==$version}")
    done
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest build/wheelhouse \
        --python-version "$python_version" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform any "${pins[@]}"
    du -sh build/wheelhouse
    echo "carry build/wheelhouse to the GPU (run's carry=[\"build/wheelhouse\"])"
    exit 0
    ;;
--report)
    shift
    exec "$PY" -m benchmarks.gpu --report "$@"
    ;;
--dry-run)
    export TRITON_INTERPRET=1
    ;;
*)
    if [ -d build/wheelhouse ] && ! "$PY" -c "import diffusers" 2>/dev/null; then
        "$PY" -m pip install --quiet --no-index --no-deps --find-links build/wheelhouse \
            --target build/gpu-site "${WHEELS[@]}" || echo "wheelhouse install failed"
        export PYTHONPATH="$PYTHONPATH:$PWD/build/gpu-site"
    fi
    ;;
esac
exec "$PY" -m benchmarks.gpu "$@"
