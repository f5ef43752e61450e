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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import abstract_params, make_model
from bloom_jax.sharding import fit_batch, fit_rules, load_rules, make_mesh, mesh_spec_sizes, param_shardings
from bloom_jax.train import TrainConfig, make_optimizer, optimizer_shardings

# Device memory per chip, GiB.
ACCELERATORS = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32, "h100": 80, "a100-40gb": 40, "a100-80gb": 80}
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
    rule_set = fit_rules(load_rules(rules), mesh)
    training = task == "train"
    model = make_model(config, dtype=jnp.bfloat16, param_dtype=jnp.float32 if training else jnp.bfloat16,
                       remat_policy=remat_policy if training else "none")
    shardings = param_shardings(model, mesh, rule_set)
    params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(abstract_params(model)), shardings)
    rule_set = fit_batch(rule_set, mesh, batch)  # generation at batch 1: every data shard sees the whole batch
    batch_axes = dict(rule_set)["activation_batch"]
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=batch_sharding)

    def forward(p, ids_bs):
        return model.apply({"params": p}, ids_bs)

    if training:
        optimizer = make_optimizer(TrainConfig.from_yaml("bloom-176b"))  # tr11's AdamW
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_state = jax.eval_shape(optimizer.init, params)
        opt_shardings = optimizer_shardings(optimizer, opt_state, shardings, mesh)
        opt_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 opt_state, opt_shardings)

        def step(p, state, ids_bs):
            def loss_fn(p):
                logits = forward(p, ids_bs)[:, :-1]
                return optax.softmax_cross_entropy_with_integer_labels(logits, ids_bs[:, 1:]).mean()

            loss, grads = jax.value_and_grad(loss_fn)(p)
            updates, state = optimizer.update(grads, state, p)
            return optax.apply_updates(p, updates), state, loss

        fn = jax.jit(step, out_shardings=(shardings, opt_shardings, replicated), donate_argnums=(0, 1))
        args = (params, opt_state, ids)
    elif task == "generate":
        # One decode step of a batch whose KV cache holds `seq` positions (the memory high point of generation).
        from bloom_jax.generate import init_cache

        # Keys and values [layers, b*n, T, h], the merged axis sharded as the rules say.
        kv_spec = jax.sharding.PartitionSpec(None, dict(rule_set)["activation_batch_heads"], None, None)
        row_spec = jax.sharding.PartitionSpec(batch_axes)
        cache_shardings = {"k": kv_spec, "v": kv_spec, "mask": row_spec, "index": jax.sharding.PartitionSpec()}
        cache = jax.eval_shape(lambda: init_cache(config, batch, seq, jnp.bfloat16))
        cache = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                         sharding=jax.sharding.NamedSharding(mesh, cache_shardings[k]))
                 for k, v in cache.items()}
        token = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=batch_sharding)

        def decode(p, cache, token_b1):
            return model.apply({"params": p}, token_b1, cache=cache, last_only=True)

        fn = jax.jit(decode, donate_argnums=(1,))
        args = (params, cache, token)
    else:
        fn = jax.jit(forward)
        args = (params, ids)

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(rule_set)):
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
    key = device.lower().replace("tpu", "").replace(" ", "").strip("-")
    if key not in ACCELERATORS:
        raise BloomJaxError(f"plan: unknown device {device!r} (known: {', '.join(ACCELERATORS)})")
    return float(ACCELERATORS[key])


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
