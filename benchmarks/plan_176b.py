"""The smallest meshes that fit BLOOM-176B, as `bloom-jax plan` computes them (XLA's memory analysis on simulated
CPU devices): training (seq 2048, one sequence per data shard per micro-step, AdamW, fp32 master weights, bf16
compute, full remat) and generation: one decode step with a bf16 KV cache of 2048 positions, batch 1 and 32.

    python benchmarks/plan_176b.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import log, markdown_table  # noqa: E402

from bloom_jax.devices import ACCELERATORS  # noqa: E402

CHIPS = {"TPU v4": "v4", "TPU v5p": "v5p", "H100": "h100"}
RUNS = {  # name -> (task, batch or None, [mesh specs, smallest first])
    "train, seq 2048": ("train", None, [f"fsdp={n // 8},tensor=8" for n in (64, 128, 256, 512)]),
    "generate, batch 1, cache 2048": ("generate", 1, [f"fsdp={n // 8},tensor=8" for n in (8, 16, 32, 64)]),
    "generate, batch 32, cache 2048": ("generate", 32, [f"fsdp={n // 8},tensor=8" for n in (8, 16, 32, 64, 128)]),
}


def plan(task: str, batch: int | None, mesh: str) -> dict:
    command = [sys.executable, "-m", "bloom_jax.cli", "plan", "--model", "bloom-176b", "--mesh", mesh,
               "--task", task, "--seq", "2048"] + (["--batch", str(batch)] if batch else [])
    log(" ".join(command[2:]))
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    rows = []
    for name, (task, batch, meshes) in RUNS.items():
        results = [plan(task, batch, mesh) for mesh in meshes]
        cells = [name, ", ".join(f"{r['devices']}: {r['per_device_gib']['total']:.1f}" for r in results)]
        for chip in CHIPS.values():
            fitting = [r for r in results if r["per_device_gib"]["total"] <= ACCELERATORS[chip].hbm_gib]
            cells.append(f"{fitting[0]['devices']} ({fitting[0]['mesh']['fsdp']}x{fitting[0]['mesh']['tensor']})"
                         if fitting else f"> {results[-1]['devices']}")
        rows.append(cells)
    print("BLOOM-176B: per-device GiB by device count, and the smallest fsdp x tensor mesh that fits")
    print(markdown_table(["step", "devices: GiB per device"] + [f"{c} ({ACCELERATORS[k].hbm_gib:g} GiB)" for c, k in
                                                                CHIPS.items()], rows))


if __name__ == "__main__":
    main()
