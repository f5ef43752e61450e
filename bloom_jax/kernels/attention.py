"""Attention with ALiBi under BLOOM's masks: a reference that holds the scores [b, n, s, t], a blockwise one that
never does, cuDNN's fused attention on NVIDIA GPUs, and `flash`, the Pallas kernels of `bloom_jax.kernels.flash`
run per shard.

Both take queries [b, n, s, h] and keys and values [b, n, t, h] (or, from the KV cache, [b*n, t, h]: batch and
heads merged) with an `AttentionMask`: the key mask [b, t] and the key position of the first query. Query i sits at
key position `query_start + i` and sees the keys at or before it that are not padding; each key's ALiBi bias is
slope * (its position among the real tokens).

The reference computes as transformers does: fp32 scores, the dtype's most negative value at masked keys,
softmax, probabilities cast to the compute dtype, then the values. `blockwise` is online softmax over key blocks
for each query block (flash attention's recurrence, in XLA), with a hand-written backward pass that recomputes
each block's probabilities from the saved log-sum-exp: at 8 x 2048 with 16 heads the reference holds 2 GiB per
fp32 [b, n, s, t] buffer and layer, the blockwise one [b, n, block_q, block_k] (32 MiB at 512 x 512). `cudnn` is
`jax.nn.dot_product_attention`'s cuDNN flash attention, which takes BLOOM's bias only materialised: one
[b, n, s, t] array in the compute dtype per layer (1 GiB at 8 x 2048 x 16 heads in bfloat16), and applies only
where `cudnn_applies` says.
"""

from __future__ import annotations

import functools
import math

import flax.linen
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from bloom_jax.kernels import flash as flash_kernels

NEG = float(np.finfo(np.float32).min)  # what masked scores get, as transformers gives them


def alibi_slopes(n_head: int) -> np.ndarray:
    """ALiBi slope of each head, float32 [n], for any head count (BLOOM-176B has 112).

    With c the largest power of two <= n: base**1..base**c, then, if n > c, the first n - c odd powers of
    extra_base, where base = 2**(-(2**-(log2(c) - 3))) and extra_base is the same for 2c.
    """
    c = 2 ** math.floor(math.log2(n_head))
    base = np.float32(2 ** (-(2 ** -(math.log2(c) - 3))))
    slopes = base ** np.arange(1, c + 1, dtype=np.float32)
    if c != n_head:
        extra_base = np.float32(2 ** (-(2 ** -(math.log2(2 * c) - 3))))
        odd_powers = np.arange(1, 2 * (n_head - c), 2, dtype=np.float32)
        slopes = np.concatenate([slopes, extra_base**odd_powers])
    return slopes.astype(np.float32)


