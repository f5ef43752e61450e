"""Training: gradients against PyTorch autograd, the sharded and the accumulated step against the plain one, the
optimizer, and whole runs (the loss falls, metrics, exact resume after SIGTERM, the NaN stop, 2 processes), through
the API and the `bloom-jax` command.

The runs share one recipe (`RECIPE`, run A: conftest.py): a 2-layer BLOOM learning Python's `json` package for
24 steps on the 8 simulated devices. JAX's persistent compilation cache is on here, so the runs after A (same
programs) do not compile again. The trainer's faults (kills, full and unwritable disks, damaged checkpoints) are
in test_faults.py beside this file.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import struct
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.traverse_util import flatten_dict
from commands import error_line, run_cli
from reference import hf_model, random_ids, save_hf, tiny_config
from runs import (
    MESH,
    RECIPE,
    checkpoint_steps,
    read_metrics,
    same_final_weights,
    two_processes,
    without_timing,
    write_recipe,
)

from bloom_jax import Generator, from_pretrained
from bloom_jax.checkpoints import hf
from bloom_jax.config import configs_dir, load_config
from bloom_jax.data import expand_files, load_corpus, split_documents
from bloom_jax.model import abstract_params, forward_flops, make_model
from bloom_jax.sharding import ShardingPlan, load_rules, make_mesh
from bloom_jax.tokenizer import Tokenizer
from bloom_jax.losses import next_token_loss
from bloom_jax.recipe import TrainConfig, data_files
from bloom_jax.train import (
    Trainer,
    decay_mask,
    learning_rate_schedule,
    make_optimizer,
    optimizer_shardings,
    peak_flops_per_device,
    train_step,
)

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

KILL_AT = 10  # run B gets SIGTERM during this step (not a save step: the signal's own save is what resumes)
MULTIHOST_STOP = 4  # the 2-process run stops after this step


# -- helpers -----------------------------------------------------------------------------------------------------------
def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def worst_relative_error(ours: dict, ref: dict) -> tuple[float, str]:
    """The largest per-tensor `relative_error` over two parameter trees, and the tensor's name."""
    a, b = flatten_dict(ours), flatten_dict(ref)
    assert a.keys() == b.keys()
    return max((relative_error(a[k], b[k]), "/".join(k)) for k in a)


def tensorboard_scalars(directory: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value of every scalar in the TFRecord event files under `directory`."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, the record, its crc
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def sigterm_during_step(step: int):
    """Patches the Trainer so that this process sends itself a real SIGTERM while fetching step `step`'s batch."""
    fetch = Trainer._global_batch

    def global_batch(self, batches, index, sharding):
        if index == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return fetch(self, batches, index, sharding)

    return global_batch


# -- module fixtures: the runs after run A (conftest) ------------------------------------------------------------
@pytest.fixture(scope="module")
def run_b(run_a, recipe_file, tmp_path_factory) -> dict:
    """Run B: RECIPE with A's tokenizer, SIGTERM during step KILL_AT, then the same command again (the CLI)."""
    a_dir, _ = run_a
    output_dir = tmp_path_factory.mktemp("run") / "b"
    overrides = [f"output_dir={output_dir}", f"tokenizer={a_dir}", f"data_cache={a_dir / 'data-cache'}"]
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_global_batch", sigterm_during_step(KILL_AT))
        stopped = Trainer(TrainConfig.from_yaml(recipe_file, overrides), progress=False).run()
    after_stop = {"metrics": read_metrics(output_dir), "checkpoints": checkpoint_steps(output_dir),
                  "final": (output_dir / "final").exists(),
                  "handler_restored": signal.getsignal(signal.SIGTERM) == handler}
    code, out, err = run_cli("train", recipe_file, *overrides)
    assert code == 0, err[-3000:]
    return {"dir": output_dir, "stopped": stopped, "after_stop": after_stop, "stdout": out, "stderr": err}


# -- 1. gradients against PyTorch ------------------------------------------------------------------------------------
def test_gradients_equal_pytorch_autograd(tmp_path):
    import torch

    config = tiny_config()
    torch_model = hf_model(config)  # every tensor randomised away from init: LayerNorms and biases matter
    model, params = from_pretrained(save_hf(torch_model, tmp_path / "hf"))
    tokens = random_ids(config, 4, 17, seed=3)  # [b, s + 1]

    # transformers shifts the labels itself: logits[:, :-1] score labels[:, 1:]. With the whole window as both
    # input and labels that is our loss (tokens[:, 1:] from tokens[:, :-1]); the last position's logits, which
    # we never compute, are unused and, by causality, change nothing before them.
    ids = torch.as_tensor(tokens, dtype=torch.long)
    torch_loss = torch_model(input_ids=ids, labels=ids).loss
    torch_loss.backward()
    torch_loss = torch_loss.detach()
    loss, grads = jax.jit(jax.value_and_grad(lambda p: next_token_loss(model, p, tokens)))(params)
    # fp32, two different programs: the losses (14.33 here) agree to the last bit on this machine; 1e-6 allows
    # a different summation order.
    assert float(loss) == pytest.approx(torch_loss.item(), rel=1e-6)

    named = dict(torch_model.named_parameters())
    assert "lm_head.weight" not in named  # tied: its gradient is accumulated into the embedding's
    compared = set()
    for name, parameter in named.items():
        target = hf.target_of(hf.strip_prefix(name), config)
        ours = grads
        for key in target.path:
            ours = ours[key]
        ours = np.asarray(ours if target.layer is None else ours[target.layer])
        ours_as_torch = hf.from_param(ours, target.mapping)
        ref = parameter.grad.numpy()
        assert ours_as_torch.shape == ref.shape, name
        assert np.max(np.abs(ref)) > 1e-3, f"{name}: a near-zero reference gradient proves nothing"
        # Measured worst over the 29 tensors: 7.4e-7 (fp32 summation order); the bar leaves 100x.
        assert relative_error(ours_as_torch, ref) <= 1e-4, name
        compared.add((target.path, target.layer))
    assert len(compared) == len(jax.tree.leaves(grads)) - 12 + 12 * config.n_layer  # every (layer of a) tensor


# -- 2. the sharded step -------------------------------------------------------------------------------------------
# The learning rate at its peak from step 0, and adam_eps 1e-4 instead of 1e-8: Adam's update lr * g / (|g| + eps)
# of an element whose gradient is tiny (cancellation, ~1e-5 of its tensor's largest) turns the fp32 rounding of g
# into differences of a fraction of lr. Measured worst params after one step, relative per tensor, with gradients
# equal to ~5e-7 throughout: eps 1e-8: 2.5e-4; 1e-6: 6e-5; 1e-4: 1.2e-6 (2e-6 after two sharded steps).
# The gradients themselves are compared through Adam's moments.
STEP_CFG = dict(learning_rate=1e-2, warmup_steps=0, steps=10, batch_size=8, adam_eps=1e-4)


@functools.cache
def plain_step(grad_accum: int):
    """(model, optimizer, jitted train_step) on one device for tiny_config (vocab 512)."""
    model = make_model(tiny_config())
    optimizer = make_optimizer(TrainConfig(**STEP_CFG, grad_accum=grad_accum))
    step = jax.jit(lambda state, tokens: train_step(model, optimizer, grad_accum, 0, False, state, tokens))
    return model, optimizer, step


def random_params(model, seed: int = 0) -> dict:
    """Parameters drawn with numpy (no init to compile): kernels and the embedding N(0, 0.05), LayerNorm scales
    1 + N(0, 0.3), biases N(0, 0.3)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(abstract_params(model))

    def draw(path, shape):
        name = path[-1].key
        noise = rng.standard_normal(shape.shape).astype(np.float32)
        return jnp.asarray({"scale": 1 + 0.3 * noise, "bias": 0.3 * noise}.get(name, 0.05 * noise))

    return jax.tree_util.tree_map_with_path(draw, shapes)


def initial_state(model, optimizer) -> dict:
    params = random_params(model)
    return {"step": jnp.int32(0), "params": params, "opt_state": jax.jit(optimizer.init)(params)}


def batches(n: int, batch: int = 8, seq: int = 16) -> list[np.ndarray]:
    return [random_ids(tiny_config(), batch, seq + 1, seed=10 + i) for i in range(n)]


def adam_moments(state: dict) -> dict[str, np.ndarray]:
    """Adam's first and second moments by name: after step 1, mu = 0.1 g and nu = 0.05 g^2 (g clipped)."""
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state["opt_state"]))
            if ".mu" in jax.tree_util.keystr(path) or ".nu" in jax.tree_util.keystr(path)}


