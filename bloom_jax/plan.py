"""Memory planning: lower and compile a step ahead of time on simulated devices, allocating no weights, and read
per-device memory and FLOPs from XLA's own analyses.

The step is compiled for the CPU devices of this process (`jax_num_cpu_devices`, set by the `plan` command before
JAX starts), sharded by the same rules a real run uses. XLA:CPU's buffer assignment stands in for the
accelerator's: layouts and fusion differ there. In particular XLA:CPU has no bf16 dot: it converts bf16 weights
to fp32 ahead of the layer loop, so its temporaries include an fp32 copy of the bf16 weights that a TPU or GPU
does not make. Treat the figures as upper estimates.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bloom_jax.cache import KVCache
from bloom_jax.config import BloomConfig
from bloom_jax.devices import accelerator
from bloom_jax.errors import BloomJaxError
from bloom_jax.losses import next_token_loss
from bloom_jax.model import make_model
from bloom_jax.recipe import TrainConfig
from bloom_jax.sharding import ShardingPlan, make_mesh, mesh_spec_sizes
from bloom_jax.train import make_optimizer, optimizer_shardings

TASKS = ("train", "forward", "generate")


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

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def fits(self, gib: float) -> bool:
        return self.total_bytes <= gib * 2**30


def plan_step(config: BloomConfig, mesh_spec: str, task: str, batch: int | None, seq: int,
              rules: str = "fsdp_tensor", remat_policy: str = "full") -> Plan:
    """Compiles one step for `config` on a mesh of this process's devices and returns its analysed memory.

    train: bf16 compute, fp32 master weights and AdamW state, activation checkpointing (`remat_policy`),
      state donated. forward: bf16 weights and compute, logits of every position. generate: one decode step
      with a bf16 KV cache of `seq` positions (donated), bf16 weights.
    """
    if task not in TASKS:
        raise BloomJaxError(f"plan: unknown task {task!r} (choose from {', '.join(TASKS)})")
    mesh = make_mesh(mesh_spec)
    batch = batch or mesh.shape["slice"] * mesh.shape["data"] * mesh.shape["fsdp"]  # one sequence per data shard
    training = task == "train"
    model = make_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float32 if training else jnp.bfloat16,
                       remat_policy=remat_policy if training else "none")
    # Generation at batch 1: every data shard sees the whole batch.
    sharding = ShardingPlan.create(mesh, rules).for_batch(batch)
    params = sharding.abstract_params(model)

    if training:
        optimizer = make_optimizer(TrainConfig.from_yaml("bloom-176b"))  # tr11's AdamW
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_shardings = optimizer_shardings(optimizer, opt_state, sharding.param_shardings(model), mesh)
        opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 opt_state, opt_shardings)
        # Windows of seq + 1 tokens: the model sees seq of them.
        tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32, sharding=sharding.batch_sharding())

        def step(p, state, tokens):
            loss, grads = jax.value_and_grad(lambda p: next_token_loss(model, p, tokens))(p)
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        fn = jax.jit(step, out_shardings=(sharding.param_shardings(model), opt_shardings, sharding.replicated),
                     donate_argnums=(0, 1))
        args = (params, opt_state, tokens)
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
    else:
        fn = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
        args = (params, jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharding.batch_sharding()))

    with sharding.context():
        compiled = fn.lower(*args).compile()
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Plan(task=task, devices=mesh.size, mesh=dict(mesh.shape), batch=batch, seq=seq,
                argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
                alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
                flops_per_device=float((cost or {}).get("flops", 0.0)))


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
        "per_device_gib": {name: round(value / gib, 3) for name, value in (
            ("arguments", plan.argument_bytes), ("outputs", plan.output_bytes), ("aliased", plan.alias_bytes),
            ("temporaries", plan.temp_bytes), ("total", plan.total_bytes))},
        "tflops_per_device": round(plan.flops_per_device / 1e12, 3),
    }
    if limit_gib is not None:
        out["limit_gib"] = limit_gib
        out["fits"] = plan.fits(limit_gib)
    return out