def alibi_positions(attention_mask: jax.Array) -> jax.Array:
    """Each key's ALiBi position, float32 [b, t]: its index among the real tokens (`cumsum(mask) - 1`), 0 at
    padding, so that left padding shifts nothing."""
    mask_bt = attention_mask.astype(jnp.int32)
    return ((jnp.cumsum(mask_bt, axis=-1) - 1) * mask_bt).astype(jnp.float32)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Each key's ALiBi position in a packed row, float32 [b, t], for segment ids [b, t] (k >= 1 for the tokens of
    the row's k-th example, each example's tokens together, 0 for padding): its index within its example, so that
    every example counts from 0 as it would alone; 0 at padding."""
    t = segment_ids.shape[-1]
    index_bt = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    starts_bt = jnp.where(segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1],
                          index_bt, 0)
    starts_bt = lax.cummax(starts_bt, axis=1)
    return ((index_bt - starts_bt) * (segment_ids > 0)).astype(jnp.float32)


def alibi_bias(attention_mask: jax.Array, n_head: int, segment_ids: jax.Array | None = None) -> jax.Array:
    """ALiBi bias per key, float32 [b, n, 1, t], for a key mask [b, t]: slope * position (within its example, given
    `segment_ids`). It does not depend on the query: softmax is invariant to a per-row constant."""
    slopes_n = jnp.asarray(alibi_slopes(n_head))
    positions_bt = alibi_positions(attention_mask) if segment_ids is None else segment_positions(segment_ids)
    return slopes_n[None, :, None, None] * positions_bt[:, None, None, :]


def causal_padding_mask(attention_mask: jax.Array, query_len: int | None = None,
                        query_start: jax.Array | int = 0, segment_ids: jax.Array | None = None) -> jax.Array:
    """Which keys each query may see, bool [b, 1, s, t], for a key mask [b, t]: earlier-or-same and not padding,
    and with `segment_ids` [b, t] (a packed row, without a cache) of the query's own example.

    Query i sits at key position `query_start + i` (0 and s == t without a cache; the cache index with one, which
    may be one per sequence [b]).
    """
    attention_mask_bt = attention_mask
    t = attention_mask_bt.shape[-1]
    query_pos_bs = jnp.reshape(query_start, (-1, 1)) + jnp.arange(t if query_len is None else query_len)
    causal_bst = jnp.arange(t)[None, None, :] <= query_pos_bs[:, :, None]
    allowed_b1st = causal_bst[:, None] & (attention_mask_bt[:, None, None, :] > 0)
    if segment_ids is not None:
        allowed_b1st = allowed_b1st & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return allowed_b1st


@flax.struct.dataclass
class AttentionMask:
    """What every layer's attention needs to know of the masks, built once per forward pass: the key mask [b, t]
    and the first query's key position, and for packed rows (several examples each, without a cache) their
    segment ids [b, t]; with `dense` (for the reference) also the ALiBi bias [b, n, 1, t] and the visibility
    [b, 1, s, t], shared by the layers."""

    key_mask: jax.Array  # int [b, t], 1 for real tokens
    query_start: jax.Array | int
    alibi: jax.Array | None = None  # float32 [b, n, 1, t]
    allowed: jax.Array | None = None  # bool [b, 1, s, t]
    segment_ids: jax.Array | None = None  # int [b, t]: k >= 1 for the row's k-th example, 0 for padding

    @classmethod
    def create(cls, key_mask: jax.Array, n_head: int, query_len: int, query_start: jax.Array | int = 0,
               dense: bool = True, segment_ids: jax.Array | None = None) -> AttentionMask:
        if not dense:
            return cls(key_mask, query_start, segment_ids=segment_ids)
        return cls(key_mask, query_start, alibi_bias(key_mask, n_head, segment_ids),
                   causal_padding_mask(key_mask, query_len, query_start, segment_ids), segment_ids)


def reference(q_bnsh: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype,
              dropout=None) -> jax.Array:
    """Context [b, n, s, h] through the full score matrix; `dropout`, when given, drops probabilities (a callable
    on [b, n, s, t]). Keys and values [b, n, t, h], or [b*n, t, h] from the cache."""
    b, n, s, h = q_bnsh.shape
    if mask.alibi is None:
        mask = AttentionMask.create(mask.key_mask, n, s, mask.query_start, segment_ids=mask.segment_ids)
    if k.ndim == 4:
        scores_bnst = jnp.einsum("bnsh,bnth->bnst", q_bnsh, k, preferred_element_type=jnp.float32)
    else:  # batch and heads merged, as the cache keeps them (bloom_jax.cache)
        scores_bnst = jnp.einsum("zsh,zth->zst", q_bnsh.reshape(b * n, s, h), k,
                                 preferred_element_type=jnp.float32).reshape(b, n, s, -1)
    scores_bnst = scores_bnst * (1.0 / math.sqrt(h)) + mask.alibi
    scores_bnst = jnp.where(mask.allowed, scores_bnst, NEG)
    probs_bnst = jax.nn.softmax(scores_bnst, axis=-1).astype(dtype)
    if dropout is not None:
        probs_bnst = dropout(probs_bnst)
    if k.ndim == 4:
        return jnp.einsum("bnst,bnth->bnsh", probs_bnst, v)
    return jnp.einsum("zst,zth->zsh", probs_bnst.reshape(b * n, s, -1), v).reshape(b, n, s, h)


def blockwise(q_bnsh: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype,
              block_q: int = 512, block_k: int = 512) -> jax.Array:
    """Context [b, n, s, h] by online softmax over blocks of `block_q` queries and `block_k` keys (both cut to the
    sequence when shorter); the reference's result, without its [b, n, s, t] buffers. Key blocks wholly after a
    query block's last position are skipped, forward and backward."""
    b, n, s, h = q_bnsh.shape
    if jnp.ndim(mask.query_start) > 0:
        raise ValueError("blockwise attention takes one first query position for the batch (a prefill chunk), not "
                         "one per sequence: decode steps take the reference")
    k_bnth, v_bnth = (x.reshape(b, n, -1, h) for x in (k, v))
    t = k_bnth.shape[2]
    bq, bk = min(block_q, s), min(block_k, t)
    slopes_n = jnp.asarray(alibi_slopes(n))
    segments = mask.segment_ids
    positions_bt = alibi_positions(mask.key_mask) if segments is None else segment_positions(segments)
    query_start = jnp.asarray(mask.query_start, jnp.int32)
    out = _blockwise(q_bnsh.astype(dtype), k_bnth.astype(dtype), v_bnth.astype(dtype),
                     mask.key_mask.astype(jnp.int32), positions_bt, slopes_n, query_start,
                     None if segments is None else segments.astype(jnp.int32), bq, bk)
    return out.astype(dtype)