def worst_moment_error(ours: dict, ref: dict) -> tuple[float, str]:
    a, b = adam_moments(ours), adam_moments(ref)
    assert a.keys() == b.keys() and len(a) == 2 * 17
    return max((relative_error(a[k], b[k]), k) for k in a)


@pytest.mark.slow
def test_sharded_step_equals_one_device():
    model, optimizer, step = plain_step(1)
    state = initial_state(model, optimizer)
    mesh = make_mesh(MESH)
    plan = ShardingPlan.create(mesh, "fsdp_tensor")
    params_sh = plan.param_shardings(model)
    opt_sh = optimizer_shardings(optimizer, jax.eval_shape(optimizer.init, state["params"]), params_sh, mesh)
    replicated = plan.replicated
    state_sh = {"step": replicated, "params": params_sh, "opt_state": opt_sh}
    data_sh = plan.batch_sharding()
    sharded_step = jax.jit(lambda s, t: train_step(model, optimizer, 1, 0, False, s, t),
                           in_shardings=(state_sh, data_sh), out_shardings=(state_sh, replicated))

    plain, sharded = state, jax.device_put(state, state_sh)
    for i, tokens in enumerate(batches(2)):
        plain, plain_metrics = step(plain, tokens)
        with plan.context():
            sharded, sharded_metrics = sharded_step(sharded, jax.device_put(tokens, data_sh))
        # Measured: loss ~1e-7 and grad norm ~1e-6 relative (reductions split over 8 devices).
        assert float(sharded_metrics["loss"]) == pytest.approx(float(plain_metrics["loss"]), rel=1e-5)
        assert float(sharded_metrics["grad_norm"]) == pytest.approx(float(plain_metrics["grad_norm"]), rel=1e-5)
        if i == 0:  # the gradients of step 1, per tensor, through Adam's moments: measured ~5e-7
            error, name = worst_moment_error(sharded, plain)
            assert error <= 1e-5, name
    assert int(sharded["step"]) == 2

    # Really sharded: the QKV kernel [layers, d, n, 3, h] over fsdp (d) and tensor (heads), its Adam moments alike.
    qkv = sharded["params"]["h"]["self_attention"]["query_key_value"]["kernel"]
    assert tuple(qkv.sharding.spec) == (None, "fsdp", "tensor", None, None)
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(sharded["opt_state"])
               if "query_key_value" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
    assert len(moments) == 2 and all(m.sharding.is_equivalent_to(qkv.sharding, qkv.ndim) for m in moments)
    # Parameters after 2 AdamW steps, per tensor: measured ~2e-6.
    error, name = worst_relative_error(jax.device_get(sharded["params"]), jax.device_get(plain["params"]))
    assert error <= 1e-5, name


