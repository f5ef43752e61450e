"""What fits on TPUs, from the TPU compiler itself (libtpu, no TPU needed): each step compiled by `bloom-jax plan
--device ...` for a slice of that generation, its per-chip memory from the compiler's buffer assignment.

- Full fine-tunes (bf16 compute, fp32 master weights and AdamW moments, full remat, sequence 2048): bloom-560m on
  one v5e chip (the largest micro-batch that fits, and instruction tuning on packed rows at batch 8), bloom-1b7 on
  a v5e-8 (fsdp=8), bloom-7b1 on a v5p-8 (4 chips).
- LoRA and QLoRA (rank 16 on all four linear layers, fp32 adapters and AdamW, full remat): bloom-7b1 at sequence
  1024 on a bf16 base and at 2048 on an nf4 base on one v5e chip (the largest micro-batch that fits), bloom-1b7
  on a v5e-8 (fsdp=8) beside its full fine-tune; per chip: base, adapters, optimizer, the rest, total.
- Attention: the bloom-560m training step on one v5e chip at sequence 2048 and 8192 with each attention
  (`--attention reference`, `blockwise`, `flash`: the Pallas kernel with ALiBi built inside).
- BLOOM-176B training (sequence 2048, one sequence per fsdp shard) and generation (one decode step, batch 1 and
  32, a bf16 KV cache of 2048 positions): per-chip memory by slice size on v4, v5p and v6e, and the smallest
  slice that fits.

    pip install "bloom-jax[tpu]" && python benchmarks/plan_tpu.py [--quick]

Each plan runs in its own process (a process describes one TPU slice). Results: markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DOCS_FLAG, log, markdown_table, published  # noqa: E402

from bloom_jax.devices import ACCELERATORS  # noqa: E402


def plan(model: str, device: str, mesh: str, task: str, seq: int, batch: int | None = None,
         extra: tuple[str, ...] = ()) -> dict:
    command = [sys.executable, "-m", "bloom_jax.cli", "plan", "--model", model, "--mesh", mesh, "--task", task,
               "--seq", str(seq), "--device", device, "--compiler", "tpu", *extra]
    command += ["--batch", str(batch)] if batch else []
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command[2:])} failed: {out.stderr.strip().splitlines()[-1]}")
    result = json.loads(out.stdout)
    gib = result["per_device_gib"]
    total = gib["total"]
    log(f"{model} {task} {' '.join(extra)} {device} {mesh} batch {result['batch']}: {total:.2f} GiB, fits {result['fits']} "
        f"({time.perf_counter() - start:.0f} s)")
    return {**result, "gib": total}


def cell(result: dict) -> str:
    gib = result["per_device_gib"]
    if "compiler_hbm_gib" not in result:
        return f"{gib['total']:.2f} (temporaries {gib['temporaries']:.2f})"
    return f"refused: {gib['total']:.2f} > {result['compiler_hbm_gib']} HBM"


def fine_tunes(quick: bool) -> None:
    rows = []
    batches = (1, 8) if quick else (1, 2, 4, 8, 16)
    fitting = None
    for batch in batches:
        result = plan("bloom-560m", "v5e", "fsdp=1", "train", 2048, batch)
        rows.append([f"bloom-560m, v5e-1, batch {batch}", cell(result), "yes" if result["fits"] else "no"])
        if result["fits"]:
            fitting = batch
        else:
            break
    # Instruction tuning: the step of packed rows (a completion-only loss mask, segment ids; bloom_jax.sft).
    result = plan("bloom-560m", "v5e", "fsdp=1", "train", 2048, 8, ("--packed",))
    rows.append(["bloom-560m SFT, packed rows, v5e-1, batch 8", cell(result), "yes" if result["fits"] else "no"])
    for model, device, mesh, name in (("bloom-1b7", "v5e", "fsdp=8", "v5e-8, fsdp=8"),
                                      ("bloom-7b1", "v5p", "fsdp=4", "v5p-8 (4 chips), fsdp=4")):
        result = plan(model, device, mesh, "train", 2048)
        hbm = ACCELERATORS[device].hbm_gib
        margin = f", margin {hbm - result['gib']:.2f} of {hbm:g} GiB" if result["fits"] else ""
        rows.append([f"{model}, {name}, batch {result['batch']}", cell(result) + margin,
                     "yes" if result["fits"] else "no"])
    print("Full fine-tunes at sequence 2048 (bf16 compute, fp32 master weights and AdamW, full remat), per chip "
          f"GiB from the TPU compiler; bloom-560m on one v5e chip fits up to micro-batch {fitting}")
    print(markdown_table(["step", "GiB per chip", "fits"], rows))


LORA = ("--lora-rank", "16")


def parts_row(name: str, result: dict) -> list[str]:
    """A table row: base (or trained weights), adapters, optimizer, the rest (activations and temporaries), total."""
    parts, gib = result.get("arguments_gib", {}), result["per_device_gib"]
    refused = "compiler_hbm_gib" in result
    rest = gib["total"] - sum(parts.values())
    return [name, f"{parts.get('weights', 0):.2f}", f"{parts.get('adapters', 0):.3f}", f"{parts.get('optimizer', 0):.3f}",
            f"{rest:.2f}", f"{gib['total']:.2f}" + (f" > {result['compiler_hbm_gib']}: refused" if refused else ""),
            "yes" if result["fits"] else "no"]


def lora_fine_tunes(quick: bool) -> None:
    rows = []
    # The bf16 base unrolled: scanned, the TPU compiler copies the stacked fused-QKV kernel into another layout
    # first (2.81 GiB for bloom-7b1). The nf4 base scanned: unrolled, it keeps dequantized kernels (27.8 GiB at
    # batch 4). Loss chunks of 256 tokens: 245 MiB of logits at a time instead of 980.
    for model, seq, base, layers in (("bloom-7b1", 1024, "bfloat16", "unrolled"), ("bloom-7b1", 2048, "nf4", "scanned")):
        fitted = False
        for batch in (1, 2) if quick else (1, 2, 4, 8, 16):
            result = plan(model, "v5e", "fsdp=1", "train", seq, batch,
                          (*LORA, "--lora-base", base, "--layers", layers, "--loss-chunk-tokens", "256"))
            rows.append(parts_row(f"{model} LoRA, {base} base, seq {seq}, v5e-1, batch {batch}", result))
            if fitted and not result["fits"]:
                break
            fitted = fitted or result["fits"]
    for name, extra in (("LoRA, bf16 base", (*LORA, "--lora-base", "bfloat16")), ("full fine-tune", ())):
        result = plan("bloom-1b7", "v5e", "fsdp=8", "train", 2048, 8, extra)
        rows.append(parts_row(f"bloom-1b7 {name}, seq 2048, v5e-8 (fsdp=8), batch 8", result))
    print("LoRA (rank 16, all four linear layers) and full fine-tunes, GiB per chip from the TPU compiler: the base "
          "(or trained weights), fp32 adapters, AdamW moments, the rest (activations, temporaries), total")
    print(markdown_table(["step", "base", "adapters", "optimizer", "rest", "total", "fits"], rows))


ATTENTION_STEPS = ((2048, 1), (2048, 8), (8192, 1), (8192, 4))  # (seq, batch)


ATTENTION_ALONE = ((1, 2048), (8, 2048), (1, 8192), (4, 8192))  # (batch, seq) at 16 heads of 64, bf16


def attention_child(device: str) -> None:
    """Prints, as JSON, the TPU compiler's temporaries (MiB) of attention alone, forward and backward, for each
    implementation and shape of ATTENTION_ALONE on one chip of `device`."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from bloom_jax.kernels import Kernels, attend
    from bloom_jax.kernels.attention import AttentionMask
    from bloom_jax.plan import tpu_devices

    sharding = NamedSharding(jax.sharding.Mesh(tpu_devices(device, 1), ("x",)), PartitionSpec())
    out = {}
    for b, s in ATTENTION_ALONE:
        qkv = jax.ShapeDtypeStruct((b, 16, s, 64), jnp.bfloat16, sharding=sharding)
        key_mask = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sharding)
        for name in ("reference", "blockwise", "flash"):
            kernels = Kernels.create("reference", name, platform="tpu")

            def loss(q, k, v, key_mask, kernels=kernels):
                mask = AttentionMask.create(key_mask, 16, s, 0, dense=kernels.attention == "reference")
                return jnp.sum(attend(kernels, q, k, v, mask, jnp.bfloat16).astype(jnp.float32))

            try:
                compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, key_mask).compile()
                out[f"{b}x{s} {name}"] = compiled.memory_analysis().temp_size_in_bytes / 2**20
            except Exception as error:  # noqa: BLE001 - the compiler refuses what does not fit its HBM
                out[f"{b}x{s} {name}"] = str(error).strip().splitlines()[0][:60]
    print(json.dumps(out))


