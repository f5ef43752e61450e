"""Memory planning: lower and compile a step ahead of time, allocating no weights, and read per-device memory and
FLOPs from the compiler's own analyses.

For a TPU (`--device v4|v5e|v5p|v6e`) with `libtpu` installed (`pip install "bloom-jax[tpu]"`), the step is
compiled by the TPU compiler itself for a slice of that generation, on this machine, with no TPU
(`jax.experimental.topologies`, as MaxText's `train_compile.py` does): its buffer assignment, fusion and layouts
are the chip's. Otherwise it is compiled for the CPU devices of this process (`jax_num_cpu_devices`, set by the
`plan` command before JAX starts), sharded by the same rules, and XLA:CPU stands in: it has no bf16 dot, so it
converts bf16 weights to fp32 ahead of the layer loop and its temporaries include an fp32 copy of the weights
that a TPU or GPU does not make. Treat those figures as upper estimates. Every result says which compiler made it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from bloom_jax.cache import KVCache
from bloom_jax.config import BloomConfig
from bloom_jax.devices import accelerator
from bloom_jax.errors import BloomJaxError, one_line
from bloom_jax.kernels import Kernels
from bloom_jax.lora import LoraConfig, split_adapters
from bloom_jax.losses import LOSS_CHUNK_TOKENS
from bloom_jax.model import make_model
from bloom_jax.quantize import FROZEN_FORMATS
from bloom_jax.recipe import TrainConfig
from bloom_jax.sharding import ShardingPlan, make_mesh, mesh_spec_sizes
from bloom_jax.train.optimizer import make_optimizer, optimizer_shardings
from bloom_jax.train.step import train_step

TASKS = ("train", "forward", "generate", "speculate")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device figures of one compiled step (bytes and FLOPs, from XLA's memory and cost analyses)."""

    task: str
    devices: int
    mesh: dict[str, int]
    batch: int
    seq: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # outputs that reuse donated arguments
    temp_bytes: int
    flops_per_device: float
    compiler: str = "XLA:CPU (stand-in)"
    hbm_gib: float | None = None  # what the TPU compiler said a chip has, when it refused the step
    # Per-device bytes of the train step's arguments by kind: "weights" (trained, or a LoRA run's frozen base),
    # "adapters", "optimizer" (AdamW's moments of what is trained).
    parts: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, gib: float) -> bool:
        return self.hbm_gib is None and self.total_bytes <= gib * 2**30


# --device -> (the topology's name for get_topology_desc, its physical dimensions, the chip configuration).
# "megacore" joins a v4 or v5p chip's two TensorCores into one device, as on the real chips.
TPU_TOPOLOGIES = {"v4": ("v4", 3, "megacore"), "v5p": ("v5p", 3, "megacore"), "v5e": ("v5e", 2, "default"),
                  "v6e": ("v6e", 2, "default")}


def tpu_compiler_available() -> bool:
    """Whether libtpu, the TPU compiler, is installed here."""
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def slice_shape(chips: int, dims: int) -> tuple[int, int, int]:
    """The chip grid of a slice of `chips` (a power of two): as square (2D: v5e, v6e) or cubic (3D: v4, v5p) as
    the generation's slices are, e.g. 8 -> 2x4 on a v5e, 64 -> 4x4x4 on a v5p."""
    if chips < 1 or chips & (chips - 1):
        raise BloomJaxError(f"plan: a TPU slice has a power-of-two chip count, not {chips}")
    shape = [1, 1, 1]
    for i in range(chips.bit_length() - 1):
        shape[i % dims] *= 2
    return tuple(sorted(shape[:dims])) + (1,) * (3 - dims)


def tpu_devices(device: str, chips: int) -> list:
    """The devices of a `chips`-chip slice of TPU `device` (v4, v5e, v5p, v6e), from the TPU compiler: things to
    compile for, not to run on."""
    import os

    from jax.experimental import topologies

    name, dims, chip_config = TPU_TOPOLOGIES[device]
    shape = slice_shape(chips, dims)
    # One host holds up to 8 v5e/v6e chips (a 2x4 "-8" slice) or 4 v4/v5p chips (2x2x1); bigger slices have more.
    single_host = chips <= (8 if dims == 2 else 4)
    hosts = shape if single_host else (2, 2, 1)
    # libtpu looks for these to describe a real slice; set, it stays quiet about their absence.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{device}-{chips}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    topology = "x".join(str(n) for n in shape[:dims])
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=f"{name}:{topology}",
                                                   chip_config_name=chip_config, chips_per_host_bounds=hosts,
                                                   num_slices=1, wrap=(False, False, False))
    except Exception as e:  # noqa: BLE001 - libtpu's own errors
        raise BloomJaxError(f"plan: the TPU compiler has no {name}:{topology} slice: {one_line(e)}") from None
    return list(description.devices)