# -- 3. gradient accumulation --------------------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch():
    model, optimizer, one = plain_step(1)
    _, _, four = plain_step(4)
    state = initial_state(model, optimizer)
    (tokens,) = batches(1)
    after_one, metrics_one = one(state, tokens)
    after_four, metrics_four = four(state, tokens)
    # Mean of 4 equal micro-batch means = the mean over the batch. Measured difference ~5e-7 on a loss of ~6.2.
    assert float(metrics_four["loss"]) == pytest.approx(float(metrics_one["loss"]), abs=1e-6, rel=0)
    assert float(metrics_four["grad_norm"]) == pytest.approx(float(metrics_one["grad_norm"]), rel=1e-5)
    error, name = worst_moment_error(after_four, after_one)  # the gradients: measured ~5e-7
    assert error <= 1e-5, name
    error, name = worst_relative_error(after_four["params"], after_one["params"])  # measured ~1.2e-6
    assert error <= 1e-5, name
    # ...and the step really moved them: the update is ~lr per element.
    moved, _ = worst_relative_error(after_one["params"], state["params"])
    assert moved > 1e-2


# -- 4. the optimizer ------------------------------------------------------------------------------------------------
DECAYED = {"word_embeddings/embedding", "h/self_attention/query_key_value/kernel", "h/self_attention/dense/kernel",
           "h/mlp/dense_h_to_4h/kernel", "h/mlp/dense_4h_to_h/kernel"}
NOT_DECAYED = {"word_embeddings_layernorm/scale", "word_embeddings_layernorm/bias", "ln_f/scale", "ln_f/bias",
               "h/input_layernorm/scale", "h/input_layernorm/bias", "h/post_attention_layernorm/scale",
               "h/post_attention_layernorm/bias", "h/self_attention/query_key_value/bias",
               "h/self_attention/dense/bias", "h/mlp/dense_h_to_4h/bias", "h/mlp/dense_4h_to_h/bias"}


def test_decay_mask_is_kernels_and_the_embedding():
    shapes = nn.unbox(abstract_params(make_model(tiny_config())))
    mask = {"/".join(k): v for k, v in flatten_dict(decay_mask(shapes)).items()}
    assert {k for k, v in mask.items() if v} == DECAYED
    assert {k for k, v in mask.items() if not v} == NOT_DECAYED
    unrolled = nn.unbox(abstract_params(make_model(tiny_config(), scan_layers=False)))
    mask = {"/".join(k): v for k, v in flatten_dict(decay_mask(unrolled)).items()}
    assert sum(mask.values()) == 1 + 4 * 2 and len(mask) == 5 + 12 * 2


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learning_rate_schedule(schedule):
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, steps=110, schedule=schedule, min_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(5e-4, rel=1e-6)  # linear warmup
    assert float(lr(10)) == pytest.approx(1e-3, rel=1e-6)  # the peak at the end of warmup
    assert float(lr(60)) == pytest.approx(5.5e-4, rel=1e-5)  # half way: both decays at (peak + min) / 2
    quarter = 1e-4 + 9e-4 * (0.5 * (1 + math.cos(math.pi / 4)) if schedule == "cosine" else 0.75)
    assert float(lr(35)) == pytest.approx(quarter, rel=1e-5)
    assert float(lr(110)) == pytest.approx(1e-4, rel=1e-5)  # min_lr_ratio * peak at `steps`
    assert float(lr(1000)) == pytest.approx(1e-4, rel=1e-5)  # and after


def test_constant_schedule_and_no_warmup():
    lr = learning_rate_schedule(TrainConfig(learning_rate=2e-3, warmup_steps=0, steps=50, schedule="constant"))
    assert [float(lr(s)) for s in (0, 25, 50)] == pytest.approx([2e-3] * 3, rel=1e-7)


def test_weight_decay_spares_layernorms_and_biases():
    params = random_params(make_model(tiny_config()))  # away from init: biases and scale - 1 nonzero
    lr, wd = 1e-2, 0.1
    optimizer = make_optimizer(TrainConfig(learning_rate=lr, warmup_steps=0, weight_decay=wd))
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    after = {"/".join(k): np.asarray(v) for k, v in flatten_dict(optax.apply_updates(params, updates)).items()}
    before = {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}
    for name in DECAYED:  # AdamW with zero gradients: only the decoupled decay, p - lr * wd * p
        assert relative_error(after[name], before[name] * (1 - lr * wd)) <= 1e-6, name
        assert not np.array_equal(after[name], before[name])
    for name in NOT_DECAYED:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_peak_flops_from_the_config_or_the_device(monkeypatch):
    assert peak_flops_per_device(TrainConfig(peak_tflops=2.5)) == 2.5e12

    # device_kind as the TPU compiler's topologies and a GPU runtime report it.
    for kind, tflops in [("TPU v5", 459), ("TPU v5 lite", 197), ("TPU v6 lite", 918), ("TPU v4", 275),
                         ("NVIDIA H100 80GB HBM3", 989)]:
        monkeypatch.setattr(jax, "devices", lambda *a, **k: [types.SimpleNamespace(device_kind=kind)])
        assert peak_flops_per_device(TrainConfig()) == tflops * 1e12, kind