def attention_memory(quick: bool) -> None:
    rows = []
    for device in ("v5e", "v5p"):
        child = subprocess.run([sys.executable, __file__, "--attention-child", device], capture_output=True,
                               text=True)
        if child.returncode != 0:
            raise SystemExit(f"attention alone on {device} failed: {child.stderr.strip().splitlines()[-1]}")
        figures = json.loads(child.stdout)
        for b, s in ATTENTION_ALONE:
            cells = [figures[f"{b}x{s} {name}"] for name in ("reference", "blockwise", "flash")]
            rows.append([f"{device}, {b} x 16 heads x {s} x 64", *(
                f"{c:.1f}" if isinstance(c, float) else "refused" + (
                    ": out of HBM" if "RESOURCE_EXHAUSTED" in c else f" ({c})") for c in cells)])
    print("Attention alone, forward and backward, causal ALiBi, bf16, one chip: the TPU compiler's temporaries "
          "(MiB) by attention")
    print(markdown_table(["b x n x s x h", "reference", "blockwise (XLA)", "flash (Pallas)"], rows))
    print()
    rows = []
    for seq, batch in ATTENTION_STEPS[:2] if quick else ATTENTION_STEPS:
        cells = [cell(plan("bloom-560m", "v5e", "fsdp=1", "train", seq, batch, ("--attention", name)))
                 for name in ("reference", "blockwise", "flash")]
        rows.append([f"seq {seq}, batch {batch}", *cells])
        log(f"seq {seq}, batch {batch}: {cells}")
    print("bloom-560m training step on one v5e chip (bf16 compute, fp32 AdamW, full remat), per chip GiB from the "
          "TPU compiler by attention")
    print(markdown_table(["step", "reference", "blockwise (XLA)", "flash (Pallas)"], rows))