def plan_step(config: BloomConfig, mesh_spec: str, task: str, batch: int | None, seq: int,
              rules: str = "fsdp_tensor", remat_policy: str = "full", tpu: str | None = None,
              chips: int | None = None, kernels: str = "auto", attention: str = "auto",
              lora: LoraConfig | None = None, lora_base: str = "bfloat16", scan_layers: bool = True,
              loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, packed: bool = False, draft: BloomConfig | None = None,
              draft_tokens: int = 4, decode_weights: str | None = None) -> Plan:
    """Compiles one step for `config` and returns its analysed memory: with `tpu` (v4, v5e, v5p, v6e) by the TPU
    compiler for a slice of `chips` chips (default: the mesh's size), else on a mesh of this process's devices.

    train: the trainer's `train_step`: bf16 compute, fp32 master weights and AdamW state, activation
      checkpointing (`remat_policy`), state donated; with `lora`, fp32 adapters and their AdamW state beside a
      frozen base stored in `lora_base` (bfloat16, float32, or int8 / nf4 linear layers); with `packed`, the
      step of packed instruction rows (a completion-only loss mask and segment ids, each example attending only
      to itself: `bloom_jax.sft`). forward: bf16 weights and compute, logits of every position. generate: one
      decode step with a bf16 KV cache of `seq` positions (donated), bf16 weights. speculate: one round of
      speculative decoding (`bloom_jax.speculative`): the `draft` model's `draft_tokens` + 1 steps and the
      target's verification of them, greedy, both with bf16 weights and KV caches of `seq` positions (donated).
      `decode_weights` (generate, speculate: "int8", "bfloat16" or "float32", `bloom_jax.weights`) stores the
      weights of both models so instead. `kernels` and `attention` are those of the target
      (`bloom_jax.kernels.Kernels.create` for its platform); `scan_layers` and `loss_chunk_tokens` as the recipe
      keys of the same names.
    """
    if task not in TASKS:
        raise BloomJaxError(f"plan: unknown task {task!r} (choose from {', '.join(TASKS)})")
    if packed and task != "train":
        raise BloomJaxError("plan: --packed plans a train step (--task train)")
    if decode_weights is not None and task not in ("generate", "speculate"):
        raise BloomJaxError("plan: --decode-weights plans decoding (--task generate or speculate)")
    if (draft is not None) != (task == "speculate"):
        raise BloomJaxError("plan: a speculative round (--task speculate) needs a draft model (--draft-model), and "
                            "only it does")
    devices, compiler, platform = None, "XLA:CPU (stand-in)", "cpu"
    if tpu is not None:
        devices = tpu_devices(tpu, chips or devices_for(mesh_spec))
        compiler, platform = f"TPU compiler ({devices[0].device_kind})", "tpu"
    mesh = make_mesh(mesh_spec, devices)
    batch = batch or mesh.shape["slice"] * mesh.shape["data"] * mesh.shape["fsdp"]  # one sequence per data shard
    training = task == "train"
    frozen_weights = lora_base if lora is not None and lora_base in FROZEN_FORMATS else None
    if lora is not None:
        param_dtype = jnp.bfloat16 if frozen_weights else jnp.dtype(lora_base)
    else:
        param_dtype = jnp.float32 if training else jnp.bfloat16
    model = make_model(config, dtype=jnp.bfloat16, param_dtype=param_dtype, scan_layers=scan_layers,
                       remat_policy=remat_policy if training else "none",
                       kernels=Kernels.create(kernels, attention, platform), lora=lora, frozen_weights=frozen_weights,
                       decode_weights=decode_weights)
    # Generation at batch 1: every data shard sees the whole batch.
    sharding = ShardingPlan.create(mesh, rules).for_batch(batch)
    params = sharding.abstract_params(model)
    parts: dict[str, int] = {}

    if training:
        frozen, param_shardings = None, sharding.param_shardings(model)
        if lora is not None:
            frozen, params = split_adapters(params)
            param_shardings = split_adapters(param_shardings)[1]
        optimizer = make_optimizer(TrainConfig.from_yaml("bloom-176b"))  # tr11's AdamW
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_shardings = optimizer_shardings(optimizer, opt_state, param_shardings, mesh)
        opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 opt_state, opt_shardings)
        replicated = sharding.replicated
        state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), "params": params,
                 "opt_state": opt_state}
        state_shardings = jax.tree.map(lambda s: s.sharding, state)
        # Windows of seq + 1 tokens: the model sees seq of them.
        rows = sharding.batch_sharding()
        tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=rows)
        packing = ((jax.ShapeDtypeStruct((batch, seq), jnp.float32, sharding=rows),
                    jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=rows)) if packed else (None, None))
        fn = jax.jit(lambda state, tokens, frozen, packing: train_step(model, optimizer, 1, 0, False, state, tokens,
                                                                       loss_chunk_tokens, frozen, *packing),
                     out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        args = (state, tokens, frozen, packing)
        parts = {"weights": _argument_bytes(frozen if lora is not None else params),
                 "adapters": _argument_bytes(params) if lora is not None else 0,
                 "optimizer": _argument_bytes(opt_state)}
    elif task == "generate":
        # One decode step of a batch whose KV cache holds `seq` positions (the memory high point of generation).
        cache = jax.eval_shape(lambda: KVCache.init(config, batch, seq, jnp.bfloat16))
        cache = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             cache, sharding.shardings(KVCache.logical_axes(config)))
        token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=sharding.batch_sharding())

        def decode(p, cache, token_b1):
            return model.apply({"params": p}, token_b1, cache=cache, last_only=True)

        fn = jax.jit(decode, donate_argnums=(1,))
        args = (params, cache, token)
    elif task == "speculate":
        draft_model = make_model(draft, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, scan_layers=scan_layers,
                                 remat_policy="none", kernels=Kernels.create(kernels, attention, platform),
                                 decode_weights=decode_weights)
        fn, args = _speculative_round(model, params, draft_model, sharding.abstract_params(draft_model), sharding,
                                      batch, seq, draft_tokens)
        parts = {"weights": _argument_bytes(params), "draft_weights": _argument_bytes(args[1]),
                 "caches": _argument_bytes((args[2]["cache"], args[2]["draft_cache"]))}
    else:
        fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
        args = (params, jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding()))

    common = dict(task=task, devices=mesh.size, mesh=dict(mesh.shape), batch=batch, seq=seq, compiler=compiler,
                  parts=parts)
    with sharding.context():
        lowered = fn.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses a step that does not fit its HBM
            exhausted = _OUT_OF_HBM.search(str(e))
            if exhausted is None:
                raise
            needed, available = (float(g) * 2**30 for g in exhausted.groups() if g is not None)
            arguments = _argument_bytes(args)
            return Plan(**common, argument_bytes=arguments, output_bytes=0, alias_bytes=0,
                        temp_bytes=max(0, int(needed) - arguments), flops_per_device=0.0,
                        hbm_gib=available / 2**30)
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Plan(**common, argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                flops_per_device=float((cost or {}).get("flops", 0.0)))