# -- 5. a run from scratch ---------------------------------------------------------------------------------------
def test_run_from_scratch_learns_and_logs(run_a):
    output_dir, returned = run_a
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == list(range(1, 25))  # one line per step (log_every=1)
    losses = [m["loss"] for m in metrics]
    # From log(1024) = 6.93 at init; measured last ~5.5: a fall of ~1.4, the bar at 0.5.
    assert losses[0] == pytest.approx(math.log(1024), abs=0.05)
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(math.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in metrics)
    cfg = TrainConfig(**RECIPE)
    schedule = learning_rate_schedule(cfg)
    assert [m["learning_rate"] for m in metrics] == pytest.approx([float(schedule(s)) for s in range(24)], rel=1e-6)
    # MFU and throughput describe the same window: mfu * peak / FLOPs per step = tokens_per_s / tokens per step.
    flops_per_step = 3 * forward_flops(load_config("bloom-tiny"), 8, 32)
    for m in metrics:
        assert m["tokens_per_s"] > 0
        assert m["mfu"] * 1e12 * 8 / flops_per_step == pytest.approx(m["tokens_per_s"] / (8 * 32), rel=1e-9)
    evaluated = {m["step"]: m for m in metrics if "eval_loss" in m}
    assert sorted(evaluated) == [12, 24]
    for m in evaluated.values():
        assert m["eval_perplexity"] == pytest.approx(math.exp(m["eval_loss"]), rel=1e-9)
    assert evaluated[24]["eval_loss"] < evaluated[12]["eval_loss"] < math.log(1024)
    assert returned == {k: v for k, v in metrics[-1].items() if k != "time"}

    scalars = tensorboard_scalars(output_dir / "tensorboard")
    assert scalars["loss"] == {m["step"]: pytest.approx(m["loss"], rel=1e-6) for m in metrics}
    assert sorted(scalars["eval_loss"]) == [12, 24]
    assert checkpoint_steps(output_dir) == [8, 16, 24]
    # The tokenizer it trained, and the tokenized data cached.
    tokenizer = Tokenizer.from_dir(output_dir)
    assert tokenizer.vocab_size == 512
    assert len(list((output_dir / "data-cache").glob("*.tokens.npy"))) == 1


def test_final_checkpoint_loads_and_generates(run_a):
    output_dir, _ = run_a
    final = output_dir / "final"
    model, params = from_pretrained(final)
    assert model.config.vocab_size == 1024 and model.config.n_layer == 2
    # final/ holds the parameters of the last step: equal to the step-24 checkpoint's, bit for bit.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((output_dir / "checkpoints").absolute()) as manager:
        saved = manager.restore(24, args=ocp.args.StandardRestore())["params"]
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), params, saved))

    generator = Generator.from_pretrained(final)
    assert generator.tokenizer.vocab_size == 512
    (completion,) = generator.generate(["def "], max_new_tokens=8)
    ids = completion.completion_ids
    assert 1 <= len(ids) <= 8 and (len(ids) == 8 or ids[-1] == 2)
    assert completion.completion == generator.tokenizer.decode(ids)
    # Greedy: the first new token is the argmax of the trained model's logits after the prompt.
    logits = model.apply({"params": params}, np.array([completion.prompt_ids], np.int32))
    assert ids[0] == int(np.argmax(logits[0, -1]))


def test_final_checkpoint_exports_to_hugging_face(run_a, tmp_path):
    output_dir, _ = run_a
    code, out, err = run_cli("export", output_dir / "final", tmp_path / "hf")
    assert code == 0, err[-2000:]
    _, exported = from_pretrained(tmp_path / "hf")
    _, final = from_pretrained(output_dir / "final")
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), exported, final))


def test_fine_tuning_starts_from_the_base_and_keeps_its_settings(run_a, tmp_path):
    # A base checkpoint with the generation and tokenizer settings a hub checkpoint has; learning rate 1e-9, so
    # that AdamW moves each weight by at most about 2e-9 in the 2 steps: the fine-tune ends where the base is.
    a_dir, _ = run_a
    base = tmp_path / "base"
    shutil.copytree(a_dir / "final", base)
    side = {"generation_config.json": b'{"eos_token_id": 2, "max_new_tokens": 5}',
            "tokenizer_config.json": b'{"padding_side": "left"}', "special_tokens_map.json": b'{"eos_token": "</s>"}'}
    for name, data in side.items():
        (base / name).write_bytes(data)
    output_dir = tmp_path / "tuned"
    recipe = {k: v for k, v in RECIPE.items() if k != "model"}
    cfg = TrainConfig.from_dict({**recipe, "init_from": str(base), "output_dir": str(output_dir), "steps": 2,
                                 "warmup_steps": 0, "learning_rate": 1e-9, "save_every": 100, "eval_every": 100,
                                 "data_cache": str(a_dir / "data-cache")})
    Trainer(cfg, progress=False).run()
    assert {name: (output_dir / "final" / name).read_bytes() for name in side} == side
    _, tuned = from_pretrained(output_dir / "final")
    _, expected = from_pretrained(base)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tuned, expected)
    assert max(jax.tree.leaves(moved)) <= 1e-7, moved
    assert Generator.from_pretrained(output_dir / "final").defaults.max_new_tokens == 5


# -- 6. kill and resume --------------------------------------------------------------------------------------------
def test_sigterm_saves_and_stops(run_b):
    after_stop = run_b["after_stop"]
    assert [m["step"] for m in after_stop["metrics"]] == list(range(1, KILL_AT + 1))
    assert run_b["stopped"]["step"] == KILL_AT
    # The save_every save and the signal's, nothing after (step 1 too: see the next test).
    assert {8, KILL_AT} <= set(after_stop["checkpoints"]) and max(after_stop["checkpoints"]) == KILL_AT
    assert not after_stop["final"]  # stopped early: no final/
    assert after_stop["handler_restored"]  # the Trainer put the previous SIGTERM handler back


