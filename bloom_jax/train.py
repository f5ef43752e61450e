"""Training and fine-tuning: one jitted, sharded train step, and the loop around it.

- `TrainConfig` (`bloom_jax.recipe`): every setting of a run, from a YAML recipe plus `key=value` overrides.
- `make_optimizer`: AdamW with warmup then cosine or linear decay, global-norm clipping, and no weight decay on
  LayerNorms and biases.
- `train_step`: the loss and gradients of `grad_accum` micro-batches (a `lax.scan`), then one optimizer update;
  the state is donated. Mixed precision is the model's: `compute_dtype` activations and matmuls, `param_dtype`
  master weights and optimizer state.
- `Trainer`: state born sharded (or restored), data by step, Orbax `CheckpointManager` (async saves every N
  steps, the last K kept, a save on SIGTERM), exact resume, metrics (progress bar, JSONL, TensorBoard, eval).
- LoRA (`lora.rank > 0`, `bloom_jax.lora`): the base of `init_from` is frozen in `lora.base`'s dtype and passed
  to the step beside the state, whose parameters are the adapters alone: gradients, AdamW moments and checkpoints
  hold only them, and the final output is a peft adapter directory naming its base.

Exact resume: the batch of step k is a pure function of (data, seed, k) (`bloom_jax.data`) and so is the dropout
key (`fold_in(key(seed), k)`), so a restored (params, optimizer state, step) continues the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from tqdm.auto import tqdm

from bloom_jax import devices
from bloom_jax.checkpoints import (
    checkpoint_location,
    from_pretrained,
    read_model_config,
    read_side_file,
    read_tokenizer,
    save_pretrained,
)
from bloom_jax.checkpoints.peft import adapter_config_json, save_adapter
from bloom_jax.config import load_config
from bloom_jax.data import iter_documents, load_corpus
from bloom_jax.disk_faults import DISK_ERRORS, FailureEchoesDropped, disk_error, room, write_failure
from bloom_jax.errors import BloomJaxError, RunFailed, one_line
from bloom_jax.log import get_logger
from bloom_jax.lora import ADAPTER_LEAVES, LoraConfig, merge_trees, split_adapters
from bloom_jax.losses import LOSS_CHUNK_TOKENS, next_token_loss
from bloom_jax.metrics import MetricsWriter
from bloom_jax.model import BloomForCausalLM, forward_flops, init_params, make_model
from bloom_jax.quantize import FROZEN_FORMATS, quantize_base
from bloom_jax.recipe import TrainConfig, data_files
from bloom_jax.sharding import ShardingPlan, make_mesh
from bloom_jax.tokenizer import Tokenizer, train_tokenizer

log = get_logger(__name__)
RUN_ADAPTER_CONFIG = "adapter_config.json"  # a LoRA run's settings in its output_dir, for export_run_adapter

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


def train_step(model: BloomForCausalLM, optimizer: optax.GradientTransformation, grad_accum: int, seed: int,
               dropout: bool, state: dict, tokens: jax.Array,
               loss_chunk_tokens: int = LOSS_CHUNK_TOKENS, frozen: dict | None = None) -> tuple[dict, dict]:
    """One optimizer step on a global batch of token windows [b, s + 1], split into `grad_accum` equal
    micro-batches whose gradients are averaged (so equal to one batch k times as large). Returns the new state
    and metrics. With `frozen` (a LoRA run's base weights) `state["params"]` are the adapters: the model runs on
    both, and only the adapters get gradients and updates."""
    tokens_bs1 = tokens
    batch = tokens_bs1.shape[0]
    micro_mbs1 = tokens_bs1.reshape(grad_accum, batch // grad_accum, tokens_bs1.shape[1])
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]

    def micro_step(grad_sum, inputs):
        tokens, index = inputs
        rng = jax.random.fold_in(step_key, index) if dropout else None
        def loss_of(trained):
            everything = trained if frozen is None else merge_trees(frozen, trained)
            return next_token_loss(model, everything, tokens, rng, loss_chunk_tokens)

        loss, grads = jax.value_and_grad(loss_of)(params)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = lax.scan(micro_step, zeros, (micro_mbs1, jnp.arange(grad_accum)))
    grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
    updates, opt_state = optimizer.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    loss, grad_norm = losses.mean(), optax.global_norm(grads)
    # A finite loss can still come with non-finite gradients or weights; no such state may be checkpointed.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(new_params))
    new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


@jax.jit
def _note_health(health: dict, step_metrics: dict, step: int) -> dict:
    """`health` with `step` (and its loss) recorded if it is the first non-finite one."""
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


class Trainer:
    """A training run: `Trainer(cfg).run()`. Resumes from the newest checkpoint in `output_dir` if there is one."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        data_files(cfg)  # an empty train_data fails here, before anything is logged or built
        self.output_dir = Path(cfg.output_dir)
        self.sharding = ShardingPlan.create(make_mesh(cfg.mesh), cfg.rules)
        self.init_from = checkpoint_location(cfg.init_from) if cfg.init_from else None  # a hub id resolved once
        self.model_config = read_model_config(self.init_from) if self.init_from else load_config(cfg.model)
        self.lora = (LoraConfig(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, tuple(cfg.lora_targets),
                                param_dtype=jnp.dtype(cfg.param_dtype)) if cfg.lora_rank else None)
        # The step gets a dropout key when any dropout is on; the config's own only with `dropout`.
        self.dropout = cfg.dropout or (self.lora is not None and self.lora.dropout > 0)
        config = (self.model_config if cfg.dropout
                  else dataclasses.replace(self.model_config, hidden_dropout=0.0, attention_dropout=0.0))
        # A LoRA run's base in lora.base: plain float, or its linear layers quantized (the rest in bfloat16).
        self.frozen_weights = cfg.lora_base if self.lora and cfg.lora_base in FROZEN_FORMATS else None
        self.base_dtype = "bfloat16" if self.frozen_weights else cfg.lora_base
        self.model = make_model(config, dtype=cfg.compute_dtype, scan_layers=cfg.scan_layers,
                                param_dtype=self.base_dtype if self.lora else cfg.param_dtype,
                                remat_policy=cfg.remat_policy, kernels=cfg.kernels, attention=cfg.attention,
                                lora=self.lora, frozen_weights=self.frozen_weights)
        self.optimizer = make_optimizer(cfg)
        self.tokenizer = self._tokenizer()
        self._stop_signal: int | None = None

    # Set-up -------------------------------------------------------------------------------------------------

    def _tokenizer(self) -> Tokenizer:
        if self.cfg.tokenizer:
            return Tokenizer.from_dir(self.cfg.tokenizer)
        if self.init_from:
            tokenizer = read_tokenizer(self.init_from)
            if tokenizer is None:
                raise BloomJaxError(f"{self.cfg.init_from} has no tokenizer.json: set `tokenizer`")
            return tokenizer
        saved = self.output_dir / "tokenizer.json"
        if saved.is_file():  # a resumed run keeps the tokenizer it trained
            return Tokenizer.from_dir(self.output_dir)
        vocab = min(self.cfg.tokenizer_vocab_size, self.model_config.vocab_size)
        log.info(f"training a {vocab}-token byte-level BPE tokenizer on the training data")
        tokenizer = train_tokenizer(iter_documents(data_files(self.cfg), self.cfg.jsonl_field), vocab)
        if jax.process_index() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(self.output_dir)
        return tokenizer

    def _carried_files(self) -> dict[str, bytes]:
        """What the final checkpoint keeps of the base checkpoint's: its generation settings, and its tokenizer's
        settings when the run uses its tokenizer."""
        if self.init_from is None:
            return {}
        names = ["generation_config.json"]
        if not self.cfg.tokenizer:
            names += ["tokenizer_config.json", "special_tokens_map.json"]
        found = {name: read_side_file(self.init_from, name) for name in names}
        return {name: data for name, data in found.items() if data is not None}

    def _abstract_state(self) -> tuple[dict, dict | None]:
        """The train state's shapes and dtypes, each with its sharding (optimizer moments as their parameters), and
        a LoRA run's frozen base likewise (None otherwise)."""
        plan = self.sharding
        params, frozen = plan.abstract_params(self.model), None
        param_shardings = plan.param_shardings(self.model)
        if self.lora is not None:
            frozen, params = split_adapters(params)
            param_shardings = split_adapters(param_shardings)[1]
        opt_state = jax.eval_shape(self.optimizer.init, params)
        opt_shardings = optimizer_shardings(self.optimizer, opt_state, param_shardings, plan.mesh)
        opt_state = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                                 opt_state, opt_shardings)
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=plan.replicated)
        return {"step": step, "params": params, "opt_state": opt_state}, frozen

    def _pretrained(self, param_dtype) -> dict:
        """init_from's parameters, restored straight into the rules' shardings (outside the mesh context)."""
        return from_pretrained(self.init_from, mesh=self.sharding.mesh, dtype=self.cfg.compute_dtype,
                               param_dtype=param_dtype, rules=self.sharding.rules, scan_layers=self.cfg.scan_layers)[1]

    def _frozen_base(self, shardings) -> dict:
        """A LoRA run's base from init_from, in lora.base's format, placed by `shardings`."""
        base = self._pretrained(self.base_dtype)
        if self.frozen_weights is None:
            return base
        log.info(f"quantizing the base's linear layers to {self.frozen_weights}")
        return quantize_base(base, self.frozen_weights, shardings, consume=True)

    def _initial_state(self, state_shardings) -> dict:
        if self.init_from is not None and self.lora is None:
            params = self._pretrained(self.cfg.param_dtype)
        with self.sharding.context():
            if self.lora is not None:  # new adapters (jit drops the base's initialisation: only they are out)
                params = jax.jit(lambda: split_adapters(init_params(self.model, jax.random.key(self.cfg.seed)))[1],
                                 out_shardings=state_shardings["params"])()
            elif self.init_from is None:
                params = jax.jit(lambda: init_params(self.model, jax.random.key(self.cfg.seed)),
                                 out_shardings=state_shardings["params"])()
            opt_state = jax.jit(self.optimizer.init, out_shardings=state_shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.int32(0), state_shardings["step"]), "params": params,
                "opt_state": opt_state}

    # The run ------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to `cfg.steps` (or until SIGTERM), evaluating and checkpointing on the way; returns the last
        metrics. Writes OUTPUT_DIR/final, a converted checkpoint that `bloom-jax generate` reads. A non-finite
        loss stops the run with `RunFailed`, the last good checkpoint kept."""
        cfg, plan = self.cfg, self.sharding
        corpus = self._corpus()
        abstract_state, abstract_frozen = self._abstract_state()
        self._state_shapes = abstract_state
        state_shardings = jax.tree.map(lambda s: s.sharding, abstract_state)
        frozen_shardings = jax.tree.map(lambda s: s.sharding, abstract_frozen)
        # A LoRA run's base, frozen: an argument of every step, never donated, never checkpointed.
        frozen = self._frozen_base(frozen_shardings) if self.lora is not None else None
        data_sharding, replicated = plan.batch_sharding(), plan.replicated
        step_fn = jax.jit(
            lambda state, tokens, frozen: train_step(self.model, self.optimizer, cfg.grad_accum, cfg.seed,
                                                     self.dropout, state, tokens, cfg.loss_chunk_tokens, frozen),
            in_shardings=(state_shardings, data_sharding, frozen_shardings),
            out_shardings=(state_shardings, replicated), donate_argnums=0)
        eval_fn = jax.jit(
            lambda params, tokens, frozen: next_token_loss(
                self.model, params if frozen is None else merge_trees(frozen, params), tokens,
                chunk_tokens=cfg.loss_chunk_tokens),
            in_shardings=(state_shardings["params"], data_sharding, frozen_shardings), out_shardings=replicated)

        # Orbax and TensorStore report a save that a full or unwritable disk failed many times over, from their
        # threads and when Python collects the save's futures; it is reported once, as one line.
        with FailureEchoesDropped() as echoes:
            manager = self._checkpoint_manager()
            try:
                state = self._restore_or_init(manager, abstract_state, state_shardings, echoes)
                metrics = self._loop(manager, state, step_fn, eval_fn, frozen, corpus, data_sharding, replicated)
            except BaseException:
                # A failing run's error is what it reports; a save that failed with it (the same full disk)
                # would only replace it with Orbax's traceback.
                with contextlib.suppress(Exception):
                    manager.close()
                raise
            with self._save_errors_reported(manager):
                manager.close()
        return metrics

    def _checkpoint_manager(self):
        import orbax.checkpoint as ocp

        cfg, directory = self.cfg, (self.output_dir / "checkpoints").absolute()
        try:
            return ocp.CheckpointManager(
                directory,
                # should_save_fn rather than save_interval_steps: the latter adds an unwanted save at the first
                # step. A save killed mid-way (SIGKILL, preemption) leaves a `STEP.orbax-checkpoint-tmp-*`
                # directory. Orbax replaces it when the resumed run saves STEP again (tests/test_train.py kills
                # one); with cleanup_tmp_directories it also goes when STEP is never saved again (a changed
                # save_every).
                # Step directories made before save() returns: made in the background, a directory that cannot
                # be made (an unwritable or full disk) left the save's other threads waiting 300 s for its
                # signal, holding the process at exit, and then printing their timeouts.
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=cfg.keep, enable_async_checkpointing=True, create=True,
                    cleanup_tmp_directories=True, should_save_fn=lambda step, _: step % cfg.save_every == 0,
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
        except OSError as error:
            code = disk_error(error)
            if code is None:
                raise
            raise BloomJaxError(f"cannot write checkpoints in {directory}: {DISK_ERRORS[code]}") from None

    def _loop(self, manager, state, step_fn, eval_fn, frozen, corpus, data_sharding, replicated) -> dict:
        """Steps from `state` to `cfg.steps` (or a signal): logs, evaluates and saves on the way, then writes
        OUTPUT_DIR/final. Returns the last metrics."""
        import orbax.checkpoint as ocp

        cfg, plan = self.cfg, self.sharding
        start_step = int(state["step"])
        batches = corpus.train.train_batches(cfg.batch_size)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        # The backward pass of a frozen base makes the inputs' gradients only: 2 forward passes' FLOPs, not 3.
        flops_per_step = (3 if self.lora is None else 2) * forward_flops(self.model_config, cfg.batch_size,
                                                                           cfg.seq_len)
        peak = peak_flops_per_device(cfg) * jax.device_count()
        schedule = learning_rate_schedule(cfg)
        metrics: dict = {}
        # The first non-finite step (0: none) and its loss, kept on the devices: the loop reads them, and the
        # metrics, only when it logs or saves, so that it never waits for a step to finish just to dispatch the
        # next one. A bad step is thus caught at the next log or save point, before any checkpoint of it.
        health = jax.device_put({"bad_step": jnp.int32(0), "bad_loss": jnp.float32(0)}, replicated)
        with contextlib.ExitStack() as stack:
            try:  # a full or unwritable disk met by the metrics: say what survives
                writer = stack.enter_context(contextlib.closing(
                    MetricsWriter(self.output_dir, enabled=jax.process_index() == 0, resume_step=start_step)))
                if self.lora is not None and jax.process_index() == 0:
                    path = self.output_dir / RUN_ADAPTER_CONFIG
                    try:
                        path.write_text(json.dumps(adapter_config_json(self.lora, self.cfg.init_from), indent=2)
                                        + "\n")
                    except OSError as error:
                        raise write_failure(error, path) from None
            except BloomJaxError as error:
                raise self._stopped(manager, str(error)) from None
            previous = signal.signal(signal.SIGTERM, self._on_signal)
            stack.callback(signal.signal, signal.SIGTERM, previous)
            bar = stack.enter_context(tqdm(total=cfg.steps, initial=start_step, desc="training", unit="step",
                                           file=sys.stderr, dynamic_ncols=True,
                                           disable=not self.progress or jax.process_index() != 0))
            window_start, window_steps, done = time.perf_counter(), 0, start_step
            for step in range(start_step, cfg.steps):
                # An implicit device-to-host read here (a float() of a metric, say) would be a sync per step: on
                # TPUs and GPUs the guard makes it an error (XLA:CPU's arrays are read without a transfer).
                with jax.transfer_guard_device_to_host("disallow"):
                    tokens = self._global_batch(batches, step, data_sharding)
                    with plan.context():
                        state, step_metrics = step_fn(state, tokens, frozen)
                        health = _note_health(health, step_metrics, step + 1)
                done = step + 1
                window_steps += 1
                logs, saving = done % cfg.log_every == 0 or done == cfg.steps, done % cfg.save_every == 0
                # One process alone may stop only when it runs alone; together they stop at a log or save point.
                sync_point = logs or saving or (self._stop_signal is not None and jax.process_count() == 1)
                if sync_point:
                    self._raise_if_unhealthy(jax.device_get(health), manager)
                if saving:
                    with self._save_errors_reported(manager):  # save() first waits for the previous one
                        manager.save(done, args=ocp.args.StandardSave(state))
                if logs:
                    fetched = jax.device_get(step_metrics)
                    seconds = time.perf_counter() - window_start
                    metrics = {"step": done, "loss": float(fetched["loss"]), "grad_norm": float(fetched["grad_norm"]),
                               "learning_rate": float(schedule(done - 1)),
                               "tokens_per_s": window_steps * tokens_per_step / seconds,
                               "mfu": window_steps * flops_per_step / seconds / peak}
                    if done % cfg.eval_every == 0 or done == cfg.steps:
                        metrics.update(self._evaluate(lambda p, t: eval_fn(p, t, frozen), state["params"],
                                                      corpus, data_sharding))
                    try:
                        writer.write(metrics)
                    except BloomJaxError as error:
                        raise self._stopped(manager, str(error)) from None
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    mfu=f"{metrics['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if self._stopping(at_sync_point=sync_point):
                    log.info(f"signal {self._stop_signal}: saving step {done} and stopping")
                    if manager.latest_step() != done:
                        with self._save_errors_reported(manager):
                            manager.save(done, args=ocp.args.StandardSave(state), force=True)
                    break
        # The bar closed (on a failed run too, so that the error starts a line of its own).
        with self._save_errors_reported(manager):
            manager.wait_until_finished()
            manager.check_for_errors()
        if done == cfg.steps:
            final = self.output_dir / "final"
            try:
                if self.lora is None:
                    save_pretrained(state["params"], self.model_config, final, self.tokenizer,
                                    extra_files=self._carried_files(), overwrite=True)
                else:
                    self._save_adapter(state["params"], final)
            except BloomJaxError as error:  # a full or unwritable disk, another writer: the checkpoints survive
                raise self._stopped(manager, str(error)) from None
            log.info(f"final checkpoint: {final}")
        return metrics

    def _save_adapter(self, adapters: dict, dst: Path) -> None:
        """The adapters as a peft directory naming init_from, written by process 0 (they are small: gathered
        whole to every process first)."""
        with self.sharding.context():
            whole = jax.jit(lambda x: x, out_shardings=self.sharding.replicated)(adapters)
        if jax.process_index() == 0:
            save_adapter(jax.tree.map(np.asarray, whole), self.lora, self.model_config, dst,
                         base_model_name_or_path=self.cfg.init_from, overwrite=True)
            self.tokenizer.save(dst)

    def _corpus(self):
        cache = Path(self.cfg.data_cache) if self.cfg.data_cache else self.output_dir / "data-cache"
        return load_corpus(data_files(self.cfg), self.tokenizer, self.cfg.seq_len, cache,
                           eval_fraction=self.cfg.eval_fraction, seed=self.cfg.seed,
                           jsonl_field=self.cfg.jsonl_field, progress=self.progress)

    def _global_batch(self, batches, step: int, sharding) -> jax.Array:
        """This process's rows of step `step`'s batch, assembled into the global array the mesh shards."""
        local = batches.local(step, jax.process_index(), jax.process_count())
        return jax.make_array_from_process_local_data(sharding, np.asarray(local, np.int32),
                                                      (self.cfg.batch_size, self.cfg.seq_len + 1))

    def _evaluate(self, eval_fn, params, corpus, sharding) -> dict:
        losses = []
        shape = (self.cfg.batch_size, self.cfg.seq_len + 1)
        for rows in corpus.eval.eval_batches(self.cfg.eval_batches, self.cfg.batch_size, jax.process_index(),
                                             jax.process_count()):
            tokens = jax.make_array_from_process_local_data(sharding, rows, shape)
            with self.sharding.context():
                losses.append(float(eval_fn(params, tokens)))
        loss = float(np.mean(losses))
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

    def _restore_or_init(self, manager, abstract_state, state_shardings, echoes) -> dict:
        """The newest checkpoint that restores, or a fresh state. A newer one that does not (truncated, a file
        missing: a preempted copy, a full disk) is named with what is wrong, set aside as `STEP.unrestorable`
        once an older one restores, and the run resumes from that; `BloomJaxError` if none restores."""
        import orbax.checkpoint as ocp

        directory = self.output_dir / "checkpoints"
        steps = sorted(manager.all_steps(), reverse=True)
        if not steps:
            return self._initial_state(state_shardings)
        failed = []
        for step in steps:
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
            except Exception as error:  # noqa: BLE001 - whatever a damaged checkpoint raises, say it and go on
                failed.append(f"step {step}: {_restore_failure(directory, step, steps, error)}")
                log.warning(f"checkpoint {failed[-1]}")
                echoes.keep()
                continue
            if failed:
                if jax.process_index() == 0:  # the directory is shared: one process renames
                    for bad in steps[: steps.index(step)]:
                        os.replace(directory / str(bad), directory / f"{bad}.unrestorable")
                if jax.process_count() > 1:
                    from jax.experimental import multihost_utils

                    multihost_utils.sync_global_devices("bloom_jax: unrestorable checkpoints set aside")
                manager.reload()
                log.warning(f"resuming from step {step} of {directory}, the newest checkpoint that restores (set "
                            f"aside: {', '.join(f'{bad}.unrestorable' for bad in steps[: steps.index(step)])})")
            else:
                log.info(f"resuming from step {step} of {directory}")
            return state
        raise BloomJaxError(f"no checkpoint in {directory} restores ({'; '.join(failed)}): move them away to start "
                            "over")

    @contextlib.contextmanager
    def _save_errors_reported(self, manager):
        """A full or unwritable disk that failed an asynchronous save, raised in the block (by Orbax, as its
        background thread met it), becomes one `BloomJaxError`: the failed save's temporary directory removed,
        the last good checkpoint kept. Other errors propagate as they are."""
        try:
            yield
        except Exception as error:
            code = disk_error(error, where=self.output_dir)
            if code is None:
                raise
            raise self._save_failed(manager, code) from None

    def _save_failed(self, manager, code: int) -> BloomJaxError:
        self._settle(manager)
        directory = self.output_dir / "checkpoints"
        needed = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(self._state_shapes))
        # What is free is measured with the failed save's data gone.
        message = (f"cannot save a checkpoint in {directory}: {DISK_ERRORS[code]}"
                   f"{room(code, needed, directory, 'a checkpoint')}")
        return BloomJaxError(f"{message}; {_kept(manager)}")

    def _stopped(self, manager, message: str) -> BloomJaxError:
        """The error that stops a run (a full or unwritable disk, say): `message` and the last good checkpoint."""
        self._settle(manager)
        return BloomJaxError(f"{message}; {_kept(manager)}")

    def _settle(self, manager) -> None:
        """Waits for the saves in flight and removes the temporary directories of those that failed."""
        try:
            manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - a save the same disk failed: the caller says what is kept
            pass
        for partial in (self.output_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stopping(self, at_sync_point: bool) -> bool:
        """Whether any process got SIGTERM. Every process must stop at the same step, so across processes they
        agree only at log and save points (agreeing is a collective, which waits for the step in flight)."""
        local = self._stop_signal is not None
        if jax.process_count() == 1:
            return local
        if not at_sync_point:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

    def _raise_if_unhealthy(self, health: dict, manager) -> None:
        """`RunFailed` if a step so far was not finite, naming it and the last good checkpoint."""
        bad_step = int(health["bad_step"])
        if not bad_step:
            return
        manager.wait_until_finished()
        last = manager.latest_step()
        kept = (f"The last good checkpoint is step {last} in {self.output_dir / 'checkpoints'}"
                if last is not None else "No checkpoint had been saved")
        raise RunFailed(f"non-finite loss, gradients or weights at step {bad_step} "
                        f"(loss {float(health['bad_loss'])}); stopping. {kept}")


def _kept(manager) -> str:
    latest = manager.latest_step()
    return f"the last good checkpoint, step {latest}, is kept" if latest is not None else "no checkpoint was saved"


def _restore_failure(directory: Path, step: int, steps: list[int], error: BaseException) -> str:
    """What is wrong with checkpoint `step`: the files another checkpoint has and it lacks (Orbax's own error
    would only say that the tree does not match), else Orbax's error (a truncated file: the array and where)."""
    def names(s: int) -> set[str]:  # the fixed names, not OCDBT's content-hashed data files
        root = directory / str(s)
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.parent.name != "d"}

    others = [s for s in steps if s != step]
    missing = sorted(names(others[0]) - names(step)) if others else []
    if missing:
        return f"{directory / str(step)} lacks {', '.join(missing)}"
    seen = set()  # TensorStore's own words on a truncated file sit in the chain, under Orbax's wrappers
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        found = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": (.+)', str(error))
        if found:
            return f"{found[1]} in {found[2]}: {found[3].strip()[:200]}"
        error = error.__cause__ or error.__context__
    return one_line(error)


