"""Training step: ours beside a transformers PyTorch training step (AdamW, same batch), and the matmul peak.

    python benchmarks/train.py [--model bloom-560m] [--batch 1] [--seq 512] [--repeats 3]

fp32, random weights and tokens, no dropout, no activation checkpointing on either side. PyTorch runs first (its
model, gradients and AdamW state are freed before ours are built: both would not fit in 24 GiB together), once
with glibc's default malloc, as a PyTorch user runs it, then again after `bloom_jax.runtime.reuse_host_memory()`,
which `bloom-jax train` calls first (freed memory kept mapped: no page faults on each step's fresh buffers).
Prints tokens/s, the ratio to PyTorch, and MFU: model FLOPs (3 x the forward's matmuls) per second over the fp32
matmul FLOP/s JAX measures now (4096^3).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    jax_matmul_peak,
    log,
    machine,
    markdown_table,
    median_seconds,
    random_ids,
    torch_bloom,
    torch_matmul_peak,
    versions,
)


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

    return median_seconds(step, repeats)  # the model and optimizer are freed on return


def our_step_seconds(config, tokens, repeats: int) -> float:
    import jax

    from bloom_jax.model import make_model
    from bloom_jax.train import TrainConfig, _init_params, make_optimizer, train_step

    cfg = TrainConfig(batch_size=tokens.shape[0], seq_len=tokens.shape[1] - 1, learning_rate=1e-4)
    model = make_model(config, scan_layers=False)
    optimizer = make_optimizer(cfg)
    params = jax.jit(lambda: _init_params(model, 0))()
    state = {"step": jax.numpy.int32(0), "params": params, "opt_state": jax.jit(optimizer.init)(params)}
    step = jax.jit(lambda s, t: train_step(model, optimizer, 1, 0, False, s, t), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], tokens)
        metrics["loss"].block_until_ready()

    return median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bloom-560m", help="preset name (random weights)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from bloom_jax.config import load_config
    from bloom_jax.model import forward_flops
    from bloom_jax.runtime import reuse_host_memory

    config = load_config(args.model)
    tokens = random_ids(config.vocab_size, args.batch, args.seq + 1)
    log("measuring the fp32 matmul peaks")
    peak, torch_peak = jax_matmul_peak(), torch_matmul_peak()
    log(f"{args.batch}x{args.seq}: transformers PyTorch training step (AdamW), default malloc")
    theirs = torch_step_seconds(config, tokens, args.repeats)
    gc.collect()
    reuse_host_memory()  # what `bloom-jax train` does first; PyTorch is timed again with it
    log(f"{args.batch}x{args.seq}: transformers PyTorch training step (AdamW), freed memory reused")
    theirs_reused = torch_step_seconds(config, tokens, args.repeats)
    gc.collect()
    log(f"{args.batch}x{args.seq}: our training step (AdamW)")
    ours = our_step_seconds(config, tokens, args.repeats)
    n_tokens, flops = args.batch * args.seq, 3 * forward_flops(config, args.batch, args.seq)
    rows = [[name, f"{n_tokens / seconds:.1f}", f"{theirs / seconds:.2f}x", f"{flops / seconds / 1e9:.0f}",
             f"{flops / seconds / peak:.2f}"]
            for name, seconds in [("ours (freed memory reused, as `bloom-jax train`)", ours),
                                  ("transformers PyTorch (default malloc)", theirs),
                                  ("transformers PyTorch (freed memory reused)", theirs_reused)]]
    print(f"Training step, {args.model} architecture, {args.batch} x {args.seq} tokens, fp32, AdamW, "
          f"median of {args.repeats} steps")
    print(f"Machine: {machine()}; {versions()}")
    print(f"fp32 matmul peak measured now (4096^3): JAX {peak / 1e9:.0f} GFLOP/s, PyTorch {torch_peak / 1e9:.0f}"
          " GFLOP/s\n")
    print(markdown_table(["step", "tokens/s", "vs PyTorch (default malloc)", "GFLOP/s", "MFU (of JAX matmul peak)"],
                         rows))


if __name__ == "__main__":
    main()
