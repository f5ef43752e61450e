"""The memory planner: XLA's analysis of the compiled step against the real arrays of that step."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import pytest
from reference import tiny_config

from bloom_jax import BloomJaxError
from bloom_jax.model import make_model
from bloom_jax.plan import describe, memory_limit_gib, plan_step
from bloom_jax.recipe import TrainConfig
from bloom_jax.sharding import init_sharded, load_rules, make_mesh
from bloom_jax.train import make_optimizer, optimizer_shardings

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _bytes_on_device(tree, device) -> int:
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards
               if shard.device == device)


@pytest.mark.slow
def test_train_plan_arguments_equal_the_real_state_on_a_device():
    config = tiny_config()
    plan = plan_step(config, "fsdp=2,tensor=4", "train", batch=4, seq=16)
    # The real state of that step, born sharded with the same rules: fp32 parameters and AdamW moments.
    mesh, rules = make_mesh("fsdp=2,tensor=4"), load_rules("fsdp_tensor")
    model = make_model(config, dtype="bfloat16", param_dtype="float32")
    params = init_sharded(model, jax.random.key(0), mesh, rules)
    optimizer = make_optimizer(TrainConfig())
    shardings = jax.tree.map(lambda a: a.sharding, params)
    opt_shardings = optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, params), shardings, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    device = jax.devices()[0]
    real = _bytes_on_device((params, opt_state), device)
    ids_bytes = 4 * 16 * 4 // 2  # int32 ids split over fsdp=2
    assert plan.argument_bytes == pytest.approx(real + ids_bytes, rel=0.02)
    assert plan.alias_bytes > 0.9 * real  # parameters and optimizer state are donated and updated in place
    assert plan.temp_bytes > 0 and plan.flops_per_device > 0


def test_a_packed_sft_plan_adds_its_loss_mask_and_segment_ids_to_the_arguments():
    config = tiny_config()
    text = plan_step(config, "fsdp=2,tensor=4", "train", batch=4, seq=16)
    packed = plan_step(config, "fsdp=2,tensor=4", "train", batch=4, seq=16, packed=True)
    # float32 [4, 16] and int32 [4, 17], split over fsdp=2
    assert packed.argument_bytes - text.argument_bytes == (4 * 16 * 4 + 4 * 17 * 4) // 2
    assert packed.flops_per_device == pytest.approx(text.flops_per_device, rel=0.05)
    with pytest.raises(BloomJaxError, match="--packed plans a train step"):
        plan_step(config, "fsdp=2,tensor=4", "forward", batch=4, seq=16, packed=True)


def test_forward_plan_counts_bf16_weights():
    config = tiny_config()
    one = plan_step(config, "data=8", "forward", batch=8, seq=16)
    sharded = plan_step(config, "fsdp=2,tensor=4", "forward", batch=8, seq=16)
    assert one.argument_bytes > 7 * sharded.argument_bytes  # data parallel replicates, fsdp x tensor splits by 8
    assert one.argument_bytes >= config.num_params * 2  # bf16


def test_limits_and_fit():
    assert memory_limit_gib(None, "TPU v4") == 32 and memory_limit_gib(None, "v5p") == 95
    assert memory_limit_gib(40.0, "v4") == 40.0
    with pytest.raises(BloomJaxError, match="unknown device"):
        memory_limit_gib(None, "tpu9000")
    plan = plan_step(tiny_config(), "data=8", "forward", batch=8, seq=8)
    assert describe(plan, 1e-6)["fits"] is False and describe(plan, 1.0)["fits"] is True


def test_unknown_task():
    with pytest.raises(BloomJaxError, match="unknown task"):
        plan_step(tiny_config(), "data=8", "sing", batch=8, seq=8)


@pytest.mark.slow
def test_cli_plans_on_its_own_simulated_devices(tmp_path):
    config = tmp_path / "config.json"
    tiny_config().to_json(config)
    out = subprocess.run([sys.executable, "-m", "bloom_jax.cli", "plan", "--model", str(config),
                          "--mesh", "data=4,fsdp=4,tensor=2", "--seq", "32", "--device", "v5e"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["devices"] == 32 and result["batch"] == 16 and result["fits"] is True
    assert result["per_device_gib"]["total"] > 0


def test_generate_plan_holds_the_kv_cache():
    config = tiny_config()
    short = plan_step(config, "data=2,tensor=4", "generate", batch=2, seq=16)
    long = plan_step(config, "data=2,tensor=4", "generate", batch=2, seq=272)
    # Keys and values [layers, b*n, T, h] in bf16, split over data (batch) and tensor (heads).
    cache_bytes_per_position = 2 * config.n_layer * 2 * config.n_head * config.head_dim * 2 // 8
    assert long.argument_bytes - short.argument_bytes == pytest.approx(256 * cache_bytes_per_position, rel=0.05)


def test_a_speculative_round_plan_holds_both_models_and_their_caches():
    """`--task speculate`: the target's and the draft's weights and KV caches are the round's arguments (int8
    decode weights: a byte a weight, a float32 scale per output channel), donated, and a draft is required."""
    target, draft = tiny_config(n_layer=4), tiny_config(n_layer=1)
    plan = plan_step(target, "data=8", "speculate", batch=8, seq=64, draft=draft, draft_tokens=3,
                     decode_weights="int8")
    bf16 = plan_step(target, "data=8", "speculate", batch=8, seq=64, draft=draft, draft_tokens=3)
    cache_bytes = 2 * 1 * 8 * 64 * 8 * 2  # keys and values [b*n, T, h] in bf16, per layer: a row per device
    assert plan.parts["caches"] == pytest.approx(5 * cache_bytes, rel=0.05)  # 4 target layers, 1 draft layer
    assert bf16.parts["weights"] > 1.5 * plan.parts["weights"] and plan.alias_bytes >= plan.parts["caches"]
    with pytest.raises(BloomJaxError, match="needs a draft model"):
        plan_step(target, "data=8", "speculate", batch=2, seq=64)
    with pytest.raises(BloomJaxError, match="--decode-weights plans decoding"):
        plan_step(target, "data=8", "train", batch=2, seq=64, decode_weights="int8")


# -- the TPU compiler (libtpu, no TPU) -------------------------------------------------------------------------------
def test_slices_are_shaped_as_the_generations_are():
    from bloom_jax.plan import slice_shape

    assert [slice_shape(n, 2) for n in (1, 4, 8, 16, 256)] == [(1, 1, 1), (2, 2, 1), (2, 4, 1), (4, 4, 1),
                                                                (16, 16, 1)]
    assert [slice_shape(n, 3) for n in (4, 8, 64, 128)] == [(1, 2, 2), (2, 2, 2), (4, 4, 4), (4, 4, 8)]
    with pytest.raises(BloomJaxError, match="power-of-two chip count, not 6"):
        slice_shape(6, 2)


def _plan_cli(*args, env=None) -> tuple[int, dict | None, str]:
    out = subprocess.run([sys.executable, "-m", "bloom_jax.cli", "plan", *map(str, args)], capture_output=True,
                         text=True, timeout=300, env=env)
    return out.returncode, json.loads(out.stdout) if out.returncode == 0 else None, out.stderr


@pytest.mark.slow
def test_the_tpu_compiler_plans_a_v5e_slice_and_reports_what_does_not_fit(tmp_path):
    pytest.importorskip("libtpu", reason="the TPU compiler is the tpu extra (pip install 'bloom-jax[tpu]')")
    config = tmp_path / "config.json"
    tiny_config().to_json(config)
    code, result, err = _plan_cli("--model", config, "--mesh", "fsdp=4", "--seq", "64", "--device", "v5e")
    assert code == 0, err[-2000:]
    assert result["compiler"] == "TPU compiler (TPU v5 lite)" and result["devices"] == 4 and result["fits"] is True
    assert 0 < result["per_device_gib"]["total"] < 0.1
    # The reference attention's scores at 64 x 8192 (8 heads, fp32): 128 GiB, far over a chip's 15.75 GiB. The
    # compiler refuses the step; the plan says so, with the figure from its refusal.
    code, result, err = _plan_cli("--model", config, "--mesh", "fsdp=1", "--seq", "8192", "--batch", "64",
                                  "--device", "v5e", "--attention", "reference", "--task", "forward")
    assert code == 0, err[-2000:]
    assert result["fits"] is False and result["compiler_hbm_gib"] == 15.75
    assert result["per_device_gib"]["temporaries"] > 100
    # The same step with XLA:CPU standing in says which compiler it was.
    code, result, err = _plan_cli("--model", config, "--mesh", "fsdp=4", "--seq", "64", "--device", "v5e",
                                  "--compiler", "xla-cpu")
    assert code == 0 and result["compiler"] == "XLA:CPU (stand-in)", err[-2000:]


def test_cpu_runs_stay_quiet_with_libtpu_installed():
    pytest.importorskip("libtpu", reason="the TPU compiler is the tpu extra (pip install 'bloom-jax[tpu]')")
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    code = "import bloom_jax, jax; print(jax.default_backend(), len(jax.devices()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["cpu", "1"] and out.stderr == "", out.stderr[-2000:]
