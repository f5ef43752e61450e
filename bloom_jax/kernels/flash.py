"""Flash attention with BLOOM's ALiBi built inside the kernel, in Pallas: one kernel for TPUs (Mosaic), one for
NVIDIA GPUs (Triton), forward and backward, sharing their reference, masks and block arithmetic.

BLOOM's bias is `slope[head] * position[key]`, a rank-one term: the kernels build each [block_q, block_k] tile of
it in registers from the n slopes and t positions, where a bias operand would be n * s * t numbers read from memory
(the Pallas TPU `flash_attention` and cuDNN take only that; splash attention takes no bias at all).

Inputs, for q [b, n, s, h] and k, v [b, n, t, h]:
- `slopes_n` float32 [n]: the ALiBi slopes of the heads this call holds. Under tensor parallelism a shard holds
  heads n0..n1 and must use slopes n0..n1 (`bloom_jax.kernels.attention.flash` passes them sharded like the
  heads).
- `key_positions_bt` int32 [b, t]: each key's ALiBi position, counting real tokens (0 for the first real one, so
  that left padding shifts nothing); `key_valid_bt` [b, t]: 1 for real keys.
- `query_offset_b` int32 [b] (or a scalar): the key index of the first query; query i sees keys at indices
  <= offset + i (a prefill chunk attending to a cache has offset = the tokens already cached).
- `segment_ids_bt` int32 [b, t] (optional; queries are the keys, s == t, offset 0): rows that pack several
  examples, k >= 1 for the k-th example's tokens; a query sees only keys of its own example.

Scores are `q.k / sqrt(h) + slope * position` in float32, masked keys at float32's most negative value (as the
reference and transformers), softmax statistics kept in float32, probabilities cast to the values' dtype for the
second matmul. The backward pass recomputes each tile's probabilities from the saved log-sum-exp (FlashAttention-2):
nothing of size s * t is ever stored. Key blocks wholly after a query block's last position are skipped (causal),
and on TPU not even fetched.

A query row that sees no key (a left-padding query) gets an unspecified output, as it does in every
implementation here; the tests compare real queries.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

NEG = float(np.finfo(np.float32).min)
BACKENDS = ("tpu", "gpu")
# Block sizes when not given: TPU blocks are multiples of 128 (the lanes), and 512 x 512 float32 scores are 1 MiB
# of the v5e's 16 MiB scoped VMEM; Triton keeps a tile in registers, where 64 x 64 leaves room for h = 128.
DEFAULT_BLOCKS = {"tpu": (512, 512), "gpu": (64, 64)}


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """The static part of a call: hashable, a `custom_vjp` non-differentiable argument."""

    causal: bool
    block_q: int
    block_k: int
    backend: str
    interpret: bool
    scale: float
    segments: bool = False  # packed rows: the kernels take segment ids and mask other examples' keys


def reference(q_bnsh, k_bnth, v_bnth, slopes_n, key_positions_bt, key_valid_bt, query_offset_b,
              causal: bool = True, segment_ids_bt=None):
    """The same attention through the whole score matrix [b, n, s, t] (float32), for tests and as the
    definition of what the kernels compute."""
    b, n, s, h = q_bnsh.shape
    t = k_bnth.shape[2]
    scores = jnp.einsum("bnsh,bnth->bnst", q_bnsh, k_bnth, preferred_element_type=jnp.float32) / math.sqrt(h)
    scores = scores + slopes_n[None, :, None, None] * key_positions_bt[:, None, None, :].astype(jnp.float32)
    allowed = jnp.broadcast_to(key_valid_bt[:, None, None, :] > 0, (b, 1, s, t))
    if causal:
        query_pos_bs = jnp.reshape(jnp.asarray(query_offset_b, jnp.int32), (-1, 1)) + jnp.arange(s)
        allowed = allowed & (jnp.arange(t)[None, None, None, :] <= query_pos_bs[:, None, :, None])
    if segment_ids_bt is not None:
        allowed = allowed & (segment_ids_bt[:, None, :s, None] == segment_ids_bt[:, None, None, :])
    probs = jax.nn.softmax(jnp.where(allowed, scores, NEG), axis=-1).astype(v_bnth.dtype)
    return jnp.einsum("bnst,bnth->bnsh", probs, v_bnth)


def flash_attention(q_bnsh, k_bnth, v_bnth, slopes_n, key_positions_bt, key_valid_bt, query_offset_b=0, *,
                    causal: bool = True, block_q: int | None = None, block_k: int | None = None,
                    backend: str = "tpu", interpret: bool = False, segment_ids_bt=None):
    """Attention context [b, n, s, h] in q's dtype (see the module's docstring for the inputs), differentiable in
    q, k and v. `backend` "tpu" (Mosaic; its kernels see q, k, v transposed, [b, n, h, s], which XLA folds into
    their neighbours) or "gpu" (Triton); `interpret` runs either kernel on any backend (slowly: for tests).
    Blocks are cut to the padded sequence when it is shorter; s and t need not be multiples."""
    if backend not in BACKENDS:
        raise ValueError(f"flash attention backend {backend!r}: choose from {', '.join(BACKENDS)}")
    b, n, s, h = q_bnsh.shape
    t = k_bnth.shape[2]
    default_q, default_k = DEFAULT_BLOCKS[backend]
    align_q, align_k = (128, 128) if backend == "tpu" else (16, 16)
    bq = _block(block_q or default_q, s, align_q)
    bk = _block(block_k or default_k, t, align_k)
    if not interpret and (bq % align_q or bk % align_k or (backend == "gpu" and (bq & bq - 1 or bk & bk - 1))):
        shape = "multiples of 128" if backend == "tpu" else "powers of two of at least 16"
        raise ValueError(f"flash attention on {backend}: blocks must be {shape}, got {bq} x {bk}")
    if segment_ids_bt is not None and s != t:
        raise ValueError("flash attention: segment ids are for packed rows without a cache (as many queries as keys)")
    config = FlashConfig(causal, bq, bk, backend, interpret, 1.0 / math.sqrt(h), segment_ids_bt is not None)
    # Padding keys are invalid (position -1 marks them: one int32 per key carries both), padding queries sliced off.
    key_positions_bt = jnp.where(key_valid_bt > 0, key_positions_bt.astype(jnp.int32), -1)
    offset_b = jnp.broadcast_to(jnp.asarray(query_offset_b, jnp.int32), (b,))
    q = pad_to(q_bnsh, 2, bq)
    k, v = pad_to(k_bnth, 2, bk), pad_to(v_bnth, 2, bk)
    key_positions_bt = pad_to(key_positions_bt, 1, bk, value=-1)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    slopes_n = jnp.asarray(slopes_n, jnp.float32)
    segments = None
    if segment_ids_bt is not None:  # the queries' (padded to the query blocks) and the keys' (to the key blocks)
        segment_ids_bt = segment_ids_bt.astype(jnp.int32)
        segments = (pad_to(segment_ids_bt, 1, bq), pad_to(segment_ids_bt, 1, bk))
    if backend == "tpu":  # the TPU kernels' layout: [b, n, h, s] (see the TPU section)
        q, k, v = (jnp.swapaxes(x, 2, 3) for x in (q, k, v))
        return jnp.swapaxes(_flash(q, k, v, slopes_n, key_positions_bt, offset_b, segments, config), 2, 3)[:, :, :s]
    # Triton's tiles are powers of two: h = 80 (bloom-3b) runs as 128 with zero lanes.
    q, k, v = (pad_to(x, 3, pl.next_power_of_2(h)) for x in (q, k, v))
    return _flash(q, k, v, slopes_n, key_positions_bt, offset_b, segments, config)[:, :, :s, :h]


def _block(requested: int, length: int, align: int) -> int:
    """The block size for a sequence of `length`: `requested`, or the whole length rounded up to `align` when
    shorter."""
    return min(requested, -(-length // align) * align)


def pad_to(x, axis: int, multiple: int, value=0):
    """`x` padded with `value` at the end of `axis` to a multiple of `multiple`."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


