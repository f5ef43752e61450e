"""One optimizer step: the loss and gradients of `grad_accum` micro-batches (a `lax.scan`), then one update; its
health (the first step that was not finite) and the peak FLOP/s its MFU is measured against.

Mixed precision is the model's: `compute_dtype` activations and matmuls, `param_dtype` master weights and
optimizer state. The dropout key of step k is `fold_in(key(seed), k)`, so a restored state continues the
uninterrupted run.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bloom_jax import devices
from bloom_jax.lora import merge_trees
from bloom_jax.losses import LOSS_CHUNK_TOKENS, next_token_loss
from bloom_jax.model import BloomForCausalLM
from bloom_jax.recipe import TrainConfig


def train_step(model: BloomForCausalLM, optimizer: optax.GradientTransformation, grad_accum: int, seed: int,
               dropout: bool, state: dict, tokens: jax.Array,
               loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, frozen: dict | None = None,
               loss_mask: jax.Array | None = None, segment_ids: jax.Array | None = None) -> tuple[dict, dict]:
    """One optimizer step on a global batch of token windows [b, s + 1], split into `grad_accum` equal
    micro-batches whose gradients add up to those of the whole batch. Returns the new state and metrics. The loss
    is the mean over every target, or with `loss_mask` (float [b, s], 1 on the targets that count: a
    completion-only loss) the mean over the targets it marks in the whole batch, as TRL computes it. With
    `segment_ids` (int [b, s + 1]) each row packs several examples, each attending only to itself. With `frozen`
    (a LoRA run's base weights) `state["params"]` are the adapters: the model runs on both, and only the adapters
    get gradients and updates."""
    tokens_bs1 = tokens
    batch = tokens_bs1.shape[0]
    micro_mbs1 = tokens_bs1.reshape(grad_accum, batch // grad_accum, tokens_bs1.shape[1])
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]
    if loss_mask is None:  # each micro-batch's mean; their gradients averaged below
        weights_mbs = None
    else:  # each target weighs 1 / (the targets marked in the whole batch); the micro-batches' gradients add up
        weights_bs = loss_mask.astype(jnp.float32) / jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
        weights_mbs = weights_bs.reshape(grad_accum, batch // grad_accum, weights_bs.shape[1])
    segments_mbs1 = None if segment_ids is None else segment_ids.reshape(micro_mbs1.shape)

    def micro_step(grad_sum, inputs):
        tokens, weights, segments, index = inputs
        rng = jax.random.fold_in(step_key, index) if dropout else None
        def loss_of(trained):
            everything = trained if frozen is None else merge_trees(frozen, trained)
            return next_token_loss(model, everything, tokens, rng, loss_chunk_tokens, weights, segments)

        loss, grads = jax.value_and_grad(loss_of)(params)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = lax.scan(micro_step, zeros, (micro_mbs1, weights_mbs, segments_mbs1, jnp.arange(grad_accum)))
    if loss_mask is None:
        grads, loss = jax.tree.map(lambda g: g / grad_accum, grad_sum), losses.mean()
    else:
        grads, loss = grad_sum, losses.sum()
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = optax.global_norm(grads)
    # A finite loss can still come with non-finite gradients or weights; no such state may be checkpointed.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(new_params))
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


@jax.jit
def note_health(health: dict, step_metrics: dict, step: int) -> dict:
    """`health` ({"bad_step": the first non-finite step, 0 for none, "bad_loss": its loss}) with `step` recorded
    if it is the first non-finite one, from `train_step`'s metrics of that step."""
    first = (health["bad_step"] == 0) & ~step_metrics["finite"]
    return {"bad_step": jnp.where(first, jnp.int32(step), health["bad_step"]),
            "bad_loss": jnp.where(first, step_metrics["loss"], health["bad_loss"])}


def peak_flops_per_device(cfg: TrainConfig) -> float:
    """Per-device peak FLOP/s for MFU: the config's, a known accelerator's (bf16 dense), or an fp32 matmul
    measured now on CPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    known = devices.peak_tflops(jax.devices()[0].device_kind)
    if known is not None:
        return known * 1e12
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(3):
        matmul(a, a).block_until_ready()
    return 3 * 2 * n**3 / (time.perf_counter() - start) / max(1, jax.local_device_count())
