#!/usr/bin/env bash
# The benchmarks in one call on a lent GPU (the device tool's `run`, about 8 minutes; nothing downloads):
#
#     bash benchmarks/gpu.sh          # tables and logs under $OUT (default ./gpu-out)
#
# Installs bloom-jax over the machine's own jax/flax/torch (no network there), checks that cuDNN's attention
# lowers, then runs attention (bfloat16, the lengths and head sizes of issues 14 and 17; the Pallas flash kernel at
# two block sizes beside XLA's and cuDNN's), forward, generate and train
# and serve for bloom-560m, each under its own time limit so that one hang leaves the others' tables. The PyTorch peers
# of forward/generate/train run on the machine's CPU (the benchmarks' peer is transformers on CPU); read their
# GPU rows beside the matmul peak each measures.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/machine.txt" 2>&1
python -c "import jax; print(jax.__version__, jax.devices())" >>"$OUT/machine.txt" 2>&1

run() {  # run NAME SECONDS ARGS...: stdout to NAME.md, stderr to NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name" >&2
    timeout "$limit" python "$@" >"$OUT/$name.md" 2>"$OUT/$name.log" || echo "$name: exit $?" >>"$OUT/failures.txt"
}

run attention 240 benchmarks/attention.py --dtype bfloat16 --repeats 5 --flash-blocks 64x64,128x64 \
    --shapes 16x16x2048x64,8x16x4096x64,4x16x8192x64,16x8x2048x128,8x8x4096x128,4x8x8192x128
run forward 90 benchmarks/forward.py --shapes 8x512,1x2048 --repeats 5
run generate 120 benchmarks/generate.py --batches 1,8 --weights bfloat16,int8 --no-ttft --repeats 5
run train 150 benchmarks/train.py --batch 4 --seq 512 --repeats 3
# The server's web stack is not on the machine: carry its wheels (`pip download -d wheels starlette uvicorn
# prometheus_client jinja2 httpx`, then `carry: ["wheels"]`).
if ls wheels/*.whl >/dev/null 2>&1; then
    pip install -q --no-deps --no-index wheels/*.whl >>"$OUT/install.log" 2>&1
    run serve 150 benchmarks/serve.py --clients 1,16,64 --slots 64 --max-length 512 --new 64 --dtype bfloat16 \
        --decode-weights bfloat16
fi
cat "$OUT"/*.md "$OUT"/failures.txt 2>/dev/null
