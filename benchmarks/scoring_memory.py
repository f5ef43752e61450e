"""Memory of scoring a prompt (echo + logprobs: `bloom_jax.serving.batch.prefill_chunk(..., prompt_logprobs=True)`),
from the compilers' buffer assignment: each program is compiled for abstract shapes (no weights), never run.

For rows of a `--chunk`-token chunk (the engine's default prefill chunk, 512) into a prefill cache of that length,
the temporaries (scratch beyond arguments and outputs) of:
- unscored: the chunk without prompt scores (the head over the last position only), the floor;
- before: the scores as `prefill_chunk` made them before `SCORE_TOKENS`: the float32 logits of every position
  [b, c, v], their `log_softmax` and `top_k` over the whole chunk (one block of every token);
- after: today's `prefill_chunk`, the head, `log_softmax` and `top_k` over `SCORE_TOKENS` tokens (rows x positions)
  at a time.

Compilers: XLA:CPU here (float32 weights, as served on CPU), and, with libtpu installed (`pip install
"bloom-jax[tpu]"`), the TPU compiler for one v5e chip (bfloat16 weights and compute, as `bloom-jax plan` takes a
decode step). Nothing here needs a TPU.

    python benchmarks/scoring_memory.py [--model bloom-560m] [--chunk 512] [--rows 1 4] [--no-tpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DOCS_FLAG, log, markdown_table, published  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bloom_jax.config import load_config  # noqa: E402
from bloom_jax.kernels import Kernels  # noqa: E402
from bloom_jax.model import abstract_params, make_model  # noqa: E402
from bloom_jax.plan import _OUT_OF_HBM, tpu_compiler_available, tpu_devices  # noqa: E402
from bloom_jax.serving import batch as device  # noqa: E402


def temporaries(lowered) -> tuple[int, bool]:
    """(temporaries in bytes, whether the program fits): a TPU compile that runs out of HBM reports its need."""
    try:
        return lowered.compile().memory_analysis().temp_size_in_bytes, True
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a program that does not fit its HBM
        exhausted = _OUT_OF_HBM.search(str(e))
        if exhausted is None:
            raise
        return int(float(next(g for g in exhausted.groups() if g is not None)) * 2**30), False


def measure(config, platform: str, rows: int, chunk: int, target=None) -> dict[str, str]:
    """Temporaries (MiB, as text) of the unscored, before and after programs for `rows` x `chunk` tokens."""
    dtype = jnp.float32 if platform == "cpu" else jnp.bfloat16
    model = make_model(config, dtype=dtype, param_dtype=dtype, kernels=Kernels.create(platform=platform),
                       scan_layers=Kernels.create(platform=platform).decode_scan_layers)

    def placed(tree):
        sharding = jax.sharding.SingleDeviceSharding(target) if target is not None else None
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)

    params = placed(nn.unbox(abstract_params(model)))
    cache = placed(jax.eval_shape(lambda: device.new_prefill_cache(model, rows, chunk)))
    ids = placed(jax.ShapeDtypeStruct((rows, chunk), jnp.int32))
    programs = {
        "unscored": device.prefill_chunk.lower(model, params, cache, ids, ids, ids, False),
        # One block of the whole chunk: its logits [b, c, v], their log_softmax and top_k at once, as before.
        "before": device.prefill_chunk.lower(model, params, cache, ids, ids, ids, True, rows * chunk),
        "after": device.prefill_chunk.lower(model, params, cache, ids, ids, ids, True),
    }
    out = {}
    for name, lowered in programs.items():
        start = time.perf_counter()
        size, fits = temporaries(lowered)
        out[name] = f"{size / 2**20:.1f}" + ("" if fits else " (does not fit)")
        log(f"{platform} {rows} x {chunk} {name}: {out[name]} MiB ({time.perf_counter() - start:.0f} s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[DOCS_FLAG])
    parser.add_argument("--model", default="bloom-560m")
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--no-tpu", action="store_true", help="XLA:CPU only, even where libtpu is installed")
    args = parser.parse_args()
    config = load_config(args.model)
    targets = [("XLA:CPU, float32", "cpu", None)]
    if not args.no_tpu and tpu_compiler_available():
        tpu = tpu_devices("v5e", 1)[0]
        targets.append((f"TPU compiler ({tpu.device_kind}), bfloat16", "tpu", tpu))
    rows = []
    for label, platform, target in targets:
        for batch in args.rows:
            t = measure(config, platform, batch, args.chunk, target)
            logits = batch * args.chunk * config.vocab_size * 4 / 2**20
            rows.append([label, str(batch), f"{logits:.1f}", t["unscored"], t["before"], t["after"]])
    with published("scoring-memory"):
        print(f"{args.model}, one chunk of {args.chunk} prompt tokens scored (echo + logprobs, top "
              f"{device.TOP_LOGPROBS}), {device.SCORE_TOKENS} tokens at a time; temporaries in MiB, from "
              f"the compiler (jax {jax.__version__}):")
        print()
        print(markdown_table(["compiler, weights", "rows", "float32 logits of the chunk", "unscored",
                              "before (whole chunk)", f"after ({device.SCORE_TOKENS} tokens a block)"], rows))


if __name__ == "__main__":
    main()
