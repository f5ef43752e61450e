"""Forward pass: our jitted BLOOM beside transformers' PyTorch BLOOM on the same weights, and the matmul peak.

    python benchmarks/forward.py [--model bloom-560m] [--shapes 8x128,1x128] [--repeats 5]

Prints a markdown table (stdout): tokens/s for each, our speed-up, and our model FLOP/s as a fraction of the fp32
matmul FLOP/s measured in the same run. Model FLOPs count every matmul (the tied head included, attention over
the full s x s square as computed), forward only.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (jax_matmul_peak, log, machine, markdown_table, median_seconds, random_ids,  # noqa: E402
                    torch_and_ours, versions)


def forward_flops(config, batch: int, seq: int) -> float:
    d, f, v, n_layer = config.hidden_size, config.mlp_dim, config.vocab_size, config.n_layer
    dense_per_token = n_layer * (3 * d * d + d * d + 2 * d * f) + v * d
    attention = n_layer * 2 * seq * seq * d  # q.k^T and probs.v
    return 2.0 * batch * (seq * dense_per_token + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-560m", help="preset name (random weights)")
    parser.add_argument("--shapes", default="8x128,1x128", help="comma-separated BATCHxSEQ")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import torch

    from bloom_jax.config import load_config

    config = load_config(args.model)
    log(f"building {args.model} with random weights (PyTorch init, copied to ours)")
    torch_model, model, params = torch_and_ours(config)
    params = jax.device_put(params)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))

    log("measuring the fp32 matmul peak")
    peak = jax_matmul_peak()
    rows = []
    for shape in args.shapes.split(","):
        batch, seq = (int(x) for x in shape.lower().split("x"))
        ids = random_ids(config.vocab_size, batch, seq)
        tokens = batch * seq
        log(f"{batch}x{seq}: ours")
        ours = median_seconds(lambda: forward(params, ids).block_until_ready(), args.repeats)
        log(f"{batch}x{seq}: transformers PyTorch")
        ids_t = torch.as_tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            theirs = median_seconds(lambda: torch_model(input_ids=ids_t, use_cache=False).logits, args.repeats)
        flops = forward_flops(config, batch, seq)
        rows.append([f"{batch} x {seq}", f"{tokens / ours:.1f}", f"{tokens / theirs:.1f}", f"{theirs / ours:.2f}x",
                     f"{flops / ours / 1e9:.0f}", f"{flops / ours / peak:.2f}"])

    print(f"Forward, {args.model} architecture, random weights, fp32, median of {args.repeats} runs")
    print(f"Machine: {machine()}; {versions()}; fp32 matmul peak measured now: {peak / 1e9:.0f} GFLOP/s\n")
    print(markdown_table(["batch x seq", "ours tok/s", "PyTorch tok/s", "ours / PyTorch", "ours GFLOP/s",
                          "fraction of matmul peak"], rows))


if __name__ == "__main__":
    main()
