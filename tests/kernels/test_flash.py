"""The Pallas flash attention kernels (TPU and GPU) run in interpret mode against the reference: forward and
gradients on every case of `attention_cases`, bfloat16, per-row cache offsets, non-causal; through the model;
heads split over a `tensor` axis; and lowered for real chips: the TPU kernel compiled by libtpu for v5e and v5p,
the GPU kernel lowered to Triton."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import (CASES, assert_equals_the_reference, assert_model_equals_the_reference,
                             assert_packed_equals_the_reference, attention_inputs, packed_inputs, relative_to_largest)
from commands import WORKERS
from jax.sharding import PartitionSpec as P
from reference import tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.cache import KVCache
from bloom_jax.kernels import Kernels, attention, flash
from bloom_jax.kernels.attention import AttentionMask, alibi_positions, alibi_slopes
from bloom_jax.model import make_model
from bloom_jax.sharding import ShardingPlan, make_mesh

BACKENDS = flash.BACKENDS


def flash_inputs(b, n, s, t, h, pad=(), seed=0, dtype=jnp.float32):
    q, k, v, key_mask = attention_inputs(b, n, s, t, h, seed=seed, pad=pad, dtype=dtype)
    return q, k, v, jnp.asarray(alibi_slopes(n)), alibi_positions(key_mask).astype(jnp.int32), key_mask


def flash_kernels(backend, blocks=(8, 8)) -> Kernels:
    return Kernels(attention="flash", flash_backend=backend, flash_blocks=blocks, interpret=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blocks", [(8, 8), (16, 32)])
@pytest.mark.parametrize("name", CASES)
def test_flash_attention_equals_the_reference_forward_and_backward(backend, blocks, name):
    # Forward within 2e-6 of the largest value, gradients within 1e-5 (fp32): padding, 112 and 6 heads, lengths
    # that are not multiples of the blocks, a prefill chunk of 5 queries into 16 cached keys.
    assert_equals_the_reference(CASES[name], name, lambda q, k, v, mask: attention.flash(
        q, k, v, mask, jnp.float32, backend, blocks, interpret=True), tolerance=2e-6, grad_tolerance=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_with_one_offset_per_row_and_without_causality(backend, causal):
    # Rows with 3, 9 and 0 keys cached before their 7 queries, 23 keys in all; left padding 4, 0, 2.
    q, k, v, slopes, positions, valid = flash_inputs(3, 4, 7, 23, 16, pad=(4, 0, 2), seed=2)
    offsets = jnp.asarray([3, 9, 0], jnp.int32)
    # Queries that see a real key: with causality, the first query of row 0 and the first two of row 2 see only
    # padding (their outputs are unspecified) and feed nothing.
    sees_bs = np.arange(7)[None, :] + np.asarray(offsets)[:, None] >= np.asarray([4, 0, 2])[:, None]
    keep = np.broadcast_to((sees_bs if causal else np.ones_like(sees_bs))[:, None, :, None], q.shape)
    cotangent = jax.random.normal(jax.random.key(3), q.shape) * keep

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, slopes, positions, valid, offsets), q, k, v)
        return out, vjp(cotangent)

    got, got_grads = run(lambda *a: flash.flash_attention(*a, causal=causal, block_q=8, block_k=8, backend=backend,
                                                          interpret=True))
    want, want_grads = run(lambda *a: flash.reference(*a, causal=causal))
    assert relative_to_largest(np.where(keep, got, 0), np.where(keep, want, 0)) <= 2e-6
    for ours, ref, what in zip(got_grads, want_grads, ("dq", "dk", "dv")):
        assert relative_to_largest(ours, ref) <= 1e-5, what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blocks", [(8, 8), (16, 32)])
def test_flash_attention_keeps_packed_examples_apart_forward_and_backward(backend, blocks):
    """Segment ids inside the kernels: each query sees only its own example's keys, whose ALiBi positions start at
    0; the kernel against its reference with segments, and the model's attention (`attention.flash`) against the
    reference attention, forward within 2e-6 of the largest value and gradients within 1e-5 (fp32)."""
    q, k, v, segments = packed_inputs()
    valid = (segments > 0).astype(jnp.int32)
    positions = attention.segment_positions(segments).astype(jnp.int32)
    slopes = jnp.asarray(alibi_slopes(q.shape[1]))
    keep = np.broadcast_to(np.asarray(valid)[:, None, :, None] > 0, q.shape)
    cotangent = jax.random.normal(jax.random.key(7), q.shape) * keep

    def run(fn):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, slopes, positions, valid, 0), q, k, v)
        return np.where(keep, out, 0), vjp(cotangent)

    got, got_grads = run(lambda *a: flash.flash_attention(*a, block_q=blocks[0], block_k=blocks[1], backend=backend,
                                                          interpret=True, segment_ids_bt=segments))
    want, want_grads = run(lambda *a: flash.reference(*a, segment_ids_bt=segments))
    assert relative_to_largest(got, want) <= 2e-6
    for ours, ref, what in zip(got_grads, want_grads, ("dq", "dk", "dv")):
        assert relative_to_largest(ours, ref) <= 1e-5, what
    assert_packed_equals_the_reference(
        lambda q, k, v, mask: attention.flash(q, k, v, mask, jnp.float32, backend, blocks, interpret=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attention_in_bfloat16_is_as_close_as_the_reference_in_bfloat16(backend):
    # bf16 q, k, v against the fp32 reference: the kernel's error is at most 1.1x that of the reference itself on
    # the same bf16 inputs (both keep scores and softmax in fp32), and both within 2e-2 (bf16's 8 bits).
    # Measured: 0.0039 and 0.0039 at 2 x 300 positions with slopes up to 1/2 and positions up to 299.
    b, n, s, h = 1, 2, 300, 16
    q, k, v, key_mask = attention_inputs(b, n, s, s, h, seed=5, pad=(20,))
    mask = AttentionMask.create(key_mask, n, s, 0)
    keep = np.broadcast_to(np.asarray(key_mask)[:, None, :, None] > 0, q.shape)
    ref = np.where(keep, attention.reference(q, k, v, mask, jnp.float32), 0)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attention.flash(*bf16, mask, jnp.bfloat16, backend, (64, 64), interpret=True)
    assert out.dtype == jnp.bfloat16
    ours = relative_to_largest(np.where(keep, out.astype(jnp.float32), 0), ref)
    bf16_reference = relative_to_largest(
        np.where(keep, attention.reference(*bf16, mask, jnp.bfloat16).astype(jnp.float32), 0), ref)
    assert ours <= 1.1 * bf16_reference and ours <= 2e-2


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_the_model_with_flash_attention_gives_the_reference_logits_gradients_and_cached_chunks(backend):
    config = tiny_config(n_layer=2, n_head=6, hidden_size=48)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (2, 21)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :4].set(0)
    params = assert_model_equals_the_reference(config, flash_kernels(backend), ids, mask)
    reference_model = make_model(config, attention="reference")
    flash_model = make_model(config, kernels=flash_kernels(backend))

    # A prompt of 13 tokens in a cache of 32, then a chunk of 8 more: the chunk's queries start at 13.
    def chunked(model):
        cache = KVCache.init(config, 2, 32, jnp.float32)
        _, cache = model.apply({"params": params}, ids[:, :13], attention_mask=mask[:, :13], cache=cache)
        return model.apply({"params": params}, ids[:, 13:], attention_mask=mask[:, 13:], cache=cache)[0]

    assert relative_to_largest(chunked(flash_model), chunked(reference_model)) <= 2e-6


def test_each_tensor_shard_uses_the_slopes_of_its_own_heads():
    # 8 heads over fsdp=2 x tensor=4: each shard holds 2 heads and their slopes. Feeding every shard the first
    # shard's slopes (the bug that made FlashInfer's ALiBi wrong on every tensor-parallel rank but the first) is
    # far off the reference, which the sharded kernel matches.
    b, n, s, h = 2, 8, 24, 8
    q, k, v, slopes, positions, valid = flash_inputs(b, n, s, s, h, pad=(0, 5), seed=4)
    mesh = make_mesh("fsdp=2,tensor=4")
    plan = ShardingPlan.create(mesh, "fsdp_tensor")
    mask = AttentionMask.create(valid, n, s, 0, dense=False)
    keep = np.broadcast_to(np.asarray(valid)[:, None, :, None] > 0, q.shape)
    want = np.where(keep, flash.reference(q, k, v, slopes, positions, valid, 0), 0)
    with plan.context():
        sharded = jax.jit(lambda q, k, v: attention.flash(q, k, v, mask, jnp.float32, "tpu", (8, 8), True))
        text = sharded.lower(q, k, v).as_text()
        got = np.where(keep, sharded(q, k, v), 0)
    assert "shard_map" in text or "sdy.manual_computation" in text
    assert relative_to_largest(got, want) <= 2e-6

    def first_shards_slopes(q, k, v, slopes, positions, valid, offsets):
        return flash.flash_attention(q, k, v, jnp.asarray(alibi_slopes(n))[: slopes.shape[0]], positions, valid,
                                     offsets, block_q=8, block_k=8, interpret=True)

    heads = P("fsdp", "tensor", None, None)
    wrong = jax.shard_map(first_shards_slopes, mesh=mesh, check_vma=False, out_specs=heads,
                          in_specs=(heads, heads, heads, P("tensor"), P("fsdp"), P("fsdp"), P("fsdp")))(
        q, k, v, slopes, positions, valid, jnp.zeros((b,), jnp.int32))
    assert relative_to_largest(np.where(keep, wrong, 0), want) > 1e-2


@pytest.mark.slow
def test_the_sharded_model_with_flash_attention_gives_the_reference_logits_and_gradients():
    config = tiny_config(n_layer=2)
    ids = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, (4, 16)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    reference_model = make_model(config, attention="reference")
    flash_model = make_model(config, kernels=flash_kernels("tpu"))
    params = reference_model.init(jax.random.key(0), ids)["params"]

    def loss(model, p):
        return jnp.sum(jnp.where(mask[..., None] > 0, model.apply({"params": p}, ids, attention_mask=mask), 0) ** 2)

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: loss(reference_model, p)))(params)
    plan = ShardingPlan.create(make_mesh("data=2,tensor=4"), "fsdp_tensor")
    sharded_params = jax.device_put(params, plan.param_shardings(flash_model))
    with plan.context():
        got_loss, grads = jax.jit(jax.value_and_grad(lambda p: loss(flash_model, p)))(sharded_params)
    assert abs(float(got_loss) - float(ref_loss)) <= 2e-6 * abs(float(ref_loss))
    worst = max(relative_to_largest(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert worst <= 2e-5


def test_kernels_choose_flash_on_tpus_and_gpus_only():
    assert Kernels.create(attention="flash", platform="tpu") == Kernels("flash", flash_backend="tpu")
    assert Kernels.create(attention="flash", platform="gpu").flash_backend == "gpu"
    assert Kernels.create(attention="flash", platform="gpu").attention_at(1, 100) == "reference"  # decode steps
    with pytest.raises(BloomJaxError, match="attention 'flash' needs a TPU or an NVIDIA GPU; this platform is cpu"):
        Kernels.create(attention="flash", platform="cpu")
    q, k, v, slopes, positions, valid = flash_inputs(1, 2, 64, 64, 16)
    with pytest.raises(ValueError, match="flash attention on tpu: blocks must be multiples of 128, got 64 x 128"):
        flash.flash_attention(q, k, v, slopes, positions, valid, block_q=64, block_k=128)
    with pytest.raises(ValueError, match="blocks must be powers of two of at least 16, got 48 x 64"):
        flash.flash_attention(q, k, v, slopes, positions, valid, block_q=48, block_k=64, backend="gpu")


def abstract_inputs(b, n, s, h, dtype):
    shapes = [((b, n, s, h), dtype)] * 3 + [((n,), jnp.float32), ((b, s), jnp.int32), ((b, s), jnp.int32)]
    return [jax.ShapeDtypeStruct(shape, dt) for shape, dt in shapes]


def attention_loss(backend, block_q=None, block_k=None):
    def loss(q, k, v, slopes, positions, valid, segments=None):
        out = flash.flash_attention(q, k, v, slopes, positions, valid, block_q=block_q, block_k=block_k,
                                    backend=backend, segment_ids_bt=segments)
        return jnp.sum(out.astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("topology, bounds", [("v5e:1x1", "1,1,1"), ("v5p:2x2x1", "2,2,1")])
def test_the_tpu_kernel_compiles_for_tpus_forward_and_backward(topology, bounds):
    pytest.importorskip("libtpu", reason="the TPU compiler comes with libtpu (pip install 'bloom-jax[tpu]')")
    worker = WORKERS / "tpu_compile_worker.py"
    done = subprocess.run([sys.executable, str(worker), topology, bounds], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    for flash_name in ("flash", "flash_packed"):  # packed rows: the same three kernels, with segment ids
        assert plan[f"{flash_name}_kernels"] == ["alibi_flash_fwd", "alibi_flash_dkv", "alibi_flash_dq"]
        assert not plan[f"{flash_name}_square"], flash_name
    # Temporaries of forward and backward at 1 x 16 x 2048 x 64, bf16 (measured, MiB): v5e 0 / 0.37 / 384,
    # v5p 4.2 / 56.8 / 384 for flash / blockwise / reference.
    assert plan["flash"] <= plan["blockwise"] and 10 * plan["flash"] < plan["reference"]
    assert plan["flash_packed"] <= plan["blockwise"]


@pytest.mark.parametrize("packed", [False, True])
def test_the_gpu_kernel_lowers_to_triton_forward_and_backward(packed):
    # Lowering builds each kernel's Triton IR here; compiling it to PTX needs the GPU. h = 80 (bloom-3b) runs as
    # 128 lanes. Packed rows add the segment ids to the same three kernels.
    inputs = abstract_inputs(1, 4, 256, 80, jnp.bfloat16)
    lowered = attention_loss("gpu").trace(*inputs, *inputs[-1:] if packed else []).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("xla.gpu.triton") == 3  # forward, dk and dv, dq


def test_one_query_row_takes_the_reference_under_flash():
    kernels = flash_kernels("tpu")
    assert [kernels.attention_at(s, t) for s, t in ((1, 900), (2, 2), (600, 600))] == ["reference", "flash", "flash"]
    assert dataclasses.replace(kernels, attention="blockwise").attention_at(2, 2) == "reference"