# -- what both kernels compute per tile ------------------------------------------------------------------------------
def _last_key_block(offset, qi, config: FlashConfig, n_kblocks: int):
    """The last key block that query block `qi` sees (causal: the one holding its last query's position)."""
    last = lax.div(offset + (qi + 1) * config.block_q - 1, config.block_k)
    return jnp.minimum(last, n_kblocks - 1)


def _first_query_block(offset, ki, config: FlashConfig, n_qblocks: int):
    """The first query block that sees key block `ki` (causal), at most the last one."""
    bq = config.block_q
    before = jnp.maximum(ki * config.block_k - offset - (bq - 1), 0)  # >= 0: division truncates as floor
    return jnp.minimum(lax.div(before + bq - 1, bq), n_qblocks - 1)


def _visible(offset, qi, ki, config: FlashConfig):
    """Whether query block `qi` sees any key of block `ki`."""
    return ki * config.block_k <= offset + qi * config.block_q + config.block_q - 1


def _dot(a, b, contract: tuple[int, int]):
    """float32 product of 2-D tiles contracting dimension `contract[0]` of a with `contract[1]` of b."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _scores(dots, slope, key_pos, offset, qi, ki, config: FlashConfig, keys_first: bool = False, segments=None):
    """The tile's scores, float32: `dots` (q.k, [bq, bk], or [bk, bq] with `keys_first`) scaled, plus ALiBi from
    `key_pos` (int32 [1, bk], or [bk, 1]; -1 off keys), masked keys at NEG; given `segments` (the queries' and the
    keys' segment ids, shaped to broadcast against the tile), also other examples' keys."""
    bq, bk = config.block_q, config.block_k
    scores = dots * config.scale + slope * key_pos.astype(jnp.float32)
    allowed = key_pos >= 0
    if segments is not None:
        allowed = allowed & (segments[0] == segments[1])
    if config.causal:
        shape, query_axis = ((bk, bq), 1) if keys_first else ((bq, bk), 0)
        query_index = offset + qi * bq + lax.broadcasted_iota(jnp.int32, shape, query_axis)
        key_index = ki * bk + lax.broadcasted_iota(jnp.int32, shape, 1 - query_axis)
        allowed = allowed & (key_index <= query_index)
    return jnp.where(allowed, scores, NEG)


# -- the differentiable call -----------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config: FlashConfig):
    return _forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config)[0]


def _forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config):
    if config.backend == "tpu":
        return _tpu_forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config)
    return _gpu_forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config)


def _flash_fwd(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config):
    out, lse = _forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config)
    return out, (q, k, v, slopes_n, key_pos_bt, offset_b, segments, out, lse)


def _flash_bwd(config, residuals, d_out):
    q, k, v, slopes_n, key_pos_bt, offset_b, segments, out, lse = residuals
    # delta_i = sum_j p_ij dp_ij = d_out_i . out_i, the softmax backward's row term (one XLA fusion), shaped as
    # the log-sum-exp: [b, n, 1, s] over the TPU layout's h axis, else [b, n, s].
    tpu = config.backend == "tpu"
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-2 if tpu else -1, keepdims=tpu)
    backward = _tpu_backward if tpu else _gpu_backward
    dq, dk, dv = backward(q, k, v, d_out.astype(q.dtype), lse, delta, slopes_n, key_pos_bt, offset_b, segments,
                          config)
    # Slopes, positions, offsets and segments are data, not parameters: no gradient flows to them.
    return (dq, dk, dv, jnp.zeros_like(slopes_n), np.zeros(key_pos_bt.shape, jax.dtypes.float0),
            np.zeros(offset_b.shape, jax.dtypes.float0),
            None if segments is None else tuple(np.zeros(x.shape, jax.dtypes.float0) for x in segments))


_flash.defvjp(_flash_fwd, _flash_bwd)


# -- TPU (Mosaic) ----------------------------------------------------------------------------------------------------
# The TPU kernels see q, k, v, the output and their gradients transposed, [b, n, h, s]: the sequence on the 128
# lanes, the head dimension on sublanes. In [b, n, s, h] a head of 64 would fill half of each 128-lane tile, and a
# Mosaic call's operands take that padded layout: 2x the bytes for every one of them (bloom-560m's training step
# at 4 x 8192 planned 0.9 GiB more than the XLA blockwise path that way). Transposed, every tile is [keys, queries]
# and the per-query statistics (log-sum-exp, delta) are rows [1, bq] that broadcast as they are; the key positions
# are a column ([b, t, 1], one per key, not per head).
# Grid (b, n, query blocks, key blocks), the last a sequential reduction over VMEM accumulators (dk and dv:
# (b, n, key blocks, query blocks)). The offsets are prefetched into SMEM so that the index maps can clamp a
# causally skipped block to the last one needed: the pipeline sees the same block index and fetches nothing.
def _tpu_params():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu, pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _tpu_specs(config: FlashConfig, h: int, nq: int, nk: int, keys_outer: bool):
    """BlockSpecs (queries [h, bq], keys [h, bk], rows [1, bq], key positions [bk, 1], the queries' segment ids
    [1, bq]) for a grid (b, n, outer, inner) whose outer axis is the query blocks, or the key blocks with
    `keys_outer`; the causally skipped blocks of the inner axis clamped to the last (or first) one needed."""
    bq, bk = config.block_q, config.block_k

    def blocks(bi, outer, inner, offset_ref):  # (query block, key block)
        if keys_outer:
            first = _first_query_block(offset_ref[bi], outer, config, nq) if config.causal else inner
            return jnp.maximum(inner, first), outer
        last = _last_key_block(offset_ref[bi], outer, config, nk) if config.causal else inner
        return outer, jnp.minimum(inner, last)

    def q_map(bi, hi, outer, inner, o):
        return bi, hi, 0, blocks(bi, outer, inner, o)[0]

    def k_map(bi, hi, outer, inner, o):
        return bi, hi, 0, blocks(bi, outer, inner, o)[1]

    def pos_map(bi, hi, outer, inner, o):
        return bi, blocks(bi, outer, inner, o)[1], 0

    def query_segments_map(bi, hi, outer, inner, o):
        return bi, 0, blocks(bi, outer, inner, o)[0]

    return (pl.BlockSpec((None, None, h, bq), q_map), pl.BlockSpec((None, None, h, bk), k_map),
            pl.BlockSpec((None, None, 1, bq), q_map), pl.BlockSpec((None, bk, 1), pos_map),
            pl.BlockSpec((None, 1, bq), query_segments_map))


def _tpu_segments(config: FlashConfig, specs, segments):
    """The packed rows' extra operands of a TPU kernel: (in_specs, arrays): the queries' segment ids as rows
    [b, 1, s] and the keys' as a column [b, t, 1], as the key positions; none without segments."""
    if not config.segments:
        return [], []
    _, _, _, pos_spec, query_segments_spec = specs
    return [query_segments_spec, pos_spec], [segments[0][:, None, :], segments[1][:, :, None]]


def _split_segment_refs(config: FlashConfig, refs):
    """(the tile's segments (queries [1, bq], keys [bk, 1]) or None, the kernel's other refs)."""
    if not config.segments:
        return None, refs
    return (refs[0][...], refs[1][...]), refs[2:]


def _tpu_forward(q_t, k_t, v_t, slopes_n, key_pos_bt, offset_b, segments, config: FlashConfig):
    pltpu, params = _tpu_params()
    b, n, h, s = q_t.shape
    bq, bk = config.block_q, config.block_k
    nq, nk = s // bq, k_t.shape[3] // bk

    def kernel(offset_ref, q_ref, k_ref, v_ref, slopes_ref, pos_ref, *refs):
        tile_segments, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = _split_segment_refs(config, refs)
        bi, hi, qi, ki = (pl.program_id(i) for i in range(4))
        offset = offset_ref[bi]

        @pl.when(ki == 0)
        def _():
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        @pl.when(_visible(offset, qi, ki, config) if config.causal else True)
        def _():
            scores_kq = _scores(_dot(k_ref[...], q_ref[...], (0, 0)), slopes_ref[hi], pos_ref[...], offset, qi, ki,
                                config, keys_first=True, segments=tile_segments)
            m_prev = m_ref[...]
            m_new = jnp.maximum(m_prev, jnp.max(scores_kq, axis=0, keepdims=True))
            p_kq = jnp.exp(scores_kq - m_new)
            correction = jnp.exp(m_prev - m_new)
            l_ref[...] = l_ref[...] * correction + jnp.sum(p_kq, axis=0, keepdims=True)
            acc_ref[...] = acc_ref[...] * correction + _dot(v_ref[...], p_kq.astype(v_ref.dtype), (1, 0))
            m_ref[...] = m_new

        @pl.when(ki == nk - 1)
        def _():
            o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
            lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])

    specs = _tpu_specs(config, h, nq, nk, keys_outer=False)
    q_spec, k_spec, row_spec, pos_spec, _ = specs
    segment_specs, segment_arrays = _tpu_segments(config, specs, segments)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1, grid=(b, n, nq, nk),
        in_specs=[q_spec, k_spec, k_spec, pl.BlockSpec(memory_space=pltpu.SMEM), pos_spec, *segment_specs],
        out_specs=[q_spec, row_spec],
        scratch_shapes=[pltpu.VMEM((1, bq), jnp.float32), pltpu.VMEM((1, bq), jnp.float32),
                        pltpu.VMEM((h, bq), jnp.float32)])
    out_t, lse = pl.pallas_call(
        kernel, grid_spec=grid_spec, compiler_params=params, interpret=config.interpret, name="alibi_flash_fwd",
        out_shape=[jax.ShapeDtypeStruct(q_t.shape, q_t.dtype), jax.ShapeDtypeStruct((b, n, 1, s), jnp.float32)],
    )(offset_b, q_t, k_t, v_t, slopes_n, key_pos_bt[:, :, None], *segment_arrays)
    return out_t, lse


