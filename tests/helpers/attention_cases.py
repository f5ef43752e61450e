"""The attention cases every implementation is held to (kernels/test_kernels.py, kernels/test_flash.py):
inputs, the real queries, and the comparison with the reference forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bloom_jax.kernels import attention
from bloom_jax.kernels.attention import AttentionMask


def relative_to_largest(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def attention_inputs(b, n, s, t, h, seed=0, pad=(), dtype=jnp.float32):
    """q [b, n, s, h], k, v [b, n, t, h] and a key mask [b, t] with `pad[i]` left-padding keys in row i."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(0, 1, shape), dtype) for shape in ((b, n, s, h), (b, n, t, h), (b, n, t, h)))
    key_mask = np.ones((b, t), np.int32)
    for row, count in enumerate(pad):
        key_mask[row, :count] = 0
    return q, k, v, jnp.asarray(key_mask)


# Heads 112 as BLOOM-176B and 6 (slopes' second branch); lengths 37 and 70 not multiples of the blocks; a cache offset:
# 5 queries at key positions 9..13 of 16 keys.
CASES = {
    "square": dict(b=2, n=4, s=37, t=37, start=0, pad=(0, 6)),
    "112 heads": dict(b=1, n=112, s=20, t=20, start=0, pad=(3,)),
    "6 heads": dict(b=1, n=6, s=24, t=24, start=0, pad=(5,)),
    "long": dict(b=1, n=2, s=70, t=70, start=0, pad=(11,)),
    "cache offset": dict(b=2, n=3, s=5, t=16, start=9, pad=(2, 0)),
}


# Packed rows: 3 examples and right padding, and 2 examples; 40 tokens, so that blocks of 8, 16 or 32 straddle the
# examples' edges.
PACKED_SEGMENTS = [[1] * 13 + [2] * 17 + [3] * 6 + [0] * 4, [1] * 25 + [2] * 15]


def packed_inputs(n=3, h=8, seed=6):
    """(q, k, v [2, n, 40, h], segment ids [2, 40]) of `PACKED_SEGMENTS`."""
    segments = jnp.asarray(PACKED_SEGMENTS, jnp.int32)
    b, s = segments.shape
    q, k, v, _ = attention_inputs(b, n, s, s, h, seed=seed)
    return q, k, v, segments


def assert_packed_equals_the_reference(attend_fn, tolerance=2e-6, grad_tolerance=1e-5):
    """`attend_fn(q, k, v, mask)` on packed rows (a mask with segment ids) against the reference: the output at
    real queries within `tolerance` of the largest value (fp32), dq, dk, dv within `grad_tolerance`; and the
    reference itself far (> 1e-2) from attention over the unpacked rows, so that the segments matter."""
    q, k, v, segments = packed_inputs()
    n, s = q.shape[1], q.shape[2]
    valid = (segments > 0).astype(jnp.int32)
    mask = AttentionMask.create(valid, n, s, 0, dense=False, segment_ids=segments)
    keep = np.broadcast_to(np.asarray(valid)[:, None, :, None] > 0, q.shape)
    cotangent = jax.random.normal(jax.random.key(7), q.shape) * keep

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return np.where(keep, out, 0), vjp(cotangent)

    (out, grads), (ref, ref_grads) = (run(fn) for fn in (attend_fn, lambda *a: attention.reference(*a, jnp.float32)))
    assert relative_to_largest(out, ref) <= tolerance
    for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert relative_to_largest(got, want) <= grad_tolerance, what
    unpacked = AttentionMask.create(valid, n, s, 0, dense=False)
    assert relative_to_largest(np.where(keep, attention.reference(q, k, v, unpacked, jnp.float32), 0), ref) > 1e-2


def real_queries(case) -> np.ndarray:
    """bool [b, s]: the queries at real tokens (a padding query's output is unspecified)."""
    keep = np.ones((case["b"], case["s"]), bool)
    for row, count in enumerate(case["pad"]):
        keep[row, : max(0, count - case["start"])] = False
    return keep


def assert_equals_the_reference(case, name, attend_fn, tolerance=2e-6, grad_tolerance=None):
    """`attend_fn(q, k, v, mask)` against the reference on `case`: the output at real queries within `tolerance`
    of the largest value (fp32), and dq, dk, dv of a loss that reads only those within `grad_tolerance` (default:
    `tolerance`)."""
    q, k, v, key_mask = attention_inputs(case["b"], case["n"], case["s"], case["t"], 8, seed=len(name),
                                         pad=case["pad"])
    mask = AttentionMask.create(key_mask, case["n"], case["s"], case["start"], dense=False)
    keep = jnp.asarray(real_queries(case))[:, None, :, None]
    cotangent = jax.random.normal(jax.random.key(1), q.shape) * keep  # padding queries feed nothing

    def run(fn):
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v) * cotangent)

        return jax.jit(lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    ref_out, ref_grads = run(lambda q, k, v: attention.reference(q, k, v, mask, jnp.float32))
    out, grads = run(lambda q, k, v: attend_fn(q, k, v, mask))
    keep_np = np.broadcast_to(np.asarray(keep), out.shape)
    assert relative_to_largest(np.where(keep_np, out, 0), np.where(keep_np, ref_out, 0)) <= tolerance
    for got, want, what in zip(grads, ref_grads, ("dq", "dk", "dv")):
        assert relative_to_largest(got, want) <= (grad_tolerance or tolerance), what


def assert_model_equals_the_reference(config, kernels, ids, mask):
    """The model with `kernels` against the reference attention's: logits at real tokens within 2e-6 of the
    largest, every parameter's gradient of a loss on them within 2e-5. Returns the shared parameters."""
    from bloom_jax.model import make_model

    reference_model = make_model(config, attention="reference")
    model = make_model(config, kernels=kernels)
    params = reference_model.init(jax.random.key(0), ids)["params"]

    def loss(model, p):
        logits = model.apply({"params": p}, ids, attention_mask=mask)
        return jnp.sum(jnp.where(mask[..., None] > 0, logits, 0) ** 2), logits

    (_, ref_logits), ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(reference_model, p), has_aux=True))(params)
    (_, logits), grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)
    keep = np.broadcast_to(np.asarray(mask)[..., None] > 0, logits.shape)
    assert relative_to_largest(np.where(keep, logits, 0), np.where(keep, ref_logits, 0)) <= 2e-6
    worst = max(relative_to_largest(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert worst <= 2e-5
    return params
