"""The train state, {"step", "params", "opt_state"}: its shapes with their shardings, the state a run starts from
(new or `init_from`'s parameters, born sharded), and a LoRA run's frozen base.

With LoRA the state's parameters are the adapters alone: gradients, AdamW moments and checkpoints hold only
them, and the base of `init_from` is frozen in `lora.base`'s format, beside the state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from bloom_jax.checkpoints import from_pretrained
from bloom_jax.log import get_logger
from bloom_jax.lora import split_adapters
from bloom_jax.model import BloomForCausalLM, init_params
from bloom_jax.quantize import quantize_base
from bloom_jax.recipe import TrainConfig
from bloom_jax.sharding import ShardingPlan
from bloom_jax.train.optimizer import optimizer_shardings

log = get_logger(__name__)


def abstract_train_state(model: BloomForCausalLM, optimizer: optax.GradientTransformation, plan: ShardingPlan,
                         lora: bool) -> tuple[dict, dict | None]:
    """The train state's shapes and dtypes, each with its sharding (optimizer moments as their parameters), and
    a LoRA run's frozen base likewise (None otherwise)."""
    params, frozen = plan.abstract_params(model), None
    param_shardings = plan.param_shardings(model)
    if lora:
        frozen, params = split_adapters(params)
        param_shardings = split_adapters(param_shardings)[1]
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = optimizer_shardings(optimizer, opt_state, param_shardings, plan.mesh)
    opt_state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                             opt_state, opt_shardings)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=plan.replicated)
    return {"step": step, "params": params, "opt_state": opt_state}, frozen


def pretrained_params(cfg: TrainConfig, init_from: str, plan: ShardingPlan, param_dtype) -> dict:
    """`init_from`'s parameters, restored straight into the rules' shardings (outside the mesh context)."""
    return from_pretrained(init_from, mesh=plan.mesh, dtype=cfg.compute_dtype, param_dtype=param_dtype,
                           rules=plan.rules, scan_layers=cfg.scan_layers)[1]


def initial_train_state(cfg: TrainConfig, model: BloomForCausalLM, optimizer: optax.GradientTransformation,
                        plan: ShardingPlan, state_shardings: dict, init_from: str | None, lora: bool) -> dict:
    """Step 0, placed by `state_shardings`: new adapters (LoRA), `init_from`'s parameters, or new parameters from
    `cfg.seed`; and a new optimizer state."""
    if init_from is not None and not lora:
        params = pretrained_params(cfg, init_from, plan, cfg.param_dtype)
    with plan.context():
        if lora:  # new adapters (jit drops the base's initialisation: only they are out)
            params = jax.jit(lambda: split_adapters(init_params(model, jax.random.key(cfg.seed)))[1],
                             out_shardings=state_shardings["params"])()
        elif init_from is None:
            params = jax.jit(lambda: init_params(model, jax.random.key(cfg.seed)),
                             out_shardings=state_shardings["params"])()
        opt_state = jax.jit(optimizer.init, out_shardings=state_shardings["opt_state"])(params)
    return {"step": jax.device_put(jnp.int32(0), state_shardings["step"]), "params": params,
            "opt_state": opt_state}


def frozen_base(cfg: TrainConfig, init_from: str, plan: ShardingPlan, shardings: dict, base_dtype: str,
                frozen_weights: str | None) -> dict:
    """A LoRA run's base from `init_from`: `base_dtype` floats, their linear layers quantized to `frozen_weights`
    (int8, nf4) if given, placed by `shardings`."""
    base = pretrained_params(cfg, init_from, plan, base_dtype)
    if frozen_weights is None:
        return base
    log.info(f"quantizing the base's linear layers to {frozen_weights}")
    return quantize_base(base, frozen_weights, shardings, consume=True)
