"""What the accelerators users run BLOOM on offer per JAX device: memory and peak bf16 matmul FLOP/s.

One table for the planner (does a step fit?) and the trainer (MFU). A JAX device is a TPU chip from v4 on (v4
and v5p chips join their two TensorCores into one device; v5e and v6e chips have one) but one TensorCore on v2
and v3, whose figures here are therefore half a chip's. Peaks are the vendors' dense (no sparsity) bf16 figures.
"""

from __future__ import annotations

import dataclasses

from bloom_jax.errors import BloomJaxError


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One kind of device: its name in `bloom-jax plan --device`, how JAX's `device_kind` starts for it (the
    first the runtime reports, then other names it goes by), its memory in GiB and its peak bf16 TFLOP/s."""

    name: str
    device_kinds: tuple[str, ...]
    hbm_gib: float
    peak_tflops: float


# device_kind as libtpu reports it (checked with its compiler for v4, v5e, v5p, v6e): a v5p is "TPU v5", a v5e
# "TPU v5 lite"; GPUs add their memory ("NVIDIA H100 80GB HBM3").
ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v2", ("TPU v2",), 8, 22.5),
    Accelerator("v3", ("TPU v3",), 16, 61.5),
    Accelerator("v4", ("TPU v4",), 32, 275),
    Accelerator("v5e", ("TPU v5 lite", "TPU v5e"), 16, 197),
    Accelerator("v5p", ("TPU v5", "TPU v5p"), 95, 459),
    Accelerator("v6e", ("TPU v6 lite", "TPU v6e"), 32, 918),
    Accelerator("a100-40gb", ("NVIDIA A100",), 40, 312),
    Accelerator("a100-80gb", ("NVIDIA A100",), 80, 312),
    Accelerator("h100", ("NVIDIA H100",), 80, 989),
    Accelerator("h200", ("NVIDIA H200",), 141e9 / 2**30, 989),
)}


def accelerator(name: str) -> Accelerator:
    """A known accelerator by name (`v5e`, `tpu-v5e`, `H100`, ...)."""
    key = name.lower().replace("tpu", "").replace(" ", "").strip("-")
    if key not in ACCELERATORS:
        raise BloomJaxError(f"unknown device {name!r} (known: {', '.join(ACCELERATORS)})")
    return ACCELERATORS[key]


def peak_tflops(device_kind: str) -> float | None:
    """The peak bf16 TFLOP/s of a device of this `jax.Device.device_kind`; None for one not in the table."""
    # The longest matching prefix: "TPU v5 lite" is a v5e, not a v5p ("TPU v5"). Both A100 sizes match the
    # first of them: their peaks are the same.
    matches = [(len(kind), a.peak_tflops) for a in ACCELERATORS.values() for kind in a.device_kinds
               if device_kind.startswith(kind)]
    return max(matches, key=lambda match: match[0])[1] if matches else None