def test_checkpoints_only_every_save_every_steps(run_b):
    assert run_b["after_stop"]["checkpoints"] == [8, KILL_AT]


def test_resume_reproduces_the_uninterrupted_run_exactly(run_a, run_b):
    a_dir, _ = run_a
    b_dir = run_b["dir"]
    assert f"resuming from step {KILL_AT}" in run_b["stderr"]
    a, b = read_metrics(a_dir), read_metrics(b_dir)
    assert [m["step"] for m in b] == list(range(1, 25))  # the resumed run appends steps 11..24
    # Before and after the kill: loss, grad norm, lr, eval, bit for bit (CPU).
    assert without_timing(b) == without_timing(a)
    printed = json.loads(run_b["stdout"])
    assert printed["output_dir"] == str(b_dir) and printed["step"] == 24 and printed["loss"] == a[-1]["loss"]
    assert same_final_weights(b_dir, a_dir)


# -- 7. NaN stop ---------------------------------------------------------------------------------------------------
def run_with_a_nan_gradient(run_a, recipe_file, output_dir, *overrides) -> dict:
    """RECIPE with a loss whose value is the real one but whose gradient turns NaN once the final LayerNorm's
    bias has moved, as when the backward pass overflows, through the CLI: {"dir", "message"} (the error)."""
    import bloom_jax.train.step

    a_dir, _ = run_a
    real_loss = bloom_jax.train.step.next_token_loss

    def loss_with_nan_gradient(model, params, tokens, dropout_rng=None, chunk_tokens=1024, weights=None,
                               segment_ids=None):
        bias = params["ln_f"]["bias"]  # zero at init, moved by step 1's update
        nan_gradient = jax.lax.cond(jnp.all(bias == 0), lambda b: 0.0, lambda b: 0.0 * jnp.sqrt(jnp.sum(b * 0.0)),
                                    bias)  # d sqrt(0) = inf; 0 * inf: a real value, a NaN gradient
        return real_loss(model, params, tokens, dropout_rng, chunk_tokens, weights, segment_ids) + nan_gradient

    overrides = [f"output_dir={output_dir}", f"tokenizer={a_dir}", f"data_cache={a_dir / 'data-cache'}",
                 *overrides]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bloom_jax.train.step, "next_token_loss", loss_with_nan_gradient)
        code, out, err = run_cli("train", recipe_file, *overrides)
    # A run that failed, not a usage mistake: exit status 1, one line (the progress bar aside), no result. The
    # lines as a terminal shows them: the error must not trail the progress bar's last redraw (which ends in no
    # newline until the bar is closed).
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]
    lines = [line for line in shown if line.startswith("bloom-jax: error: ")]
    assert code == 1 and out == "" and len(lines) == 1, err[-3000:]
    return {"dir": output_dir, "message": lines[0].removeprefix("bloom-jax: error: ")}


@pytest.fixture(scope="module")
def nan_run(run_a, recipe_file, tmp_path_factory) -> dict:
    """save_every 1: step 1 is good (saved); step 2 moves the bias; step 3's loss is finite, its gradients not."""
    return run_with_a_nan_gradient(run_a, recipe_file, tmp_path_factory.mktemp("nan") / "out", "save_every=1")


def test_a_bad_step_is_caught_at_the_next_log_or_save_point_and_never_saved(run_a, recipe_file, tmp_path):
    # The loop reads the health flag only every 8 steps here (log and save): step 3 goes bad, the run stops at
    # step 8 naming step 3, and step 8 (whose state descends from it) is not saved.
    failed = run_with_a_nan_gradient(run_a, recipe_file, tmp_path / "out", "save_every=8", "log_every=8",
                                     "eval_every=8")
    assert failed["message"].startswith("non-finite loss, gradients or weights at step 3 (loss ")
    assert failed["message"].endswith("stopping. No checkpoint had been saved")
    assert not (tmp_path / "out" / "checkpoints").exists() or checkpoint_steps(tmp_path / "out") == []
    assert not (tmp_path / "out" / "final").exists()


def test_nan_loss_stops_the_run(nan_run):
    # Warmup starts at learning rate 0, so step 1 leaves the bias at zero: step 2 moves it, step 3 is the bad one.
    output_dir, bad = nan_run["dir"], 3
    assert nan_run["message"].startswith(f"non-finite loss, gradients or weights at step {bad} (loss ")
    assert nan_run["message"].endswith(f"stopping. The last good checkpoint is step {bad - 1} in "
                                       f"{output_dir / 'checkpoints'}")
    assert checkpoint_steps(output_dir) == list(range(1, bad))  # nothing at or after the bad step
    metrics = read_metrics(output_dir)
    assert [m["step"] for m in metrics] == list(range(1, bad))
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in metrics)
    assert not (output_dir / "final").exists()


def test_the_last_good_checkpoint_is_good(nan_run):
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((nan_run["dir"] / "checkpoints").absolute()) as manager:
        params = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())["params"]
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


# -- 8. config errors through the CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    (["bogus_key=1"], "recipe.yaml: unknown key 'bogus_key' (known: adam_b1, adam_b2,"),
    (["steps=abc"], "recipe.yaml: steps must be int, got 'abc'"),
    (["steps=2.5"], "recipe.yaml: steps must be int, got 2.5"),
    (["dropout=1"], "recipe.yaml: dropout must be bool, got 1"),
    (["batch_size=6", "grad_accum=4"], "train config: batch_size (6) must divide by grad_accum (4)"),
    (["learning_rate=0"], "train config: learning_rate must be > 0"),
    (["schedule=exp"], "train config: schedule must be one of cosine, linear, constant"),
    (["seq_len"], "override 'seq_len' is not key=value"),
    (["rules=pipeline"], "no sharding rules named 'pipeline'"),
])
def test_config_mistakes_are_one_line_and_exit_2(tmp_path, overrides, message):
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "out"))
    code, out, err = run_cli("train", recipe, *overrides)
    assert code == 2 and out == ""
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()  # nothing written