# "Ran out of memory on HBM, the total memory required for HLO temporaries (30.60G) exceeds available HBM
# (15.75G)": the TPU compiler's refusal, the only place it gives the figure (G: GiB). Despite the wording the
# figure is the whole requirement, arguments included: it equals the "Total bytes" of the compiler's memory-usage
# report (XLA_FLAGS=--xla_dump_to), which for a step that fits is arguments + temporaries (bloom-1b7 LoRA on one
# v5e: 5.95 GiB there, 3.35 + 2.70 from memory_analysis); a BLOOM-176B decode step at batch 1 on 8 v6e chips
# asked for 46.8 G, of which 41 GiB are its weights. Near the limit it says instead "Ran out of memory in memory
# space hbm. Used 15.76G of 15.75G hbm."
_OUT_OF_HBM = re.compile(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)"
                         r"|Used ([\d.]+)G of ([\d.]+)G hbm")


def _speculative_round(model, params, draft_model, draft_params, sharding: ShardingPlan, batch: int, seq: int,
                       draft_tokens: int):
    """(the jitted round, its abstract arguments): the decode state as `bloom_jax.speculative.prefill` leaves it,
    with caches of `seq` positions (sharded by the cache's logical axes, the rest replicated), greedy."""
    from bloom_jax import generate, speculative
    from bloom_jax.sampling import Sampling

    spec = speculative.Speculation(draft_tokens, draft_model)
    new_tokens = max(1, seq // 4)  # the round's memory depends on the caches' length, not on how it splits
    prompt = seq - speculative.room(new_tokens, spec)
    if prompt < 1:
        raise BloomJaxError(f"plan: --seq {seq} leaves no room for a prompt beside a round of {draft_tokens} drafts")
    ids = jax.ShapeDtypeStruct((batch, prompt), jnp.int32)

    def start(p, dp, ids):
        state = generate.prefill(model, p, ids, jnp.ones_like(ids), jnp.ones((batch,), jnp.bool_),
                                 jax.random.key(0), jnp.asarray([-1], jnp.int32), 3, Sampling(), new_tokens,
                                 speculative.room(new_tokens, spec))
        return speculative.prefill(dp, state, ids, jnp.ones_like(ids), spec)

    state = jax.eval_shape(start, params, draft_params, ids)
    caches = {"cache": KVCache.logical_axes(model.config, not model.scan_layers),
              "draft_cache": KVCache.logical_axes(draft_model.config, not draft_model.scan_layers)}
    state = {key: jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), value,
                               sharding.shardings(caches[key])) if key in caches else
             jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding.replicated), value)
             for key, value in state.items()}
    fn = jax.jit(lambda p, dp, state: speculative.decode(model, p, dp, state, new_tokens, Sampling(), spec, 1),
                 donate_argnums=(2,))
    return fn, (params, draft_params, state)


