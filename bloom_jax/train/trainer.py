"""The training loop, `Trainer(cfg).run()`: the state born sharded (or restored), the data by step, the jitted
train step, metrics (progress bar, JSONL, TensorBoard, eval) and the run's checkpoints (`checkpointing`), and
OUTPUT_DIR/final at the end. OUTPUT_DIR, the data, its cache, the tokenizer and the base checkpoint may each be a
local path or a URL (`gs://...`): a run whose output lives in a bucket resumes on a fresh machine from the
bucket alone.

Exact resume: the batch of step k is a pure function of (data, seed, k) (`bloom_jax.data`) and so is the dropout
key (`train_step`), so a restored (params, optimizer state, step) continues the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from bloom_jax import storage
from bloom_jax.checkpoints import (
    checkpoint_location,
    read_model_config,
    read_side_file,
    read_tokenizer,
    save_pretrained,
)
from bloom_jax.chat import ChatTemplate
from bloom_jax.config import load_config
from bloom_jax.data import iter_documents, load_corpus
from bloom_jax.errors import BloomJaxError, RunFailed
from bloom_jax.log import get_logger
from bloom_jax.lora import LoraConfig, merge_trees
from bloom_jax.losses import next_token_loss
from bloom_jax.metrics import MetricsWriter
from bloom_jax.model import forward_flops, make_model
from bloom_jax.quantize import FROZEN_FORMATS
from bloom_jax.recipe import TrainConfig, data_files
from bloom_jax.sft import Fields, detect_format, iter_examples, load_sft
from bloom_jax.sharding import ShardingPlan, make_mesh
from bloom_jax.storage import is_remote, join
from bloom_jax.tokenizer import Tokenizer, train_tokenizer
from bloom_jax.train.adapters import save_run_adapters, write_run_adapter_config
from bloom_jax.train.checkpointing import RunCheckpoints
from bloom_jax.train.optimizer import learning_rate_schedule, make_optimizer
from bloom_jax.train.state import abstract_train_state, frozen_base, initial_train_state
from bloom_jax.train.step import note_health, peak_flops_per_device, train_step

log = get_logger(__name__)


class Trainer:
    """A training run: `Trainer(cfg).run()`. Resumes from the newest checkpoint in `output_dir` if there is one."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        data_files(cfg)  # an empty train_data fails here, before anything is logged or built
        self.output_dir = storage.normalize(cfg.output_dir)
        if jax.process_index() == 0:  # a missing bucket or a denied write: one line now, not after hours of work
            storage.check_writable(self.output_dir)
        self.sharding = ShardingPlan.create(make_mesh(cfg.mesh), cfg.rules)
        self.init_from = checkpoint_location(cfg.init_from) if cfg.init_from else None  # a hub id resolved once
        self.model_config = read_model_config(self.init_from) if self.init_from else load_config(cfg.model)
        # Text, or instruction examples (the loss on their answers): what the recipe says or the files hold.
        self.fields = detect_format(data_files(cfg), Fields(prompt=cfg.prompt_field, completion=cfg.completion_field,
                                                            messages=cfg.messages_field),
                                    cfg.data_format, cfg.jsonl_field)
        self.chat_template = self._chat_template() if self.fields.format == "chat" else None
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
        if storage.is_file(join(self.output_dir, "tokenizer.json")):  # a resumed run keeps the tokenizer it trained
            return Tokenizer.from_dir(self.output_dir)
        vocab = min(self.cfg.tokenizer_vocab_size, self.model_config.vocab_size)
        log.info(f"training a {vocab}-token byte-level BPE tokenizer on the training data")
        files = data_files(self.cfg)
        texts = (iter_documents(files, self.cfg.jsonl_field) if self.fields.format == "text"
                 else (prompt + completion for prompt, completion in iter_examples(files, self.fields,
                                                                                     self.chat_template)))
        tokenizer = train_tokenizer(texts, vocab)
        if jax.process_index() == 0:
            tokenizer.save(self.output_dir)
        return tokenizer

    def _chat_template(self) -> ChatTemplate | None:
        """The recipe's chat template, else the base checkpoint's tokenizer config's (None: neither has one)."""
        config = read_side_file(self.init_from, "tokenizer_config.json") if self.init_from else None
        return ChatTemplate.load(self.cfg.chat_template, config, setting="chat_template")

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

    # The run ------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to `cfg.steps` (or until SIGTERM), evaluating and checkpointing on the way; returns the last
        metrics. Writes OUTPUT_DIR/final, a converted checkpoint that `bloom-jax generate` reads. A non-finite
        loss stops the run with `RunFailed`, the last good checkpoint kept."""
        cfg, plan = self.cfg, self.sharding
        corpus = self._corpus()
        # Too few held-out rows for one eval batch: one line now, not at the first evaluation.
        corpus.eval.eval_batches(cfg.eval_batches, cfg.batch_size, jax.process_index(), jax.process_count())
        lora = self.lora is not None
        abstract_state, abstract_frozen = abstract_train_state(self.model, self.optimizer, plan, lora)
        state_shardings = jax.tree.map(lambda s: s.sharding, abstract_state)
        frozen_shardings = jax.tree.map(lambda s: s.sharding, abstract_frozen)
        # A LoRA run's base, frozen: an argument of every step, never donated, never checkpointed.
        frozen = (frozen_base(cfg, self.init_from, plan, frozen_shardings, self.base_dtype, self.frozen_weights)
                  if lora else None)
        data_sharding, replicated = plan.batch_sharding(), plan.replicated

        def step(state, batch, frozen):
            tokens, loss_mask, segment_ids = _batch_parts(batch)
            return train_step(self.model, self.optimizer, cfg.grad_accum, cfg.seed, self.dropout, state, tokens,
                              cfg.loss_chunk_tokens, frozen, loss_mask, segment_ids)

        def evaluation(params, batch, frozen):
            tokens, loss_mask, segment_ids = _batch_parts(batch)
            return next_token_loss(self.model, params if frozen is None else merge_trees(frozen, params), tokens,
                                   chunk_tokens=cfg.loss_chunk_tokens, weights=_mean_weights(loss_mask),
                                   segment_ids=segment_ids)

        step_fn = jax.jit(step, in_shardings=(state_shardings, data_sharding, frozen_shardings),
                          out_shardings=(state_shardings, replicated), donate_argnums=0)
        eval_fn = jax.jit(evaluation, in_shardings=(state_shardings["params"], data_sharding, frozen_shardings),
                          out_shardings=replicated)
        with RunCheckpoints.open(self.output_dir, cfg.keep, cfg.save_every, abstract_state) as checkpoints:
            state = checkpoints.restore_or_init(lambda: initial_train_state(
                cfg, self.model, self.optimizer, plan, state_shardings, self.init_from, lora))
            return self._loop(checkpoints, state, step_fn, eval_fn, frozen, corpus, data_sharding, replicated)

    def _loop(self, checkpoints: RunCheckpoints, state, step_fn, eval_fn, frozen, corpus, data_sharding,
              replicated) -> dict:
        """Steps from `state` to `cfg.steps` (or a signal): logs, evaluates and saves on the way, then writes
        OUTPUT_DIR/final. Returns the last metrics."""
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
            with checkpoints.stop_on_errors():  # a full disk or a fault on the wire met by the metrics
                writer = stack.enter_context(
                    MetricsWriter(self.output_dir, enabled=jax.process_index() == 0, resume_step=start_step))
                if self.lora is not None:
                    write_run_adapter_config(self.output_dir, self.lora, cfg.init_from)
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
                        health = note_health(health, step_metrics, step + 1)
                done = step + 1
                window_steps += 1
                logs, saving = done % cfg.log_every == 0 or done == cfg.steps, done % cfg.save_every == 0
                # One process alone may stop only when it runs alone; together they stop at a log or save point.
                sync_point = logs or saving or (self._stop_signal is not None and jax.process_count() == 1)
                if sync_point:
                    self._raise_if_unhealthy(jax.device_get(health), checkpoints)
                if saving:
                    checkpoints.save(done, state)
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
                    with checkpoints.stop_on_errors():
                        writer.write(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    mfu=f"{metrics['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                if saving:  # every step a checkpoint covers is logged where the run's files are
                    with checkpoints.stop_on_errors():
                        writer.flush()
                bar.update(1)
                if self._stopping(at_sync_point=sync_point):
                    log.info(f"signal {self._stop_signal}: saving step {done} and stopping")
                    if checkpoints.latest_step() != done:
                        checkpoints.save(done, state, force=True)
                    break
            with checkpoints.stop_on_errors():
                writer.close()  # the last upload of the metrics to a bucket
        # The bar closed (on a failed run too, so that the error starts a line of its own).
        checkpoints.wait()
        if done == cfg.steps:
            self._write_final(state["params"], checkpoints)
        return metrics

    def _write_final(self, params: dict, checkpoints: RunCheckpoints) -> None:
        """OUTPUT_DIR/final: a converted checkpoint, or a LoRA run's peft adapter directory."""
        final = join(self.output_dir, "final")
        try:
            if self.lora is None:
                save_pretrained(params, self.model_config, final, self.tokenizer, extra_files=self._carried_files(),
                                overwrite=True)
            else:
                save_run_adapters(params, self.sharding, self.lora, self.model_config, self.cfg.init_from,
                                  self.tokenizer, final)
        except BloomJaxError as error:  # a full or unwritable disk, another writer: the checkpoints survive
            raise checkpoints.stopped(str(error)) from None
        log.info(f"final checkpoint: {final}")

    def _corpus(self):
        cache = self.cfg.data_cache or join(self.output_dir, "data-cache")

        cfg = self.cfg

        def load():
            if self.fields.format == "text":
                return load_corpus(data_files(cfg), self.tokenizer, cfg.seq_len, cache, eval_fraction=cfg.eval_fraction,
                                   seed=cfg.seed, jsonl_field=cfg.jsonl_field, progress=self.progress)
            return load_sft(data_files(cfg), self.tokenizer, cfg.seq_len, cache, self.fields, self.chat_template,
                            eval_fraction=cfg.eval_fraction, seed=cfg.seed, completion_only=cfg.completion_only_loss,
                            too_long=cfg.too_long, progress=self.progress, packing=cfg.packing)

        if jax.process_count() == 1 or not is_remote(cache):
            return load()  # a local cache is each host's own (or, shared, written atomically by each)
        # A cache in a bucket is shared: process 0 tokenizes and writes it, then the others read their rows of it.
        from jax.experimental import multihost_utils

        corpus = load() if jax.process_index() == 0 else None
        multihost_utils.sync_global_devices("bloom_jax: the tokenized data cache is written")
        return corpus if corpus is not None else load()

    def _global_batch(self, batches, step: int, sharding):
        """This process's rows of step `step`'s batch, assembled into the global array (or, for instruction
        data, the dict of token and loss-mask arrays) the mesh shards."""
        return self._global(batches.local(step, jax.process_index(), jax.process_count()), sharding)

    def _global(self, local, sharding):
        def assembled(rows):
            rows = np.asarray(rows, np.int32) if rows.dtype.kind in "iu" else np.asarray(rows)
            return jax.make_array_from_process_local_data(sharding, rows, (self.cfg.batch_size, *rows.shape[1:]))

        return jax.tree.map(assembled, local)

    def _evaluate(self, eval_fn, params, corpus, sharding) -> dict:
        losses = []
        for rows in corpus.eval.eval_batches(self.cfg.eval_batches, self.cfg.batch_size, jax.process_index(),
                                             jax.process_count()):
            batch = self._global(rows, sharding)
            with self.sharding.context():
                losses.append(float(eval_fn(params, batch)))
        loss = float(np.mean(losses))
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

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

    def _raise_if_unhealthy(self, health: dict, checkpoints: RunCheckpoints) -> None:
        """`RunFailed` if a step so far was not finite, naming it and the last good checkpoint."""
        bad_step = int(health["bad_step"])
        if not bad_step:
            return
        last = checkpoints.last_saved()
        kept = (f"The last good checkpoint is step {last} in {checkpoints.directory}"
                if last is not None else "No checkpoint had been saved")
        raise RunFailed(f"non-finite loss, gradients or weights at step {bad_step} "
                        f"(loss {float(health['bad_loss'])}); stopping. {kept}")



def _batch_parts(batch) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """A batch's token windows [b, s + 1], loss mask [b, s] (None for text: every target counts) and segment ids
    [b, s + 1] (None but for packed instruction data)."""
    if isinstance(batch, dict):
        return batch["tokens"], batch["loss_mask"], batch.get("segment_ids")
    return batch, None, None


def _mean_weights(loss_mask: jax.Array | None) -> jax.Array | None:
    """Weights that make the loss the mean over the targets a mask marks (None: over every target)."""
    if loss_mask is None:
        return None
    return loss_mask / jnp.maximum(jnp.sum(loss_mask), 1.0)
