"""Attention alone, forward and backward: each implementation of `bloom_jax.kernels.attention` side by side, with
the matmul peak measured in the same run.

    python benchmarks/attention.py [--shapes 2x16x1024x64] [--dtype float32] [--repeats 5]
    python benchmarks/attention.py --shapes 8x16x2048x64,4x16x4096x64,2x16x8192x64,4x8x4096x128 --dtype bfloat16 \
        [--flash-blocks 64x64,128x64]

Each shape is BATCHxHEADSxSEQxHEAD_DIM: causal self-attention with ALiBi over one left-padded row (an eighth of
its length padding), the loss the sum of the context times a fixed random cotangent. Implementations: `reference`
(transformers' arithmetic, [b, n, s, s] fp32 scores), `blockwise` (online softmax in XLA, 512 x 512 blocks), on
NVIDIA GPUs `cudnn` (`jax.nn.dot_product_attention` with the bias materialised), and on TPUs and NVIDIA GPUs
`flash` (the Pallas kernels of `bloom_jax.kernels.flash`, ALiBi built inside) at each of `--flash-blocks`
(query x key block; default the kernel's own). Prints, per shape and
implementation (stdout, markdown): the median forward+backward time and its spread (min-max), the attention
TFLOP/s (causal: half the s x s square; backward 2.5 forward), its fraction of the matmul peak of the same dtype
measured now, and the speed-up over the reference. An implementation that fails (out of memory, say) is named
with its error's first line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DOCS_FLAG, log, machine, markdown_table, median_seconds, published, run_times  # noqa: E402


def matmul_peak(dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of a jitted n^3 matmul in `dtype`, measured now."""
    import jax
    import jax.numpy as jnp

    a, b = (jax.random.normal(jax.random.key(i), (n, n), dtype) for i in range(2))
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)


def attention_flops(b: int, n: int, s: int, h: int) -> float:
    """Forward and backward matmul FLOPs of causal attention: 4*b*n*s*s*h forward (scores and context) halved
    by causality, times 3.5 (the backward's five products against the forward's two)."""
    return 3.5 * 4 * b * n * s * s * h / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--shapes", default="2x16x1024x64", help="comma-separated BATCHxHEADSxSEQxHEAD_DIM")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--flash-blocks", default="", help="comma-separated QxK blocks for flash (TPU, GPU)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    import dataclasses

    from bloom_jax.kernels import Kernels, attend
    from bloom_jax.kernels.attention import AttentionMask

    dtype = jnp.dtype(args.dtype)
    platform = jax.default_backend()
    names = ["reference", "blockwise"] + (["cudnn"] if platform in ("gpu", "cuda") else [])
    flash_blocks = {}  # name -> (query, key) block, None for the kernel's default
    if platform in ("tpu", "gpu", "cuda"):
        for blocks in args.flash_blocks.split(",") if args.flash_blocks else [""]:
            flash_blocks[f"flash {blocks}".strip()] = tuple(int(x) for x in blocks.split("x")) if blocks else None
        names += list(flash_blocks)
    log(f"measuring the {args.dtype} matmul peak")
    peak = matmul_peak(dtype, 8192 if platform != "cpu" else 2048)
    rows = []
    for shape in args.shapes.split(","):
        b, n, s, h = (int(x) for x in shape.lower().split("x"))
        rng = np.random.default_rng(0)
        q, k, v, cotangent = (jnp.asarray(rng.normal(0, 1, (b, n, s, h)), dtype) for _ in range(4))
        key_mask = jnp.ones((b, s), jnp.int32).at[0, : s // 8].set(0)
        mask = AttentionMask.create(key_mask, n, s, 0, dense=False)
        flops = attention_flops(b, n, s, h)
        seconds = {}
        for name in names:
            if name in flash_blocks:
                kernels = dataclasses.replace(Kernels.create("reference", "flash", platform=platform),
                                              flash_blocks=flash_blocks[name])
            else:
                kernels = Kernels.create("reference", name, platform=platform)

            def loss(q, k, v, kernels=kernels):
                return jnp.sum(attend(kernels, q, k, v, mask, dtype).astype(jnp.float32) * cotangent)

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
            log(f"{shape}: {name}")
            try:
                times = run_times(lambda step=step: jax.block_until_ready(step(q, k, v)), args.repeats)
            except Exception as error:  # an implementation that does not fit or does not apply: say so, go on
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                rows.append([shape, name, "failed: " + first_line[:80], "", "", ""])
                continue
            seconds[name] = median = statistics.median(times)
            ratio = seconds["reference"] / median if "reference" in seconds else float("nan")
            rows.append([shape, name, f"{median * 1e3:.2f} ({min(times) * 1e3:.2f}-{max(times) * 1e3:.2f})",
                         f"{flops / median / 1e12:.2f}", f"{flops / median / peak:.2f}", f"{ratio:.2f}x"])

    print(f"Attention forward+backward, causal ALiBi, {args.dtype}, median of {args.repeats} runs (min-max)")
    print(f"Machine: {machine()}; {jax.devices()[0].device_kind}; jax {jax.__version__}")
    print(f"{args.dtype} matmul peak measured now: {peak / 1e12:.1f} TFLOP/s\n")
    print(markdown_table(["b x n x s x h", "attention", "ms", "TFLOP/s", "of matmul peak", "vs reference"], rows))


if __name__ == "__main__":
    with published("attention"):
        main()
