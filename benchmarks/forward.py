"""Forward pass: our jitted BLOOM beside transformers' PyTorch BLOOM on the same weights, and the matmul peak.

    python benchmarks/forward.py [--model bloom-560m] [--shapes 8x128,1x128] [--repeats 5]

Prints a markdown table (stdout): tokens/s for each (ours with scanned and with unrolled layers), our speed-up
over PyTorch, and our model FLOP/s as a fraction of the fp32 matmul FLOP/s measured in the same run, by JAX
(XLA's own dot) and by PyTorch (MKL on Intel CPUs, which can be faster than XLA's). Model FLOPs count every
matmul (the tied head included, attention over the full s x s square as computed), forward only.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    DOCS_FLAG,
    jax_matmul_peak,
    log,
    machine,
    markdown_table,
    median_seconds,
    published,
    random_ids,
    torch_and_ours,
    torch_matmul_peak,
    versions,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--model", default="bloom-560m", help="preset name (random weights)")
    parser.add_argument("--shapes", default="8x128,1x128", help="comma-separated BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import torch

    from bloom_jax.config import load_config
    from bloom_jax.model import forward_flops, make_model, unstack_layers

    config = load_config(args.model)
    log(f"building {args.model} with random weights (PyTorch init, copied to ours)")
    torch_model, scanned, params = torch_and_ours(config)
    unrolled = make_model(config, scan_layers=False)
    ours = {  # name -> (model, params)
        "scanned": (scanned, jax.device_put(params)),
        "unrolled": (unrolled, jax.device_put(unstack_layers(params))),
    }
    forwards = {name: jax.jit(lambda p, ids, m=m: m.apply({"params": p}, ids)) for name, (m, _) in ours.items()}

    log("measuring the fp32 matmul peaks")
    peak, torch_peak = jax_matmul_peak(), torch_matmul_peak()
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        ids = random_ids(config.vocab_size, batch, seq)
        tokens, flops = batch * seq, forward_flops(config, batch, seq)
        seconds = {}
        for name, (_, p) in ours.items():
            log(f"{batch}x{seq}: ours, {name}")
            seconds[name] = median_seconds(lambda: forwards[name](p, ids).block_until_ready(), args.repeats)
        log(f"{batch}x{seq}: transformers PyTorch")
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            theirs = median_seconds(lambda: torch_model(input_ids=ids_t, use_cache=False).logits, args.repeats)
        best = min(seconds.values())
        rows.append([f"{batch} x {seq}", f"{tokens / seconds['unrolled']:.1f}", f"{tokens / seconds['scanned']:.1f}",
                     f"{tokens / theirs:.1f}", f"{theirs / best:.2f}x", f"{flops / best / 1e9:.0f}",
                     f"{flops / best / peak:.2f}", f"{flops / best / torch_peak:.2f}"])

    print(f"Forward, {args.model} architecture, random weights, fp32, median of {args.repeats} runs")
    print(f"Machine: {machine()}; {versions()}")
    print(f"fp32 matmul peak measured now (4096^3): JAX {peak / 1e9:.0f} GFLOP/s, PyTorch {torch_peak / 1e9:.0f}"
          " GFLOP/s\n")
    print(markdown_table(["batch x seq", "ours unrolled tok/s", "ours scanned tok/s", "PyTorch tok/s",
                          "best ours / PyTorch", "ours GFLOP/s", "of JAX matmul peak", "of PyTorch matmul peak"],
                         rows))


if __name__ == "__main__":
    with published("forward"):
        main()