def test_empty_train_data_exits_2(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "out"))
    code, out, err = run_cli("train", recipe, "train_data=[]")
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1] == ("bloom-jax: error: train config: train_data is empty (text, JSONL, "
                                            "Parquet or Arrow files, directories or globs) and no hf_dataset is "
                                            "given")
    assert not (tmp_path / "out").exists()


def test_empty_train_data_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", output_dir=str(tmp_path / "out"))
    _, _, err = run_cli("train", recipe, "train_data=[]")
    error_line(err)


def test_missing_or_bad_recipe_files_exit_2(tmp_path):
    code, _, err = run_cli("train", tmp_path / "nope.yaml")
    assert code == 2 and f"cannot read {tmp_path / 'nope.yaml'}: No such file or directory" in error_line(err)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    code, _, err = run_cli("train", tmp_path / "list.yaml")
    assert code == 2 and "list.yaml must be a mapping of settings" in error_line(err)
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    code, _, err = run_cli("train", tmp_path / "bad.yaml")
    assert code == 2 and "bad.yaml is not valid YAML" in error_line(err)


def test_float_overrides_in_exponent_notation():
    cfg = TrainConfig.from_yaml("quickstart", ["learning_rate=1e-3", "adam_eps=1e-6"])
    assert cfg.learning_rate == 1e-3 and cfg.adam_eps == 1e-6


@pytest.mark.parametrize("name", sorted(p.stem for p in (configs_dir() / "train").glob("*.yaml")))
def test_every_shipped_recipe_is_valid(name):
    cfg = TrainConfig.from_yaml(name)  # by name, resolved under configs/train
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    load_rules(cfg.rules)
    if cfg.init_from is None:
        load_config(cfg.model)
    assert cfg.batch_size % cfg.grad_accum == 0


def test_shipped_recipes_load_by_name():
    quickstart = TrainConfig.from_yaml("quickstart")
    assert (quickstart.model, quickstart.steps, quickstart.batch_size, quickstart.learning_rate) == \
        ("bloom-mini", 120, 8, 3e-3)
    files = [Path(f) for f in expand_files(data_files(quickstart))]  # {python_stdlib}: this Python's library
    assert len(files) > 100 and all(f.suffix == ".py" and f.parent == Path(json.__file__).parent.parent
                                    for f in files)
    assert load_config(quickstart.model).vocab_size == quickstart.tokenizer_vocab_size == 4096

    big = TrainConfig.from_yaml("bloom-176b", ["steps=10"])
    assert big.steps == 10 and big.batch_size * big.seq_len == 2048 * 2048 and big.grad_accum == 16
    assert (big.compute_dtype, big.param_dtype, big.remat_policy, big.mesh) == \
        ("bfloat16", "float32", "full", "fsdp=-1,tensor=4")
    assert load_config(big.model).n_layer == 70
    assert TrainConfig.from_dict(big.to_dict()) == big


# -- 9. eval and tokenizer commands ---------------------------------------------------------------------------------
def test_eval_command_on_the_held_out_text_gives_the_run_s_eval_loss(run_a):
    output_dir, _ = run_a
    files = expand_files(data_files(TrainConfig(**RECIPE)))
    _, held_out = split_documents(len(files), RECIPE["eval_fraction"], seed=0)
    code, out, err = run_cli("eval", output_dir / "final", "--data", *[files[i] for i in held_out],
                             "--seq-len", 32, "--batch-size", 8, "--max-batches", 2)
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == 2 * 8 * 32
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    # The same 16 windows as the run's eval at step 24 (the held-out documents in corpus order), on one device
    # instead of 8: measured ~1e-7 relative.
    run_eval = read_metrics(output_dir)[-1]["eval_loss"]
    assert result["loss"] == pytest.approx(run_eval, rel=1e-5)


def test_tokenizer_train_command(tmp_path):
    files = [str(p) for p in expand_files(data_files(TrainConfig(**RECIPE)))]
    code, out, err = run_cli("tokenizer", "train", *files, "--vocab-size", 300, "--out", tmp_path / "tok")
    assert code == 0, err
    assert json.loads(out) == {"tokenizer": str(tmp_path / "tok" / "tokenizer.json"), "vocab_size": 300}
    tokenizer = Tokenizer.from_dir(tmp_path / "tok")
    text = Path(files[0]).read_text()[:2000]
    assert tokenizer.vocab_size == 300 and tokenizer.decode(tokenizer.encode(text)) == text
    code, _, err = run_cli("tokenizer", "train", *files, "--vocab-size", 100, "--out", tmp_path / "small")
    assert code == 2 and "vocab_size must be at least 260" in error_line(err)


# -- 10. LoRA --------------------------------------------------------------------------------------------------
LORA_STEPS, LORA_KILL_AT = 40, 13


def lora_overrides(run_a, output_dir) -> list[str]:
    """Run A's final checkpoint as the frozen fp32 base, rank-4 adapters with dropout on every target."""
    a_dir, _ = run_a
    # New text for the base (the email.mime modules: their boilerplate is quick to learn).
    return [f"init_from={a_dir / 'final'}", f"output_dir={output_dir}", "train_data=['{python_stdlib}/email/mime/*.py']",
            "lora.rank=4", "lora.alpha=8", "lora.dropout=0.1", "lora.base=float32", f"steps={LORA_STEPS}",
            "save_every=8", "eval_every=20", "learning_rate=3e-2", "warmup_steps=2"]