def _argument_bytes(args) -> int:
    """Per-device bytes of abstract sharded arguments."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize  # a key<fry> too: 8
               for leaf in jax.tree.leaves(args))


def memory_limit_gib(hbm_gib: float | None, device: str | None) -> float | None:
    """The per-device memory to check against: `--hbm-gib`, or a known accelerator's."""
    if hbm_gib is not None:
        return hbm_gib
    if device is None:
        return None
    return float(accelerator(device).hbm_gib)


def devices_for(mesh_spec: str) -> int:
    """How many devices a spec needs; a spec with -1 needs the count given separately."""
    sizes = mesh_spec_sizes(mesh_spec)
    if -1 in sizes.values():
        raise BloomJaxError("plan: give every mesh axis a size (no -1), or --devices")
    return math.prod(sizes.values())


def describe(plan: Plan, limit_gib: float | None) -> dict[str, Any]:
    gib = 2**30
    out = {
        "task": plan.task, "devices": plan.devices, "mesh": plan.mesh, "batch": plan.batch, "seq": plan.seq,
        "compiler": plan.compiler,
        "per_device_gib": {name: round(value / gib, 3) for name, value in (
            ("arguments", plan.argument_bytes), ("outputs", plan.output_bytes), ("aliased", plan.alias_bytes),
            ("temporaries", plan.temp_bytes), ("total", plan.total_bytes))},
        "tflops_per_device": round(plan.flops_per_device / 1e12, 3),
    }
    if plan.parts:
        out["arguments_gib"] = {name: round(value / gib, 3) for name, value in plan.parts.items()}
    if plan.hbm_gib is not None:  # refused by the TPU compiler: its figure is the total it asked for
        out["per_device_gib"] = {"arguments": round(plan.argument_bytes / gib, 3),
                                 "temporaries": round(plan.temp_bytes / gib, 3),
                                 "total": round((plan.argument_bytes + plan.temp_bytes) / gib, 3)}
        out["compiler_hbm_gib"] = plan.hbm_gib
    if limit_gib is not None or plan.hbm_gib is not None:
        out["limit_gib"] = limit_gib if limit_gib is not None else plan.hbm_gib
        out["fits"] = plan.fits(out["limit_gib"])
    return out