def _tpu_backward(q_t, k_t, v_t, do_t, lse, delta, slopes_n, key_pos_bt, offset_b, segments, config: FlashConfig):
    """(dq, dk, dv), transposed as their inputs: two kernels, one per key block (dk, dv) and one per query
    block (dq), each recomputing its tiles."""
    pltpu, params = _tpu_params()
    b, n, h, s = q_t.shape
    t = k_t.shape[3]
    bq, bk = config.block_q, config.block_k
    nq, nk = s // bq, t // bk
    pos_bt1 = key_pos_bt[:, :, None]

    def tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slope, pos_ref, offset, qi, ki, tile_segments):
        """(p, ds) [bk, bq] of one tile."""
        scores_kq = _scores(_dot(k_ref[...], q_ref[...], (0, 0)), slope, pos_ref[...], offset, qi, ki, config,
                            keys_first=True, segments=tile_segments)
        p_kq = jnp.exp(scores_kq - lse_ref[...])
        dp_kq = _dot(v_ref[...], do_ref[...], (0, 0))
        return p_kq, p_kq * (dp_kq - delta_ref[...]) * config.scale

    def dkv_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, pos_ref, *refs):
        tile_segments, (dk_ref, dv_ref, dk_acc, dv_acc) = _split_segment_refs(config, refs)
        bi, hi, ki, qi = (pl.program_id(i) for i in range(4))
        offset = offset_ref[bi]

        @pl.when(qi == 0)
        def _():
            dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
            dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        @pl.when(_visible(offset, qi, ki, config) if config.causal else True)
        def _():
            p_kq, ds_kq = tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref[hi], pos_ref, offset, qi,
                               ki, tile_segments)
            dv_acc[...] += _dot(do_ref[...], p_kq.astype(do_ref.dtype), (1, 1))
            dk_acc[...] += _dot(q_ref[...], ds_kq.astype(q_ref.dtype), (1, 1))

        @pl.when(qi == nq - 1)
        def _():
            dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
            dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)

    specs = _tpu_specs(config, h, nq, nk, keys_outer=True)
    q_spec, k_spec, row_spec, pos_spec, _ = specs
    segment_specs, segment_arrays = _tpu_segments(config, specs, segments)
    smem = pl.BlockSpec(memory_space=pltpu.SMEM)
    dk_t, dv_t = pl.pallas_call(
        dkv_kernel, compiler_params=params, interpret=config.interpret, name="alibi_flash_dkv",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, n, nk, nq),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, smem, pos_spec, *segment_specs],
            out_specs=[k_spec, k_spec],
            scratch_shapes=[pltpu.VMEM((h, bk), jnp.float32), pltpu.VMEM((h, bk), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k_t.shape, k_t.dtype), jax.ShapeDtypeStruct(v_t.shape, v_t.dtype)],
    )(offset_b, q_t, k_t, v_t, do_t, lse, delta, slopes_n, pos_bt1, *segment_arrays)

    def dq_kernel(offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, pos_ref, *refs):
        tile_segments, (dq_ref, dq_acc) = _split_segment_refs(config, refs)
        bi, hi, qi, ki = (pl.program_id(i) for i in range(4))
        offset = offset_ref[bi]

        @pl.when(ki == 0)
        def _():
            dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)

        @pl.when(_visible(offset, qi, ki, config) if config.causal else True)
        def _():
            _, ds_kq = tile(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref[hi], pos_ref, offset, qi, ki,
                            tile_segments)
            dq_acc[...] += _dot(k_ref[...], ds_kq.astype(k_ref.dtype), (1, 0))

        @pl.when(ki == nk - 1)
        def _():
            dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)

    specs = _tpu_specs(config, h, nq, nk, keys_outer=False)
    q_spec, k_spec, row_spec, pos_spec, _ = specs
    segment_specs, segment_arrays = _tpu_segments(config, specs, segments)
    dq_t = pl.pallas_call(
        dq_kernel, compiler_params=params, interpret=config.interpret, name="alibi_flash_dq",
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(b, n, nq, nk),
            in_specs=[q_spec, k_spec, k_spec, q_spec, row_spec, row_spec, smem, pos_spec, *segment_specs],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((h, bq), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q_t.dtype),
    )(offset_b, q_t, k_t, v_t, do_t, lse, delta, slopes_n, pos_bt1, *segment_arrays)
    return dq_t, dk_t, dv_t


