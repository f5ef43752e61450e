"""The optimizer of a run: AdamW with warmup then cosine or linear decay, global-norm clipping, and no weight
decay on LayerNorms and biases; its state sharded like the parameters it mirrors."""

from __future__ import annotations

from typing import Any

import jax
import optax

from bloom_jax.lora import ADAPTER_LEAVES
from bloom_jax.recipe import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine or linear decay to `min_lr_ratio` of it at `steps`."""
    peak, decay_steps = cfg.learning_rate, max(1, cfg.steps - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, peak * cfg.min_lr_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for the weights that weight decay applies to: kernels, the embedding and LoRA adapters, not LayerNorms or
    biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding", *ADAPTER_LEAVES), params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The run's optimizer: gradients clipped to a global norm of `grad_clip`, then AdamW on
    `learning_rate_schedule(cfg)`, its weight decay on the `decay_mask` weights only."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )


def optimizer_shardings(optimizer: optax.GradientTransformation, opt_state: Any, param_shardings_: Any,
                        mesh: jax.sharding.Mesh) -> Any:
    """Optimizer state sharded like the parameters it mirrors (moments); scalars such as the step replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, s: s, opt_state, param_shardings_,
                                 transform_non_params=lambda _: replicated)