# cuDNN's flash attention adds its masks as this bias (jax's `get_large_negative_number`): the dtype's most negative
# value trips a cuDNN bug when two of them are subtracted.
_CUDNN_MASKED = {jnp.dtype(jnp.bfloat16): -(2.0**41), jnp.dtype(jnp.float16): -(2.0**15)}


def cudnn_applies(q_bnsh: jax.Array, k: jax.Array, mask: AttentionMask, dtype) -> bool:
    """Whether `cudnn` takes these shapes: a whole sequence without a cache (s == t, static first position 0),
    keys [b, n, t, h], a head size cuDNN supports (a multiple of 8, at most 128: 256 needs Hopper), an even
    length (cuDNN's bias backward needs one) and bfloat16 or float16."""
    s, h = q_bnsh.shape[2], q_bnsh.shape[3]
    return (k.ndim == 4 and k.shape[2] == s and s % 2 == 0 and h % 8 == 0 and h <= 128
            and isinstance(mask.query_start, int) and mask.query_start == 0 and jnp.dtype(dtype) in _CUDNN_MASKED)


def relative_alibi_bias(key_mask: jax.Array, n_head: int, dtype, segment_ids: jax.Array | None = None) -> jax.Array:
    """BLOOM's bias and padding as one array [b, n, s, s] in `dtype`: slope * (key position - query position) at
    visible keys, a large negative number at padding and, in packed rows (`segment_ids`), at other examples' keys
    (causality is cuDNN's `is_causal`). Relative to the query, so that the values near the diagonal, which
    dominate the softmax, are small and exact in bfloat16 (slope * key position alone reaches 1023 at 2048 tokens,
    where bfloat16 steps by 4); softmax does not see the shift."""
    positions_bt = alibi_positions(key_mask) if segment_ids is None else segment_positions(segment_ids)
    slopes_n = jnp.asarray(alibi_slopes(n_head))
    relative_bnst = slopes_n[None, :, None, None] * (positions_bt[:, None, None, :] - positions_bt[:, None, :, None])
    visible_bnst = (key_mask > 0)[:, None, None, :]
    if segment_ids is not None:
        visible_bnst = visible_bnst & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    masked = _CUDNN_MASKED.get(jnp.dtype(dtype), NEG)
    return jnp.where(visible_bnst, relative_bnst, masked).astype(dtype)


def cudnn(q_bnsh: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype,
          implementation: str = "cudnn") -> jax.Array:
    """Context [b, n, s, h] by `jax.nn.dot_product_attention` (`implementation` "cudnn"; "xla" runs the same
    call on any backend, for tests), causal, with `relative_alibi_bias` as the bias. Only where
    `cudnn_applies`."""
    b, n, s, h = q_bnsh.shape
    bias_bnst = lax.stop_gradient(relative_alibi_bias(mask.key_mask, n, dtype, mask.segment_ids))
    q_bsnh, k_bsnh, v_bsnh = (jnp.swapaxes(x.astype(dtype), 1, 2) for x in (q_bnsh, k, v))
    out_bsnh = jax.nn.dot_product_attention(q_bsnh, k_bsnh, v_bsnh, bias=bias_bnst, is_causal=True,
                                            implementation=implementation)
    return jnp.swapaxes(out_bsnh, 1, 2).astype(dtype)