@pytest.fixture(scope="module")
def lora_runs(run_a, recipe_file, tmp_path_factory) -> dict:
    """A LoRA run uninterrupted, and one killed during step LORA_KILL_AT and resumed by the CLI."""
    a_dir, _ = run_a
    base_bytes = {p.name: p.read_bytes() for p in (a_dir / "final" / "params").rglob("*") if p.is_file()}
    whole = tmp_path_factory.mktemp("lora") / "whole"
    Trainer(TrainConfig.from_yaml(recipe_file, lora_overrides(run_a, whole)), progress=False).run()
    resumed = tmp_path_factory.mktemp("lora") / "resumed"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "_global_batch", sigterm_during_step(LORA_KILL_AT))
        Trainer(TrainConfig.from_yaml(recipe_file, lora_overrides(run_a, resumed)), progress=False).run()
    code, out, err = run_cli("train", recipe_file, *lora_overrides(run_a, resumed))
    assert code == 0, err[-3000:]
    after = {p.name: p.read_bytes() for p in (a_dir / "final" / "params").rglob("*") if p.is_file()}
    return {"whole": whole, "resumed": resumed, "stderr": err, "base_unchanged": after == base_bytes}


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_writes_a_peft_adapter(run_a, lora_runs):
    from bloom_jax.checkpoints.peft import load_adapter
    from bloom_jax.lora import merge_trees

    a_dir, _ = run_a
    whole = lora_runs["whole"]
    metrics = read_metrics(whole)
    assert [m["step"] for m in metrics] == list(range(1, LORA_STEPS + 1))
    # The frozen base's tiny embedding bounds its logits, so rank-4 adapters lower the loss slowly here (measured:
    # mean of the first 10 steps 5.610, of the last 10 5.556; held-out 5.582 at step 20, 5.561 at 40).
    # tests/test_lora.py shows them fit a batch on a base with room in its logits.
    losses = [m["loss"] for m in metrics]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.03, losses
    assert evals[-1] < evals[0] - 0.01, evals
    assert lora_runs["base_unchanged"]
    config = json.loads((whole / "final" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(a_dir / "final") and config["r"] == 4
    assert (whole / "final" / "tokenizer.json").is_file()

    # The checkpoints hold the adapters and their moments, not a copy of the base.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((whole / "checkpoints").absolute()) as manager:
        saved = manager.restore(LORA_STEPS, args=ocp.args.StandardRestore())
    leaves = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(saved["params"])]
    assert len(leaves) == 2 * 4 and all(name.endswith(("['lora_a']", "['lora_b']")) for name in leaves)
    base_model, base = from_pretrained(a_dir / "final")
    lora, adapters, _ = load_adapter(whole / "final", base_model.config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), saved["params"], adapters)
    # The adapters moved away from zero, and the model with them is not the base.
    assert all(float(np.max(np.abs(leaf))) > 0 for path, leaf in flatten_dict(adapters).items() if path[-1] == "lora_b")
    ids = np.array([[5, 6, 7, 8]], np.int32)
    tuned = base_model.clone(lora=lora).apply({"params": merge_trees(base, adapters)}, ids)
    assert float(np.max(np.abs(tuned - base_model.apply({"params": base}, ids)))) > 1e-3


@pytest.mark.slow
def test_lora_resume_reproduces_the_uninterrupted_run_exactly(lora_runs):
    assert f"resuming from step {LORA_KILL_AT}" in lora_runs["stderr"]
    a, b = read_metrics(lora_runs["whole"]), read_metrics(lora_runs["resumed"])
    assert without_timing(b) == without_timing(a)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (lora_runs["resumed"] / "final" / name).read_bytes() == (lora_runs["whole"] / "final" / name).read_bytes()


def test_lora_step_leaves_the_frozen_base_bit_for_bit():
    from bloom_jax.lora import LoraConfig, split_adapters

    lora = LoraConfig(rank=2, alpha=4.0)
    model = make_model(tiny_config(), lora=lora)
    frozen, adapters = split_adapters(random_params(model))
    optimizer = make_optimizer(TrainConfig(**STEP_CFG))
    state = {"step": jnp.int32(0), "params": adapters, "opt_state": jax.jit(optimizer.init)(adapters)}
    before = jax.tree.map(np.array, frozen)
    step = jax.jit(lambda state, tokens, frozen: train_step(model, optimizer, 1, 0, False, state, tokens,
                                                            frozen=frozen))
    new_state, metrics = step(state, batches(1)[0], frozen)
    assert bool(metrics["finite"]) and jax.tree.structure(new_state["params"]) == jax.tree.structure(adapters)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), new_state["params"],
                         adapters)
    assert min(jax.tree.leaves(moved)) > 0  # every adapter weight trains (lora_b from zero too)