BLOOM_176B = {  # name -> (task, batch or None, seq)
    "train, seq 2048": ("train", None, 2048),
    "generate, batch 1, cache 2048": ("generate", 1, 2048),
    "generate, batch 32, cache 2048": ("generate", 32, 2048),
}
SLICES = {"v4": (16, 32, 64, 128, 256, 512), "v5p": (4, 8, 16, 32, 64, 128), "v6e": (8, 16, 32, 64, 128, 256)}


def bloom_176b(quick: bool) -> None:
    rows = []
    for name, (task, batch, seq) in BLOOM_176B.items():
        for device, sizes in SLICES.items():
            tried, smallest = [], None
            for chips in sizes[: 3 if quick else None]:
                # tensor=4 divides 112 heads and maps onto every generation's physical axes.
                result = plan("bloom-176b", device, f"fsdp={chips // 4},tensor=4", task, seq, batch)
                tried.append(f"{chips}: {result['gib']:.1f}" + ("" if result["fits"] else "*"))
                if result["fits"]:
                    smallest = f"{chips} chips (fsdp={chips // 4}, tensor=4)"
                    break
            rows.append([name, f"{device} ({ACCELERATORS[device].hbm_gib:g} GiB)", ", ".join(tried),
                         smallest or f"> {sizes[-1]} chips"])
    print("BLOOM-176B per-chip GiB by slice size (chips: GiB; * does not fit) from the TPU compiler, and the "
          "smallest slice that fits")
    print(markdown_table(["step", "TPU", "chips: GiB per chip", "smallest that fits"], rows))


SECTIONS = {"fine-tunes": fine_tunes, "lora": lora_fine_tunes, "attention": attention_memory, "bloom-176b": bloom_176b}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--quick", action="store_true", help="fewer batch and slice sizes")
    parser.add_argument("--only", choices=tuple(SECTIONS), default=None)
    parser.add_argument("--attention-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attention_child:
        return attention_child(args.attention_child)
    for name, section in SECTIONS.items():
        if args.only in (None, name):
            # Each section is its own block in the docs; the figures are the compiler's, whatever the machine.
            with published(f"plan_tpu-{name}", f"libtpu {version('libtpu')}, jax {version('jax')}"):
                section(args.quick)


if __name__ == "__main__":
    main()