def flash(q_bnsh: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask, dtype, backend: str = "tpu",
          blocks: tuple[int, int] | None = None, interpret: bool = False) -> jax.Array:
    """Context [b, n, s, h] by the Pallas kernel of `backend` ("tpu" or "gpu"), with `blocks` (query, key) or its
    defaults; the first query position may be one per sequence. Under a mesh (`jax.set_mesh`) the kernel runs
    per shard: a Pallas call is opaque to the partitioner, so `shard_map` splits the batch and the heads as the
    logical rules in context split `activation_batch` and `activation_heads`, and the slopes with the heads."""
    b, n, s, h = q_bnsh.shape
    k_bnth, v_bnth = (x.reshape(b, n, -1, h).astype(dtype) for x in (k, v))
    block_q, block_k = blocks or (None, None)
    call = functools.partial(flash_kernels.flash_attention, causal=True, block_q=block_q, block_k=block_k,
                             backend=backend, interpret=interpret)
    segments = mask.segment_ids
    positions_bt = (alibi_positions(mask.key_mask) if segments is None else segment_positions(segments))
    offset_b = jnp.broadcast_to(jnp.asarray(mask.query_start, jnp.int32), (b,))
    slopes_n = jnp.asarray(alibi_slopes(n))
    out = _per_shard(call, q_bnsh.astype(dtype), k_bnth, v_bnth, slopes_n, positions_bt.astype(jnp.int32),
                     mask.key_mask, offset_b, segments)
    return out.astype(dtype)


def _per_shard(call, q_bnsh, k_bnth, v_bnth, slopes_n, positions_bt, valid_bt, offset_b, segments_bt=None):
    """`call` on each shard of the context mesh (directly without one): batch over the mesh axes of
    `activation_batch`, heads over those of `activation_heads`, each where it divides (else replicated);
    `segments_bt` (packed rows) split as the rows."""
    packed = segments_bt is not None

    def per_shard(q, k, v, slopes, positions, valid, offset, *segments):
        return call(q, k, v, slopes, positions, valid, offset, segment_ids_bt=segments[0] if packed else None)

    args = (q_bnsh, k_bnth, v_bnth, slopes_n, positions_bt, valid_bt, offset_b, *([segments_bt] if packed else []))
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return per_shard(*args)
    b, n = q_bnsh.shape[:2]
    batch, heads = (_dividing_axes(name, size, mesh) for name, size in (("activation_batch", b),
                                                                      ("activation_heads", n)))
    qkv = P(batch, heads, None, None)
    rows = P(batch, None)
    specs = (qkv, qkv, qkv, P(heads), rows, rows, P(batch), *([rows] if packed else []))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=specs, out_specs=qkv, check_vma=False)(*args)