# -- GPU (Triton) ----------------------------------------------------------------------------------------------------
# One program per (query block, b, head) looping over the key blocks it sees (forward, dq), or per (key block, b,
# head) looping over the query blocks that see it (dk, dv): Triton has no sequential grid axis to accumulate over.
# The loops' bounds are the causal ones, so skipped blocks cost nothing.
def _gpu_params(h: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=4 if h <= 64 else 8, num_stages=2)


def _gpu_tile_grad(scores, lse_q1, do, v, delta_q1, config: FlashConfig):
    """(p, ds) [bq, bk] float32 of one tile: the probabilities from the log-sum-exp and the scores' gradient."""
    p = jnp.exp(scores - lse_q1)
    return p, p * (_dot(do, v, (1, 1)) - delta_q1) * config.scale


def _gpu_segments(config: FlashConfig, segments, query_spec, key_spec):
    """The packed rows' extra operands of a GPU kernel: (in_specs, arrays), the queries' segment ids [b, s] and
    the keys' [b, t]; none without segments."""
    return ([query_spec, key_spec], list(segments)) if config.segments else ([], [])


def _gpu_tile_segments(config: FlashConfig, query_segments, key_segments):
    """A [bq, bk] tile's segments: the queries' as a column, the keys' as a row; None without segments."""
    return (query_segments[:, None], key_segments[None, :]) if config.segments else None


