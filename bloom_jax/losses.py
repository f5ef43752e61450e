"""The language-modelling objective: next-token cross-entropy, the one loss that training, evaluation, the
`forward` command and the memory planner all compute.

The tied head is applied inside the loss, a chunk of positions at a time, so that the logits [b, s, V] never
exist whole: at 8 x 2048 with BLOOM's 250,880-token vocabulary they are 15.3 GiB in float32, more than a TPU v5e
chip has. Each chunk's logits give its loss and, when differentiated, its gradients at once (softmax minus the
one-hot target is known in the forward pass), so nothing is recomputed: the same matmuls as the plain path, with
[b, c, V] alive instead of [b, s, V].
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bloom_jax.model import BloomForCausalLM

# Tokens per chunk on each device: the chunk's float32 logits are then 1024 x 250,880 x 4 B = 0.96 GiB, and its
# products are large enough to keep a chip's matrix units busy.
LOSS_CHUNK_TOKENS = 1024
_LOGITS_AXES = ("activation_batch", "activation_length", "activation_vocab")


def next_token_loss(model: BloomForCausalLM, params: Any, tokens: jax.Array,
                    dropout_rng: jax.Array | None = None, chunk_tokens: int = LOSS_CHUNK_TOKENS,
                    weights: jax.Array | None = None, segment_ids: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1], for token windows int [b, s + 1]: the mean
    over every target, or with `weights` (float [b, s], one per target) the weighted sum: the mean over the
    targets that count when they weigh 1 / their number (a completion-only loss: 0 on prompts and padding).
    `segment_ids` int [b, s + 1]: rows that pack several examples (see `BloomForCausalLM`), each attending only
    to itself. Dropout runs when `dropout_rng` is given. The logits are made `chunk_tokens` tokens per device at a
    time (`tied_head_cross_entropy`); all at once when they are no more than that."""
    inputs_bs, targets_bs = tokens[:, :-1], tokens[:, 1:]
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    packed = {} if segment_ids is None else {"segment_ids": segment_ids[:, :-1]}
    b, s = targets_bs.shape
    positions = max(1, min(s, chunk_tokens * _batch_shards(b) // b))
    if positions == s:  # one chunk would save nothing: the plain path, the program XLA:CPU runs fastest
        logits_bsv = model.apply({"params": params}, inputs_bs, deterministic=dropout_rng is None, rngs=rngs,
                                 **packed)
        ce_bs = optax.softmax_cross_entropy_with_integer_labels(logits_bsv, targets_bs)
        return ce_bs.mean() if weights is None else jnp.sum(ce_bs * weights)
    hidden_bsd = model.apply({"params": params}, inputs_bs, deterministic=dropout_rng is None, rngs=rngs,
                             return_hidden=True, **packed)
    table_vd = params["word_embeddings"]["embedding"].astype(model.dtype)
    return tied_head_cross_entropy(hidden_bsd, table_vd, targets_bs, positions, weights)


def tied_head_cross_entropy(hidden: jax.Array, table: jax.Array, targets: jax.Array, chunk: int,
                            weights: jax.Array | None = None) -> jax.Array:
    """Cross-entropy, float32 [], of logits = hidden [b, s, d] . table [V, d]^T (accumulated in float32) against
    targets int [b, s], computed `chunk` positions at a time: the mean, or with `weights` float [b, s] the
    weighted sum; differentiable in `hidden` and `table`."""
    b, s = targets.shape
    # Each token weighs 1 / (b s), as in the mean whose gradient autodiff would take (the same roundings).
    weights = jnp.full((b, s), 1.0 / (b * s), jnp.float32) if weights is None else weights.astype(jnp.float32)
    return _weighted_cross_entropy(hidden, table, targets, weights, chunk)


def _batch_shards(batch: int) -> int:
    """How many ways the current mesh and logical rules split a batch of `batch` rows (1 outside them)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = dict(nn.get_logical_axis_rules()).get("activation_batch")
    if mesh.empty or axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    shards = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
    return shards if batch % shards == 0 else 1


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """[b, s, ...] as [s / chunk, b, chunk, ...], s padded up with zeros."""
    b, s = x.shape[:2]
    extra = -s % chunk
    if extra:
        x = jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=0)
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)


def _chunk_terms(hidden_bcd, table_vd, targets_bc, weight_bc, with_gradients: bool, table_gradient: bool = True):
    """One chunk: its weighted loss, and (`with_gradients`) the gradients of that weighted sum, d_hidden float32
    [b, c, d] and (`table_gradient`) d_table float32 [V, d]."""
    logits_bcv = jnp.einsum("bcd,vd->bcv", hidden_bcd, table_vd, preferred_element_type=jnp.float32)
    logits_bcv = nn.with_logical_constraint(logits_bcv, _LOGITS_AXES)
    lse_bc = jax.nn.logsumexp(logits_bcv, axis=-1)
    picked_bc = jnp.take_along_axis(logits_bcv, targets_bc[..., None], axis=-1)[..., 0]
    loss = jnp.sum((lse_bc - picked_bc) * weight_bc)
    if not with_gradients:
        return loss, None, None
    one_hot_bcv = jax.nn.one_hot(targets_bc, table_vd.shape[0], dtype=jnp.float32)
    d_logits_bcv = (jnp.exp(logits_bcv - lse_bc[..., None]) - one_hot_bcv) * weight_bc[..., None]
    d_logits_bcv = d_logits_bcv.astype(hidden_bcd.dtype)  # as autodiff casts the cotangent of a mixed matmul
    d_hidden_bcd = jnp.einsum("bcv,vd->bcd", d_logits_bcv, table_vd, preferred_element_type=jnp.float32)
    if not table_gradient:
        return loss, d_hidden_bcd, None
    d_table_vd = jnp.einsum("bcv,bcd->vd", d_logits_bcv, hidden_bcd, preferred_element_type=jnp.float32)
    return loss, d_hidden_bcd, d_table_vd


def _scan_chunks(hidden, table, targets, weight_bs, chunk, with_gradients, table_gradient=True):
    """(weighted loss, d_hidden [b, s, d] or None, d_table [V, d] or None) over all chunks; d_table only with
    `table_gradient` (a frozen table, as in LoRA, needs none: 3.8 GiB of float32 for bloom-7b1's). The chunks'
    padding positions weigh 0."""
    b, s, d = hidden.shape
    table_gradient = with_gradients and table_gradient
    if chunk >= s:  # one chunk: no loop (which would keep XLA from fusing across the chunk's edges)
        return _chunk_terms(hidden, table, targets, weight_bs, with_gradients, table_gradient)
    xs = (_chunked(hidden, chunk), _chunked(targets, chunk), _chunked(weight_bs, chunk))

    def body(carry, x):
        total, d_table = carry
        loss, d_hidden, d_table_chunk = _chunk_terms(x[0], table, x[1], x[2], with_gradients, table_gradient)
        if table_gradient:
            d_table = d_table + d_table_chunk
        return (total + loss, d_table), d_hidden

    d_table0 = jnp.zeros(table.shape, jnp.float32) if table_gradient else None
    (total, d_table), d_hidden = lax.scan(body, (jnp.float32(0), d_table0), xs)
    if with_gradients:
        d_hidden = jnp.moveaxis(d_hidden, 0, 1).reshape(b, -1, d)[:, :s]
    return total, d_hidden, d_table


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_cross_entropy(hidden, table, targets, weights, chunk):
    return _scan_chunks(hidden, table, targets, weights, chunk, with_gradients=False)[0]


def _weighted_cross_entropy_fwd(hidden, table, targets, weights, chunk):
    # symbolic_zeros: each input comes with `perturbed`, whether it is differentiated; a frozen table is not.
    total, d_hidden, d_table = _scan_chunks(hidden.value, table.value, targets.value, weights.value, chunk,
                                            with_gradients=True, table_gradient=table.perturbed)
    # Empty arrays carry the inputs' dtypes (residuals must be arrays); the shapes are static.
    dtypes = (jnp.zeros((0,), hidden.value.dtype), jnp.zeros((0,), table.value.dtype))
    return total, (d_hidden, d_table, dtypes, targets.value.shape)


def _weighted_cross_entropy_bwd(chunk, residuals, g):
    d_hidden, d_table, (hidden_dtype, table_dtype), targets_shape = residuals
    del chunk
    d_table = (g * d_table).astype(table_dtype.dtype) if d_table is not None else None  # None: a symbolic zero
    # The weights are data (not differentiated): a symbolic zero.
    return ((g * d_hidden).astype(hidden_dtype.dtype), d_table, np.zeros(targets_shape, jax.dtypes.float0), None)


_weighted_cross_entropy.defvjp(_weighted_cross_entropy_fwd, _weighted_cross_entropy_bwd, symbolic_zeros=True)


__all__ = ["LOSS_CHUNK_TOKENS", "next_token_loss", "tied_head_cross_entropy"]