@pytest.mark.slow
def test_lora_cli_exports_merges_and_generates_with_the_adapter(run_a, lora_runs, tmp_path):
    import torch
    import transformers

    from bloom_jax.checkpoints.peft import load_adapter
    from bloom_jax.lora import fold, merge_trees

    a_dir, _ = run_a
    base_dir, whole = a_dir / "final", lora_runs["whole"]
    code, out, err = run_cli("export-adapter", whole, tmp_path / "exported")
    assert code == 0, err
    assert json.loads(out)["step"] == LORA_STEPS
    for name in ("adapter_model.safetensors", "adapter_config.json"):  # the newest checkpoint is the final one
        assert (tmp_path / "exported" / name).read_bytes() == (whole / "final" / name).read_bytes()
    code, _, err = run_cli("export-adapter", whole, tmp_path / "nope", "--step", 3)
    assert code == 2 and "has no checkpoint of step 3" in error_line(err)
    code, _, err = run_cli("export-adapter", a_dir, tmp_path / "nope")
    assert code == 2 and "is not the output_dir of a LoRA run" in error_line(err)

    model, base = from_pretrained(base_dir)
    lora, adapters, _ = load_adapter(whole / "final", model.config)
    ids = np.array([[5, 6, 7, 8, 9]], np.int32)
    adapted = model.clone(lora=lora).apply({"params": merge_trees(base, adapters)}, ids)
    code, _, err = run_cli("merge", base_dir, whole / "final", tmp_path / "merged")
    assert code == 0, err
    merged_model, merged = from_pretrained(tmp_path / "merged")
    assert relative_error(merged_model.apply({"params": merged}, ids), adapted) <= 1e-5
    code, _, err = run_cli("merge", base_dir, whole / "final", tmp_path / "merged-hf", "--hf")
    assert code == 0, err
    hf = transformers.BloomForCausalLM.from_pretrained(tmp_path / "merged-hf").eval()
    with torch.no_grad():
        hf_logits = hf(input_ids=torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert relative_error(hf_logits, adapted) <= 1e-5
    assert relative_error(model.apply({"params": fold(merge_trees(base, adapters), lora)}, ids), adapted) <= 1e-5

    # Generation with the adapter: folded (the default) and beside the weights give the same greedy tokens,
    # whose first is the adapted model's argmax; the CLI prints that completion.
    prompt = "def "
    merged_gen = Generator.from_pretrained(base_dir, adapter=whole / "final")
    beside_gen = Generator.from_pretrained(base_dir, adapter=whole / "final", merge_adapter=False,
                                           decode_weights="int8")
    (folded,) = merged_gen.generate([prompt], max_new_tokens=6)
    (beside,) = Generator.from_pretrained(base_dir, adapter=whole / "final", merge_adapter=False).generate(
        [prompt], max_new_tokens=6)
    assert folded.completion_ids == beside.completion_ids
    assert beside_gen.model.lora == lora and len(beside_gen.generate([prompt], max_new_tokens=6)[0].completion_ids)
    logits = model.clone(lora=lora).apply({"params": merge_trees(base, adapters)},
                                          np.array([folded.prompt_ids], np.int32))
    assert folded.completion_ids[0] == int(np.argmax(logits[0, -1]))
    code, out, err = run_cli("generate", base_dir, "--adapter", whole / "final", "--prompt", prompt,
                             "--max-new-tokens", 6, "--json")
    assert code == 0, err
    assert json.loads(out)["completion_ids"] == folded.completion_ids


@pytest.mark.slow
def test_qlora_run_on_an_nf4_base_tracks_the_float_run(run_a, recipe_file, lora_runs, tmp_path):
    output_dir = tmp_path / "qlora"
    overrides = [o for o in lora_overrides(run_a, output_dir) if not o.startswith(("lora.base=", "steps="))]
    cfg = TrainConfig.from_yaml(recipe_file, [*overrides, "lora.base=nf4", "steps=8"])
    Trainer(cfg, progress=False).run()
    ours, floats = read_metrics(output_dir), read_metrics(lora_runs["whole"])[:8]
    # The same adapters, batches and dropout on the fp32 base: the loss within 3% (measured: 0.40%).
    assert max(abs(q["loss"] - f["loss"]) / f["loss"] for q, f in zip(ours, floats)) <= 0.03
    assert (output_dir / "final" / "adapter_model.safetensors").is_file()


# -- 11. two processes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_train_as_one(run_a, recipe_file, tmp_path):
    """2 processes x 4 CPU devices (gloo), the same mesh as run A: the same losses; a SIGTERM to process 1 alone
    stops both after the same step, with a checkpoint."""
    a_dir, _ = run_a
    cache = a_dir / "data-cache"
    # The tokenizer and the data cache exist before the processes start (no two processes write them).
    load_corpus(data_files(TrainConfig(**RECIPE)), Tokenizer.from_dir(a_dir), RECIPE["seq_len"], cache,
                eval_fraction=RECIPE["eval_fraction"], seed=0)
    output_dir = tmp_path / "out"
    overrides = [f"output_dir={output_dir}", f"tokenizer={a_dir}", f"data_cache={cache}"]
    outputs = two_processes(recipe_file, overrides, stop_step=MULTIHOST_STOP)
    # The result is the last line of stdout (gloo prints "[Gloo] Rank 0 is connected ..." lines there first).
    printed = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert [p["step"] for p in printed] == [MULTIHOST_STOP] * 2
    assert printed[0]["loss"] == printed[1]["loss"]
    assert "signal 15: saving step 4 and stopping" in outputs[1][1]

    metrics = read_metrics(output_dir)  # written by process 0 only
    assert [m["step"] for m in metrics] == list(range(1, MULTIHOST_STOP + 1))
    reference = read_metrics(a_dir)[:MULTIHOST_STOP]
    for ours, ref in zip(metrics, reference):
        # Same programs over gloo instead of in-process collectives: measured equal to ~1e-7 relative.
        assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert ours["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
    # The signal's save, written by both processes (plus step 1: see test_checkpoints_only_every_save_every_steps).
    assert max(checkpoint_steps(output_dir)) == MULTIHOST_STOP