def _gpu_forward(q, k, v, slopes_n, key_pos_bt, offset_b, segments, config: FlashConfig):
    b, n, s, h = q.shape
    t = k.shape[2]
    bq, bk = config.block_q, config.block_k
    nq, nk = s // bq, t // bk

    def kernel(q_ref, k_ref, v_ref, slopes_ref, pos_ref, offset_ref, *refs):
        qseg_ref, kseg_ref, o_ref, lse_ref = refs if config.segments else (None, None, *refs)
        qi = pl.program_id(0)
        offset, slope = offset_ref[0], slopes_ref[0]
        q_blk = q_ref[...]
        query_segments = qseg_ref[...] if config.segments else None

        def body(ki, carry):
            acc, m_prev, l_prev = carry
            keys = pl.ds(ki * bk, bk)
            tile_segments = _gpu_tile_segments(config, query_segments, kseg_ref[keys] if config.segments else None)
            scores = _scores(_dot(q_blk, k_ref[keys, :], (1, 1)), slope, pos_ref[keys][None, :], offset, qi, ki,
                             config, segments=tile_segments)
            m_new = jnp.maximum(m_prev, jnp.max(scores, axis=-1))
            p = jnp.exp(scores - m_new[:, None])
            correction = jnp.exp(m_prev - m_new)
            l_new = l_prev * correction + jnp.sum(p, axis=-1)
            acc = acc * correction[:, None] + _dot(p.astype(v_ref.dtype), v_ref[keys, :], (1, 0))
            return acc, m_new, l_new

        upper = _last_key_block(offset, qi, config, nk) + 1 if config.causal else nk
        init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
                jnp.zeros((bq,), jnp.float32))
        acc, m, l_sum = lax.fori_loop(0, upper, body, init)
        o_ref[...] = (acc / l_sum[:, None]).astype(o_ref.dtype)
        lse_ref[...] = m + jnp.log(l_sum)

    block = pl.BlockSpec((None, None, bq, h), lambda qi, bi, hi: (bi, hi, qi, 0))
    whole = pl.BlockSpec((None, None, t, h), lambda qi, bi, hi: (bi, hi, 0, 0))
    keys_row = pl.BlockSpec((None, t), lambda qi, bi, hi: (bi, 0))
    segment_specs, segment_arrays = _gpu_segments(
        config, segments, pl.BlockSpec((None, bq), lambda qi, bi, hi: (bi, qi)), keys_row)
    return pl.pallas_call(
        kernel, grid=(nq, b, n), compiler_params=_gpu_params(h), interpret=config.interpret, name="alibi_flash_fwd",
        in_specs=[block, whole, whole, pl.BlockSpec((1,), lambda qi, bi, hi: (hi,)), keys_row,
                  pl.BlockSpec((1,), lambda qi, bi, hi: (bi,)), *segment_specs],
        out_specs=[block, pl.BlockSpec((None, None, bq), lambda qi, bi, hi: (bi, hi, qi))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, s), jnp.float32)],
    )(q, k, v, slopes_n, key_pos_bt, offset_b, *segment_arrays)


