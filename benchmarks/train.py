"""Training step: ours beside a transformers PyTorch training step (AdamW, same batch), and the matmul peak.

    python benchmarks/train.py [--model bloom-560m] [--batch 1] [--seq 512] [--repeats 3]

fp32, random weights and tokens, no dropout, no activation checkpointing on either side. Each side runs in a
process of its own, one after the other, so that one model with its gradients and AdamW state is alive at a
time (both together peaked at 22.4 GiB on a 24 GiB machine, and were once killed). PyTorch runs twice: with
glibc's default malloc, as a PyTorch user runs it, then after `bloom_jax.runtime.reuse_host_memory()`, which
`bloom-jax train` calls first (freed memory kept mapped: no page faults on each step's fresh buffers). Each
process first measures its library's fp32 matmul FLOP/s at 4096^3 (JAX's for ours, PyTorch's for PyTorch), so
that every row has the limit of its own moment on a shared machine. Prints tokens/s, the ratio to PyTorch, MFU
(model FLOPs, 3 x the forward's matmuls, per second over that peak) and each process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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
    torch_bloom,
    torch_matmul_peak,
    versions,
)

SIDES = {  # --side -> the row's name
    "torch": "transformers PyTorch (default malloc)",
    "torch-reused": "transformers PyTorch (freed memory reused)",
    "ours": "ours (freed memory reused, as `bloom-jax train`)",
}


def torch_step_seconds(config, tokens, repeats: int) -> float:
    import torch

    model = torch_bloom(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ids = torch.as_tensor(tokens, dtype=torch.long)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss  # transformers shifts labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return median_seconds(step, repeats)


def our_step_seconds(config, tokens, repeats: int) -> float:
    import jax

    from bloom_jax.model import init_params, make_model
    from bloom_jax.recipe import TrainConfig
    from bloom_jax.train import make_optimizer, train_step

    cfg = TrainConfig(batch_size=tokens.shape[0], seq_len=tokens.shape[1] - 1, learning_rate=1e-4)
    model = make_model(config, scan_layers=False)
    optimizer = make_optimizer(cfg)
    params = init_params(model, jax.random.key(0))
    state = {"step": jax.numpy.int32(0), "params": params, "opt_state": jax.jit(optimizer.init)(params)}
    step = jax.jit(lambda s, t: train_step(model, optimizer, 1, 0, False, s, t), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], tokens)
        metrics["loss"].block_until_ready()

    return median_seconds(run, repeats)


def run_side(args) -> None:
    """One side's median step, printed as JSON with the matmul peaks measured just before and the process's
    peak resident memory."""
    from bloom_jax.config import load_config
    from bloom_jax.runtime import reuse_host_memory

    config = load_config(args.model)
    tokens = random_ids(config.vocab_size, args.batch, args.seq + 1)
    torch_side = args.side.startswith("torch")
    matmul_peak = torch_matmul_peak() if torch_side else jax_matmul_peak()
    if args.side != "torch":
        reuse_host_memory()
    seconds = (torch_step_seconds if torch_side else our_step_seconds)(config, tokens, args.repeats)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    print(json.dumps({"seconds": seconds, "peak_rss_gib": peak_gib, "matmul_peak": matmul_peak}))


def side_in_child(args, side: str) -> dict:
    log(f"{args.batch}x{args.seq}: {SIDES[side]}")
    command = [sys.executable, os.path.abspath(__file__), "--side", side, "--model", args.model,
               "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{side} failed with exit status {result.returncode}")
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--model", default="bloom-560m", help="preset name (random weights)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process: one side only
    args = parser.parse_args()
    if args.side:
        run_side(args)
        return

    from bloom_jax.config import load_config
    from bloom_jax.model import forward_flops

    config = load_config(args.model)
    results = {side: side_in_child(args, side) for side in SIDES}
    theirs = results["torch"]["seconds"]
    n_tokens, flops = args.batch * args.seq, 3 * forward_flops(config, args.batch, args.seq)
    rows = [[SIDES[side], f"{n_tokens / r['seconds']:.1f}", f"{theirs / r['seconds']:.2f}x",
             f"{flops / r['seconds'] / 1e9:.0f}", f"{r['matmul_peak'] / 1e9:.0f}",
             f"{flops / r['seconds'] / r['matmul_peak']:.2f}", f"{r['peak_rss_gib']:.1f}"]
            for side, r in (("ours", results["ours"]), ("torch", results["torch"]),
                            ("torch-reused", results["torch-reused"]))]
    print(f"Training step, {args.model} architecture, {args.batch} x {args.seq} tokens, fp32, AdamW, "
          f"median of {args.repeats} steps, each side in its own process")
    print(f"Machine: {machine()}; {versions()}")
    print()
    print(markdown_table(["step", "tokens/s", "vs PyTorch (default malloc)", "GFLOP/s",
                          "own fp32 matmul peak GFLOP/s", "MFU (of that peak)", "peak RSS GiB"], rows))


if __name__ == "__main__":
    with published("train"):
        main()