def _dividing_axes(logical: str, size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes that the logical rules in context give `logical`, if their product divides `size`."""
    axes = flax.linen.logical_to_mesh_axes((logical,))[0]
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)
    return axes if axes and size % math.prod(mesh.shape[a] for a in axes) == 0 else None


# -- blockwise: forward and backward over padded blocks -------------------------------------------------------------
def _key_block(keys, ki, bk, q_blk, slopes_n, query_pos, query_segments=None):
    """Key block `ki` of the padded keys: (its keys, its values, the scores float32 [b, n, bq, bk] of `q_blk`
    against them with ALiBi, masked keys at NEG: padding, keys after the query, and, given `query_segments`
    [b, bq], another example's)."""
    kp, vp, maskp, posp, segp = keys
    k_blk = lax.dynamic_slice_in_dim(kp, ki * bk, bk, axis=2)
    v_blk = lax.dynamic_slice_in_dim(vp, ki * bk, bk, axis=2)
    key_mask_bk = lax.dynamic_slice_in_dim(maskp, ki * bk, bk, axis=1)
    positions_bk = lax.dynamic_slice_in_dim(posp, ki * bk, bk, axis=1)
    h = q_blk.shape[-1]
    scores = jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(h)) + slopes_n[None, :, None, None] * positions_bk[:, None, None, :]
    key_pos_k = ki * bk + jnp.arange(bk)
    allowed = (key_pos_k[None, :] <= query_pos[:, None])[None, None] & (key_mask_bk[:, None, None, :] > 0)
    if query_segments is not None:
        segments_bk = lax.dynamic_slice_in_dim(segp, ki * bk, bk, axis=1)
        allowed = allowed & (query_segments[:, None, :, None] == segments_bk[:, None, None, :])
    return k_blk, v_blk, jnp.where(allowed, scores, NEG)


def _padded_keys(k, v, key_mask, positions, segments, bk):
    """Keys, values, key mask, ALiBi positions and segment ids (or None) padded to whole blocks of `bk` (padding
    masked off)."""
    padded = tuple(flash_kernels.pad_to(x, axis, bk) for x, axis in ((k, 2), (v, 2), (key_mask, 1), (positions, 1)))
    return (*padded, None if segments is None else flash_kernels.pad_to(segments, 1, bk))


def _query_segments(segments, qi, bq, query_start):
    """The segment ids [b, bq] of query block `qi` (queries are the keys, without a cache), or None."""
    if segments is None:
        return None
    return lax.dynamic_slice_in_dim(flash_kernels.pad_to(segments, 1, bq), query_start + qi * bq, bq, axis=1)


def _key_blocks_seen(qi, bq, bk, query_start, n_kblocks):
    """How many key blocks query block `qi` sees (the causal bound: keys after its last query are never seen)."""
    last_query_pos = query_start + (qi + 1) * bq - 1
    return jnp.clip(last_query_pos // bk + 1, 1, n_kblocks)


def _blockwise_forward(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk):
    """(out [b, n, s, h] in q's dtype, log-sum-exp float32 [b, n, s]) over padded blocks."""
    b, n, s, h = q.shape
    qp = flash_kernels.pad_to(q, 2, bq)
    keys = _padded_keys(k, v, key_mask, positions, segments, bk)
    n_qblocks, n_kblocks = qp.shape[2] // bq, keys[0].shape[2] // bk

    def query_block(qi):
        q_blk = lax.dynamic_slice_in_dim(qp, qi * bq, bq, axis=2)
        query_pos = query_start + qi * bq + jnp.arange(bq)
        query_segments = _query_segments(segments, qi, bq, query_start)

        def key_block(ki, carry):
            m, l, acc = carry
            _, v_blk, scores = _key_block(keys, ki, bk, q_blk, slopes_n, query_pos, query_segments)
            m_new = jnp.maximum(m, jnp.max(scores, axis=-1))
            p = jnp.exp(scores - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[..., None] + jnp.einsum("bnqk,bnkh->bnqh", p.astype(v.dtype), v_blk,
                                                           preferred_element_type=jnp.float32)
            return m_new, l, acc

        init = (jnp.full((b, n, bq), -jnp.inf, jnp.float32), jnp.zeros((b, n, bq), jnp.float32),
                jnp.zeros((b, n, bq, h), jnp.float32))
        m, l, acc = lax.fori_loop(0, _key_blocks_seen(qi, bq, bk, query_start, n_kblocks), key_block, init)
        return acc / l[..., None], m + jnp.log(l)

    out, lse = lax.map(query_block, jnp.arange(n_qblocks))  # [nq, b, n, bq, h], [nq, b, n, bq]
    out = jnp.moveaxis(out, 0, 2).reshape(b, n, n_qblocks * bq, h)[:, :, :s]
    lse = jnp.moveaxis(lse, 0, 2).reshape(b, n, n_qblocks * bq)[:, :, :s]
    return out.astype(q.dtype), lse


def _blockwise_backward(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk, out, lse, d_out):
    """(dq, dk, dv): each block's probabilities recomputed from the saved log-sum-exp, never the whole matrix."""
    b, n, s, h = q.shape
    t = k.shape[2]
    scale = 1.0 / math.sqrt(h)
    # delta_i = sum_j p_ij dp_ij = d_out_i . out_i (the softmax backward's row term)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    qp, dop = flash_kernels.pad_to(q, 2, bq), flash_kernels.pad_to(d_out, 2, bq)
    lsep, deltap = flash_kernels.pad_to(lse, 2, bq), flash_kernels.pad_to(delta, 2, bq)
    keys = _padded_keys(k, v, key_mask, positions, segments, bk)
    n_qblocks, n_kblocks = qp.shape[2] // bq, keys[0].shape[2] // bk

    def query_block(qi, carry):
        dk_acc, dv_acc, dq_all = carry
        q_blk = lax.dynamic_slice_in_dim(qp, qi * bq, bq, axis=2)
        do_blk = lax.dynamic_slice_in_dim(dop, qi * bq, bq, axis=2)
        lse_blk = lax.dynamic_slice_in_dim(lsep, qi * bq, bq, axis=2)
        delta_blk = lax.dynamic_slice_in_dim(deltap, qi * bq, bq, axis=2)
        query_pos = query_start + qi * bq + jnp.arange(bq)
        query_segments = _query_segments(segments, qi, bq, query_start)

        def key_block(ki, inner):
            dq_blk, dk_acc, dv_acc = inner
            k_blk, v_blk, scores = _key_block(keys, ki, bk, q_blk, slopes_n, query_pos, query_segments)
            p = jnp.exp(scores - lse_blk[..., None])  # float32 [b, n, bq, bk]
            dv_blk = jnp.einsum("bnqk,bnqh->bnkh", p.astype(do_blk.dtype), do_blk,
                                preferred_element_type=jnp.float32)
            dp = jnp.einsum("bnqh,bnkh->bnqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            ds_c = ds.astype(q.dtype)
            dq_blk = dq_blk + jnp.einsum("bnqk,bnkh->bnqh", ds_c, k_blk, preferred_element_type=jnp.float32)
            dk_blk = jnp.einsum("bnqk,bnqh->bnkh", ds_c, q_blk, preferred_element_type=jnp.float32)
            dk_acc = lax.dynamic_update_slice_in_dim(
                dk_acc, lax.dynamic_slice_in_dim(dk_acc, ki * bk, bk, axis=2) + dk_blk, ki * bk, axis=2)
            dv_acc = lax.dynamic_update_slice_in_dim(
                dv_acc, lax.dynamic_slice_in_dim(dv_acc, ki * bk, bk, axis=2) + dv_blk, ki * bk, axis=2)
            return dq_blk, dk_acc, dv_acc

        init = (jnp.zeros((b, n, bq, h), jnp.float32), dk_acc, dv_acc)
        dq_blk, dk_acc, dv_acc = lax.fori_loop(0, _key_blocks_seen(qi, bq, bk, query_start, n_kblocks), key_block,
                                               init)
        dq_all = lax.dynamic_update_slice_in_dim(dq_all, dq_blk, qi * bq, axis=2)
        return dk_acc, dv_acc, dq_all

    zeros_k = jnp.zeros(keys[0].shape, jnp.float32)
    dk, dv, dq = lax.fori_loop(0, n_qblocks, query_block,
                               (zeros_k, zeros_k, jnp.zeros(qp.shape, jnp.float32)))
    return (dq[:, :, :s].astype(q.dtype), dk[:, :, :t].astype(k.dtype), dv[:, :, :t].astype(v.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _blockwise(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk):
    return _blockwise_forward(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk)[0]


def _blockwise_fwd(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk):
    out, lse = _blockwise_forward(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk)
    return out, (q, k, v, key_mask, positions, slopes_n, query_start, segments, out, lse)


def _blockwise_bwd(bq, bk, residuals, d_out):
    q, k, v, key_mask, positions, slopes_n, query_start, segments, out, lse = residuals
    dq, dk, dv = _blockwise_backward(q, k, v, key_mask, positions, slopes_n, query_start, segments, bq, bk, out,
                                     lse, d_out)
    # The masks, positions, slopes and segments are data, not parameters: no gradient flows to them.
    return (dq, dk, dv, np.zeros(key_mask.shape, jax.dtypes.float0), jnp.zeros_like(positions),
            jnp.zeros_like(slopes_n), np.zeros((), jax.dtypes.float0),
            None if segments is None else np.zeros(segments.shape, jax.dtypes.float0))


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


IMPLEMENTATIONS = {"reference": reference, "blockwise": blockwise, "cudnn": cudnn, "flash": flash}

__all__ = ["AttentionMask", "IMPLEMENTATIONS", "alibi_bias", "alibi_positions", "alibi_slopes",
           "blockwise", "causal_padding_mask", "cudnn", "cudnn_applies", "flash", "reference", "relative_alibi_bias",
           "segment_positions"]
