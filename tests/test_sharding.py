"""Meshes, sharding rules, sharded init and restoring a converted checkpoint onto any mesh (8 CPU devices)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import flax.linen as nn
import pytest
from commands import WORKERS, free_port
from jax.sharding import AxisType
from reference import relative_max_error, tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.checkpoints import convert, from_pretrained
from bloom_jax.model import make_model
from bloom_jax.sharding import (
    ShardingPlan,
    init_sharded,
    load_rules,
    make_mesh,
    parse_mesh_spec,
    rule_names,
    sharded_forward,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


@pytest.mark.parametrize("spec, sizes", [
    ("data=2,fsdp=-1,tensor=4", {"slice": 1, "data": 2, "fsdp": 1, "tensor": 4}),
    ("fsdp=-1", {"slice": 1, "data": 1, "fsdp": 8, "tensor": 1}),
    ("slice=2,data=2,tensor=2", {"slice": 2, "data": 2, "fsdp": 1, "tensor": 2}),
])
def test_parse_mesh_spec(spec, sizes):
    assert parse_mesh_spec(spec, 8) == sizes


@pytest.mark.parametrize("spec, message", [
    ("data=3", "has 3 devices, but there are 8"),
    ("data=-1,fsdp=-1", "only one axis may be -1"),
    ("pipeline=2,data=-1", "unknown axis 'pipeline'"),
    ("data=3,fsdp=-1", "do not divide"),
    ("data=two", "is not AXIS=SIZE"),
    ("data=0,fsdp=-1", "must be positive"),
    ("data=2,data=4", "given twice"),
])
def test_bad_mesh_specs(spec, message):
    with pytest.raises(BloomJaxError, match=message):
        parse_mesh_spec(spec, 8)


def test_mesh_has_auto_axes():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    assert dict(mesh.shape) == {"slice": 1, "data": 2, "fsdp": 2, "tensor": 2}
    assert set(mesh.axis_types) == {AxisType.Auto}


def test_rule_presets():
    assert set(rule_names()) >= {"data_parallel", "fsdp", "tensor", "fsdp_tensor"}
    for name in rule_names():
        rules = dict(load_rules(name))
        assert {"vocab", "embed", "heads", "mlp", "layers", "activation_batch"} <= set(rules)
    with pytest.raises(BloomJaxError, match="no sharding rules named 'pipeline'"):
        load_rules("pipeline")


@pytest.mark.parametrize("name", ["data_parallel", "fsdp", "tensor", "fsdp_tensor"])
def test_the_kv_cache_axis_splits_as_batch_then_heads(name):
    rules = dict(load_rules(name))
    as_tuple = lambda axes: (axes,) if isinstance(axes, str) else tuple(axes or ())  # noqa: E731
    assert as_tuple(rules["activation_batch_heads"]) == \
        as_tuple(rules["activation_batch"]) + as_tuple(rules["activation_heads"])


def test_plan_fits_preset_rules_to_a_users_mesh():
    # A mesh of the user's own with a single axis: the preset's other mesh axes act as size 1 and are dropped.
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rules = dict(ShardingPlan.create(mesh, "fsdp_tensor").rules)
    assert rules["activation_batch"] == "data" and rules["embed"] is None and rules["heads"] is None
    assert ShardingPlan.create(mesh, load_rules("fsdp_tensor")).rules == tuple(rules.items())


def test_plan_for_batch_replicates_a_batch_the_data_axes_do_not_divide():
    mesh = make_mesh("data=2,tensor=4")
    plan = ShardingPlan.create(mesh, "fsdp_tensor")
    rules = plan.rules
    assert plan.for_batch(4) is plan
    assert dict(rules)["activation_batch_heads"] == ("slice", "data", "fsdp", "tensor")
    alone = dict(plan.for_batch(1).rules)  # generation at batch 1
    assert alone["activation_batch"] is None and alone["activation_batch_heads"] == "tensor"
    assert {k: v for k, v in alone.items() if not k.startswith("activation_batch")} == \
        {k: v for k, v in dict(rules).items() if not k.startswith("activation_batch")}


def test_indivisible_heads_are_a_clear_error():
    model = make_model(tiny_config(n_head=6, hidden_size=48))
    message = r"self_attention/\w+/kernel has a dimension of 6, not divisible by mesh axes tensor = 4"
    with pytest.raises(BloomJaxError, match=message):
        ShardingPlan.create(make_mesh("data=2,tensor=4"), "tensor").param_shardings(model)


def test_plan_gives_params_batch_and_context():
    model = make_model(tiny_config())
    plan = ShardingPlan.create(make_mesh("fsdp=2,tensor=4"), "fsdp_tensor")
    shardings = plan.param_shardings(model)
    assert plan.param_shardings(model) is shardings  # computed once per model
    kernel = shardings["h"]["self_attention"]["query_key_value"]["kernel"]
    assert tuple(kernel.spec) == (None, "fsdp", "tensor", None, None)
    abstract = plan.abstract_params(model)["h"]["self_attention"]["query_key_value"]["kernel"]
    assert abstract.shape == (2, 64, 8, 3, 8) and abstract.sharding == kernel
    assert tuple(plan.batch_sharding().spec) == (("slice", "data", "fsdp"), None)
    assert tuple(plan.batch_sharding(3).spec) == (("slice", "data", "fsdp"), None, None)
    assert tuple(plan.replicated.spec) == ()
    with plan.context():
        assert jax.sharding.get_abstract_mesh().shape == plan.mesh.shape
        assert dict(nn.get_logical_axis_rules()) == dict(plan.rules)


def test_init_is_born_sharded():
    model = make_model(tiny_config())
    mesh, rules = make_mesh("fsdp=2,tensor=4"), load_rules("fsdp_tensor")
    params = init_sharded(model, jax.random.key(0), mesh, rules)
    kernel = params["h"]["self_attention"]["query_key_value"]["kernel"]  # [layers, d, n, 3, h]
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor", None, None)
    shard_shapes = {shard.data.shape for shard in kernel.addressable_shards}
    assert shard_shapes == {(2, 64 // 2, 8 // 4, 3, 8)}  # each device holds 1/8 of it
    embedding = params["word_embeddings"]["embedding"]
    assert {s.data.shape for s in embedding.addressable_shards} == {(512 // 4, 64 // 2)}


@pytest.fixture(scope="module")
def converted(make_checkpoint, tmp_path_factory):
    checkpoint = make_checkpoint()
    out = tmp_path_factory.mktemp("sharding") / "converted"
    convert(checkpoint.directory, out, progress=False)
    return out


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4", "fsdp=2,tensor=4", "data=2,fsdp=2,tensor=2"])
def test_restore_onto_any_mesh_gives_single_device_logits(converted, spec):
    config = tiny_config()
    rng = np.random.default_rng(0)
    ids = rng.integers(4, config.vocab_size, (8, 12), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[1, :5] = 0  # one left-padded row
    model, params = from_pretrained(converted)
    expected = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params))

    mesh, rules = make_mesh(spec), load_rules("fsdp_tensor")
    model, sharded = from_pretrained(converted, mesh=mesh)
    shardings = ShardingPlan.create(mesh, rules).param_shardings(model)
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), sharded, shardings))
    logits = np.asarray(sharded_forward(model, mesh, rules)(sharded, ids, mask))
    assert relative_max_error(logits, expected, mask) <= 1e-5


@pytest.mark.slow
def test_two_processes_give_single_process_logits(converted, tmp_path):
    config = tiny_config()
    ids = np.random.default_rng(1).integers(4, config.vocab_size, (8, 10), dtype=np.int32)
    mask = np.ones_like(ids)
    mask[3, :4] = 0
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)
    model, params = from_pretrained(converted)
    expected = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params))

    port, worker = free_port(), WORKERS / "multihost_worker.py"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [str(tmp_path / n) for n in ("ids.npy", "mask.npy", "out.npy", "saved")]
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(converted), *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    logits = np.load(tmp_path / "out.npy")
    assert relative_max_error(logits, expected, mask) <= 1e-5
    # save_pretrained from both processes, each writing its shards: the parameters come back bit for bit.
    assert not (tmp_path / "saved" / "stale.json").exists()
    _, saved = from_pretrained(tmp_path / "saved")
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), saved, params))


def test_distributed_arguments_go_together():
    from bloom_jax.distributed import initialize

    with pytest.raises(BloomJaxError, match="together"):
        initialize("127.0.0.1:1234", num_processes=2)
    with pytest.raises(BloomJaxError, match="not in"):
        initialize("127.0.0.1:1234", 2, 2)