def export_run_adapter(run_dir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None,
                       overwrite: bool = False) -> int:
    """A LoRA run's adapters at checkpoint `step` (default: the newest) as a peft adapter directory at `dst`,
    naming the run's base. Returns the step."""
    import orbax.checkpoint as ocp

    from bloom_jax.checkpoints.peft import lora_config_of, read_adapter_config

    run = Path(run_dir)
    if not (run / "checkpoints").is_dir() or not (run / RUN_ADAPTER_CONFIG).is_file():
        raise BloomJaxError(f"{run_dir} is not the output_dir of a LoRA run (no checkpoints/ and "
                            f"{RUN_ADAPTER_CONFIG})")
    peft_config = read_adapter_config(run)
    lora = lora_config_of(peft_config, str(run / RUN_ADAPTER_CONFIG))
    lora = LoraConfig(lora.rank, lora.alpha, lora.dropout, tuple(peft_config["target_modules"]), lora.use_rslora)
    base = peft_config.get("base_model_name_or_path")
    with ocp.CheckpointManager((run / "checkpoints").absolute(),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        steps = manager.all_steps()
        step = max(steps) if step is None and steps else step
        if step not in steps:
            raise BloomJaxError(f"{run_dir} has no checkpoint of step {step} (it has {sorted(steps) or 'none'})")
        adapters = manager.restore(step, args=ocp.args.StandardRestore())["params"]
    save_adapter(jax.tree.map(np.asarray, adapters), lora, read_model_config(checkpoint_location(base)), dst,
                 base_model_name_or_path=base, overwrite=overwrite)
    return step


def evaluate(checkpoint: str, data: Sequence[str], seq_len: int = 512, batch_size: int = 8,
             max_batches: int | None = None, jsonl_field: str = "text") -> dict:
    """Perplexity of a checkpoint on text: the windows of `seq_len + 1` tokens of the data (EOS after each
    document), in order, in full batches. Returns tokens scored, mean loss and perplexity."""
    import tempfile

    location = checkpoint_location(checkpoint)  # a hub id resolved once
    tokenizer = read_tokenizer(location)
    if tokenizer is None:
        raise BloomJaxError(f"{checkpoint} has no tokenizer.json")
    model, params = from_pretrained(location)
    with tempfile.TemporaryDirectory(prefix="bloom-jax-eval-") as cache:
        split = load_corpus(data, tokenizer, seq_len, cache, eval_fraction=0.0, jsonl_field=jsonl_field,
                            cache_setting="TMPDIR").train
        n_batches = split.n_sequences // batch_size
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        if n_batches == 0:
            raise BloomJaxError(f"the data gives {split.n_sequences} windows of {seq_len + 1} tokens, fewer than "
                                f"one batch of {batch_size}: lower --seq-len or --batch-size")
        loss_fn = jax.jit(lambda p, t: next_token_loss(model, p, t))
        losses = [float(loss_fn(params, np.stack([split.sequence(b * batch_size + i) for i in range(batch_size)])))
                  for b in range(n_batches)]
    loss = float(np.mean(losses))
    return {"tokens": n_batches * batch_size * seq_len, "loss": loss, "perplexity": math.exp(min(loss, 80.0))}