def _gpu_backward(q, k, v, do, lse, delta, slopes_n, key_pos_bt, offset_b, segments, config: FlashConfig):
    b, n, s, h = q.shape
    t = k.shape[2]
    bq, bk = config.block_q, config.block_k
    nq, nk = s // bq, t // bk
    head_slope = pl.BlockSpec((1,), lambda i, bi, hi: (hi,))
    row_offset = pl.BlockSpec((1,), lambda i, bi, hi: (bi,))
    whole_q = pl.BlockSpec((None, None, s, h), lambda i, bi, hi: (bi, hi, 0, 0))
    whole_k = pl.BlockSpec((None, None, t, h), lambda i, bi, hi: (bi, hi, 0, 0))
    whole_rows = pl.BlockSpec((None, None, s), lambda i, bi, hi: (bi, hi, 0))
    q_block = pl.BlockSpec((None, None, bq, h), lambda i, bi, hi: (bi, hi, i, 0))
    k_block = pl.BlockSpec((None, None, bk, h), lambda i, bi, hi: (bi, hi, i, 0))
    row_block = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))

    def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, pos_ref, offset_ref, *refs):
        qseg_ref, kseg_ref, dk_ref, dv_ref = refs if config.segments else (None, None, *refs)
        ki = pl.program_id(0)
        offset, slope = offset_ref[0], slopes_ref[0]
        k_blk, v_blk = k_ref[...], v_ref[...]
        key_pos = pos_ref[pl.ds(ki * bk, bk)][None, :]
        key_segments = kseg_ref[...] if config.segments else None

        def body(qi, carry):
            dk, dv = carry
            rows = pl.ds(qi * bq, bq)
            q_blk = q_ref[rows, :]
            tile_segments = _gpu_tile_segments(config, qseg_ref[rows] if config.segments else None, key_segments)
            scores = _scores(_dot(q_blk, k_blk, (1, 1)), slope, key_pos, offset, qi, ki, config,
                             segments=tile_segments)
            do_blk = do_ref[rows, :]
            p, ds = _gpu_tile_grad(scores, lse_ref[rows][:, None], do_blk, v_blk, delta_ref[rows][:, None],
                                            config)
            return dk + _dot(ds.astype(q_blk.dtype), q_blk, (0, 0)), dv + _dot(p.astype(do_blk.dtype), do_blk, (0, 0))

        lower = _first_query_block(offset, ki, config, nq) if config.causal else 0
        zeros = jnp.zeros((bk, h), jnp.float32)
        dk, dv = lax.fori_loop(lower, nq, body, (zeros, zeros))
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)

    keys_row = pl.BlockSpec((None, t), lambda i, bi, hi: (bi, 0))
    segment_specs, segment_arrays = _gpu_segments(
        config, segments, pl.BlockSpec((None, s), lambda i, bi, hi: (bi, 0)),
        pl.BlockSpec((None, bk), lambda i, bi, hi: (bi, i)))
    dk, dv = pl.pallas_call(
        dkv_kernel, grid=(nk, b, n), compiler_params=_gpu_params(h), interpret=config.interpret,
        name="alibi_flash_dkv",
        in_specs=[whole_q, k_block, k_block, whole_q, whole_rows, whole_rows, head_slope, keys_row, row_offset,
                  *segment_specs],
        out_specs=[k_block, k_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, do, lse, delta, slopes_n, key_pos_bt, offset_b, *segment_arrays)

    def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, slopes_ref, pos_ref, offset_ref, *refs):
        qseg_ref, kseg_ref, dq_ref = refs if config.segments else (None, None, *refs)
        qi = pl.program_id(0)
        offset, slope = offset_ref[0], slopes_ref[0]
        q_blk, do_blk = q_ref[...], do_ref[...]
        lse_q1, delta_q1 = lse_ref[...][:, None], delta_ref[...][:, None]
        query_segments = qseg_ref[...] if config.segments else None

        def body(ki, dq):
            keys = pl.ds(ki * bk, bk)
            k_blk = k_ref[keys, :]
            tile_segments = _gpu_tile_segments(config, query_segments, kseg_ref[keys] if config.segments else None)
            scores = _scores(_dot(q_blk, k_blk, (1, 1)), slope, pos_ref[keys][None, :], offset, qi, ki, config,
                             segments=tile_segments)
            _, ds = _gpu_tile_grad(scores, lse_q1, do_blk, v_ref[keys, :], delta_q1, config)
            return dq + _dot(ds.astype(k_blk.dtype), k_blk, (1, 0))

        upper = _last_key_block(offset, qi, config, nk) + 1 if config.causal else nk
        dq = lax.fori_loop(0, upper, body, jnp.zeros((bq, h), jnp.float32))
        dq_ref[...] = dq.astype(dq_ref.dtype)

    segment_specs, segment_arrays = _gpu_segments(
        config, segments, pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)), keys_row)
    dq = pl.pallas_call(
        dq_kernel, grid=(nq, b, n), compiler_params=_gpu_params(h), interpret=config.interpret,
        name="alibi_flash_dq",
        in_specs=[q_block, whole_k, whole_k, q_block, row_block, row_block, head_slope, keys_row, row_offset,
                  *segment_specs],
        out_specs=q_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, do, lse, delta, slopes_n, key_pos_bt, offset_b, *segment_arrays)
    return dq, dk, dv


__all__ = ["BACKENDS", "DEFAULT_BLOCKS", "flash_attention", "pad_to", "reference"]
