"""Training and fine-tuning: one jitted, sharded train step, and the loop around it.

- `TrainConfig`: every setting of a run, from a YAML recipe (`configs/train/`) plus `key=value` overrides, typed.
- `make_optimizer`: AdamW with warmup then cosine or linear decay, global-norm clipping, and no weight decay on
  LayerNorms and biases.
- `train_step`: the loss and gradients of `grad_accum` micro-batches (a `lax.scan`), then one optimizer update;
  the state is donated. Mixed precision is the model's: `compute_dtype` activations and matmuls, `param_dtype`
  master weights and optimizer state.
- `Trainer`: state born sharded (or restored), data by step, Orbax `CheckpointManager` (async saves every N
  steps, the last K kept, a save on SIGTERM), exact resume, metrics (progress bar, JSONL, TensorBoard, eval).

Exact resume: the batch of step k is a pure function of (data, seed, k) (`bloom_jax.data`) and so is the dropout
key (`fold_in(key(seed), k)`), so a restored (params, optimizer state, step) continues the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import sysconfig
import time
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from bloom_jax.config import BloomConfig, configs_dir, load_config
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, forward_flops, make_model, stack_layers

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Field comments are the recipe documentation (configs/train/*.yaml)."""

    # Model: a preset or config.json to start from scratch, or a checkpoint (converted, Hugging Face dir or hub
    # id) to fine-tune.
    model: str = "bloom-tiny"
    init_from: str | None = None
    compute_dtype: str = "float32"  # activations and matmuls: float32 or bfloat16
    param_dtype: str = "float32"  # master weights and optimizer state
    scan_layers: bool = True
    remat_policy: str = "none"  # none, full, dots, dots_no_batch
    dropout: bool = False  # apply the config's hidden and attention dropout
    # Data: text files (one document each) or JSONL (one per line, `jsonl_field`), directories or globs.
    train_data: list[str] = dataclasses.field(default_factory=list)
    jsonl_field: str = "text"
    tokenizer: str | None = None  # directory with tokenizer.json; default: init_from's, else trained on the data
    tokenizer_vocab_size: int = 8192  # when the tokenizer is trained here
    seq_len: int = 512
    eval_fraction: float = 0.01  # of the documents, held out
    data_cache: str | None = None  # tokenized data; default: OUTPUT_DIR/data-cache
    # Optimisation: global batch in sequences per optimizer step, split into `grad_accum` micro-batches.
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 1000
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine, linear or constant after warmup
    min_lr_ratio: float = 0.1  # final learning rate / peak
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # Parallelism: a mesh spec (bloom_jax.sharding.make_mesh) and a rules preset of configs/sharding.
    mesh: str = "fsdp=-1"
    rules: str = "fsdp_tensor"
    # Output: checkpoints, metrics.jsonl, tensorboard/ and final/ (a converted checkpoint for generate).
    output_dir: str = "runs/bloom"
    save_every: int = 500
    keep: int = 3
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    peak_tflops: float | None = None  # per device, for MFU; default: known TPUs/GPUs, or measured on CPU

    def __post_init__(self):
        checks = [
            (self.compute_dtype in ("float32", "bfloat16"), "compute_dtype must be float32 or bfloat16"),
            (self.param_dtype in ("float32", "bfloat16"), "param_dtype must be float32 or bfloat16"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (self.seq_len >= 1, "seq_len must be >= 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.batch_size % self.grad_accum == 0,
             f"batch_size ({self.batch_size}) must divide by grad_accum ({self.grad_accum})"),
            (self.steps >= 1, "steps must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 <= self.warmup_steps, "warmup_steps must be >= 0"),
            (0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]"),
            (0 < self.eval_fraction < 1, "eval_fraction must be in (0, 1)"),
            (min(self.save_every, self.keep, self.eval_every, self.log_every) >= 1,
             "save_every, keep, eval_every and log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise BloomJaxError(f"train config: {message}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
        """A recipe file (a path, or a name of configs/train/) with `key=value` overrides (values in YAML)."""
        import yaml

        recipe = Path(path)
        if not recipe.is_file() and (configs_dir() / "train" / f"{path}.yaml").is_file():
            recipe = configs_dir() / "train" / f"{path}.yaml"
        try:
            data = yaml.safe_load(recipe.read_text()) or {}
        except OSError as e:
            raise BloomJaxError(f"cannot read {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise BloomJaxError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise BloomJaxError(f"{path} must be a mapping of settings")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise BloomJaxError(f"override {item!r} is not key=value")
            data[key.strip()] = yaml.safe_load(value) if value.strip() else None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "train config") -> TrainConfig:
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise BloomJaxError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(fields))})")
        return cls(**{key: _typed(key, value, hints[key], source) for key, value in data.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _typed(key: str, value: Any, hint: Any, source: str) -> Any:
    """`value` checked against a field's type (ints accepted for floats, one string for a list of strings)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str) and _is_float(value):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if option is str and isinstance(value, str):
            return value
        if origin is list and isinstance(value, str):
            return [value]
        if origin is list and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    expected = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
    raise BloomJaxError(f"{source}: {key} must be {expected}, got {value!r}")


def data_files(cfg: TrainConfig) -> list[str]:
    """The recipe's data paths, with `{python_stdlib}` standing for the directory of Python's standard library
    (real text on any machine with Python: the quickstart recipe trains on it)."""
    if not cfg.train_data:
        raise BloomJaxError("train config: train_data is empty (text or JSONL files, directories or globs)")
    stdlib = sysconfig.get_paths()["stdlib"]
    return [path.replace("{python_stdlib}", stdlib) for path in cfg.train_data]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


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
    """True for the weights that weight decay applies to: kernels and the embedding, not LayerNorms or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "embedding"), params)


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


def next_token_loss(model: BloomForCausalLM, params: Any, tokens_bs1: jax.Array,
                    dropout_rng: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, 1:] from tokens[:, :-1] (packed windows: no padding)."""
    inputs_bs, targets_bs = tokens_bs1[:, :-1], tokens_bs1[:, 1:]
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else {}
    logits_bsv = model.apply({"params": params}, inputs_bs, deterministic=dropout_rng is None, rngs=rngs)
    return optax.softmax_cross_entropy_with_integer_labels(logits_bsv, targets_bs).mean()


def train_step(model: BloomForCausalLM, optimizer: optax.GradientTransformation, grad_accum: int, seed: int,
               dropout: bool, state: dict, tokens_bs1: jax.Array) -> tuple[dict, dict]:
    """One optimizer step on a global batch [b, s + 1], split into `grad_accum` equal micro-batches whose
    gradients are averaged (so equal to one batch k times as large). Returns the new state and metrics."""
    batch = tokens_bs1.shape[0]
    micro_mbs1 = tokens_bs1.reshape(grad_accum, batch // grad_accum, tokens_bs1.shape[1])
    step_key = jax.random.fold_in(jax.random.key(seed), state["step"])
    params = state["params"]

    def micro_step(grad_sum, inputs):
        tokens, index = inputs
        rng = jax.random.fold_in(step_key, index) if dropout else None
        loss, grads = jax.value_and_grad(next_token_loss, argnums=1)(model, params, tokens, rng)
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


KNOWN_PEAK_TFLOPS = {"TPU v3": 123, "TPU v4": 275, "TPU v5 lite": 197, "TPU v5e": 197, "TPU v5p": 459,
                     "TPU v6 lite": 918, "TPU v6e": 918, "NVIDIA H100": 989, "NVIDIA A100": 312}


def peak_flops_per_device(cfg: TrainConfig) -> float:
    """Per-device peak FLOP/s for MFU: the config's, a known accelerator's (bf16 dense), or an fp32 matmul
    measured now on CPU."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in KNOWN_PEAK_TFLOPS.items():
        if kind.startswith(name):
            return tflops * 1e12
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
        from bloom_jax.sharding import fit_rules, load_rules, make_mesh

        self.cfg, self.progress = cfg, progress
        data_files(cfg)  # an empty train_data fails here, before anything is logged or built
        self.output_dir = Path(cfg.output_dir)
        self.mesh = make_mesh(cfg.mesh)
        self.rules = fit_rules(load_rules(cfg.rules), self.mesh)
        self.model_config = self._model_config()
        self.model = make_model(self.model_config, dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                                scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy)
        self.optimizer = make_optimizer(cfg)
        self.tokenizer = self._tokenizer()
        self._stop_signal: int | None = None

    # Set-up -------------------------------------------------------------------------------------------------

    def _model_config(self) -> BloomConfig:
        if self.cfg.init_from is None:
            return load_config(self.cfg.model)
        from bloom_jax.checkpoint import _read_config, is_converted, resolve_model_dir

        if is_converted(self.cfg.init_from):
            return _read_config(self.cfg.init_from)
        return BloomConfig.from_json(resolve_model_dir(self.cfg.init_from) / "config.json")

    def _tokenizer(self):
        from bloom_jax.checkpoint import read_tokenizer
        from bloom_jax.tokenizer import Tokenizer, train_tokenizer

        if self.cfg.tokenizer:
            return Tokenizer.from_dir(self.cfg.tokenizer)
        if self.cfg.init_from:
            tokenizer = read_tokenizer(self.cfg.init_from)
            if tokenizer is None:
                raise BloomJaxError(f"{self.cfg.init_from} has no tokenizer.json: set `tokenizer`")
            return tokenizer
        saved = self.output_dir / "tokenizer.json"
        if saved.is_file():  # a resumed run keeps the tokenizer it trained
            return Tokenizer.from_dir(self.output_dir)
        vocab = min(self.cfg.tokenizer_vocab_size, self.model_config.vocab_size)
        _log(f"training a {vocab}-token byte-level BPE tokenizer on the training data")
        tokenizer = train_tokenizer(data_files(self.cfg), vocab, self.cfg.jsonl_field)
        if jax.process_index() == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(self.output_dir)
        return tokenizer

    def _shardings(self):
        from bloom_jax.sharding import logical_to_sharding, param_shardings

        params = param_shardings(self.model, self.mesh, self.rules)
        abstract_params = jax.eval_shape(lambda: _init_params(self.model, 0))
        opt = optimizer_shardings(self.optimizer, jax.eval_shape(self.optimizer.init, abstract_params), params,
                                  self.mesh)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        state = {"step": replicated, "params": params, "opt_state": opt}
        data = logical_to_sharding(jax.sharding.PartitionSpec("activation_batch", None), self.mesh, self.rules)
        return state, data, replicated

    def _initial_state(self, state_shardings) -> dict:
        if self.cfg.init_from is not None:  # restored straight into the rules' shardings (outside the context)
            from bloom_jax.checkpoint import from_pretrained

            _, params = from_pretrained(self.cfg.init_from, mesh=self.mesh, dtype=self.cfg.compute_dtype,
                                        param_dtype=self.cfg.param_dtype, rules=self.rules,
                                        scan_layers=self.cfg.scan_layers)
        with self._context():
            if self.cfg.init_from is None:
                params = jax.jit(lambda: _init_params(self.model, self.cfg.seed),
                                 out_shardings=state_shardings["params"])()
            opt_state = jax.jit(self.optimizer.init, out_shardings=state_shardings["opt_state"])(params)
        return {"step": jax.device_put(jnp.int32(0), state_shardings["step"]), "params": params,
                "opt_state": opt_state}

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(list(self.rules)))
        return stack

    # The run ------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Trains to `cfg.steps` (or until SIGTERM), evaluating and checkpointing on the way; returns the last
        metrics. Writes OUTPUT_DIR/final, a converted checkpoint that `bloom-jax generate` reads."""
        import orbax.checkpoint as ocp

        cfg = self.cfg
        corpus = self._corpus()
        state_shardings, data_sharding, replicated = self._shardings()
        step_fn = jax.jit(
            lambda state, tokens: train_step(self.model, self.optimizer, cfg.grad_accum, cfg.seed, cfg.dropout,
                                             state, tokens),
            in_shardings=(state_shardings, data_sharding), out_shardings=(state_shardings, replicated),
            donate_argnums=0)
        eval_fn = jax.jit(lambda params, tokens: next_token_loss(self.model, params, tokens),
                          in_shardings=(state_shardings["params"], data_sharding), out_shardings=replicated)

        manager = ocp.CheckpointManager(
            (self.output_dir / "checkpoints").absolute(),
            # should_save_fn rather than save_interval_steps: the latter adds an unwanted save at the first step.
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, enable_async_checkpointing=True, create=True,
                                                 should_save_fn=lambda step, _: step % cfg.save_every == 0))
        state = self._restore_or_init(manager, state_shardings)
        start_step = int(state["step"])
        batches = corpus.train.train_batches(cfg.batch_size)
        tokens_per_step = cfg.batch_size * cfg.seq_len
        flops_per_step = 3 * forward_flops(self.model_config, cfg.batch_size, cfg.seq_len)
        peak = peak_flops_per_device(cfg) * jax.device_count()
        writer = _MetricsWriter(self.output_dir, enabled=jax.process_index() == 0)
        schedule = learning_rate_schedule(cfg)
        previous = signal.signal(signal.SIGTERM, self._on_signal)
        metrics: dict = {}
        try:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=start_step, desc="training", unit="step", file=sys.stderr,
                       disable=not self.progress or jax.process_index() != 0, dynamic_ncols=True)
            window_start, window_steps, done = time.perf_counter(), 0, start_step
            for step in range(start_step, cfg.steps):
                tokens = self._global_batch(batches, step, data_sharding)
                with self._context():
                    state, step_metrics = step_fn(state, tokens)
                loss = float(step_metrics["loss"])  # a sync per step: also how a NaN is caught at once
                if not bool(step_metrics["finite"]):
                    manager.wait_until_finished()
                    last = manager.latest_step()
                    kept = (f"The last good checkpoint is step {last} in {self.output_dir / 'checkpoints'}"
                            if last is not None else "No checkpoint had been saved")
                    raise BloomJaxError(f"non-finite loss, gradients or weights at step {step + 1} (loss {loss}); "
                                        f"stopping. {kept}")
                done = step + 1
                window_steps += 1
                manager.save(done, args=ocp.args.StandardSave(state))  # when due (save_every)
                if done % cfg.log_every == 0 or done == cfg.steps:
                    seconds = time.perf_counter() - window_start
                    metrics = {"step": done, "loss": loss, "grad_norm": float(step_metrics["grad_norm"]),
                               "learning_rate": float(schedule(done - 1)),
                               "tokens_per_s": window_steps * tokens_per_step / seconds,
                               "mfu": window_steps * flops_per_step / seconds / peak}
                    if done % cfg.eval_every == 0 or done == cfg.steps:
                        metrics.update(self._evaluate(eval_fn, state["params"], corpus, data_sharding))
                    writer.write(metrics)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                                    mfu=f"{metrics['mfu']:.1%}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if self._stopping():
                    _log(f"signal {self._stop_signal}: saving step {done} and stopping")
                    if manager.latest_step() != done:
                        manager.save(done, args=ocp.args.StandardSave(state), force=True)
                    break
            bar.close()
            manager.wait_until_finished()
            if done == cfg.steps:
                self._write_final(state["params"])
        finally:
            signal.signal(signal.SIGTERM, previous)
            manager.close()
            writer.close()
        return metrics

    def _corpus(self):
        from bloom_jax.data import load_corpus

        cache = Path(self.cfg.data_cache) if self.cfg.data_cache else self.output_dir / "data-cache"
        return load_corpus(data_files(self.cfg), self.tokenizer, self.cfg.seq_len, cache,
                           eval_fraction=self.cfg.eval_fraction, seed=self.cfg.seed,
                           jsonl_field=self.cfg.jsonl_field)

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
            with self._context():
                losses.append(float(eval_fn(params, tokens)))
        loss = float(np.mean(losses))
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}

    def _restore_or_init(self, manager, state_shardings) -> dict:
        import orbax.checkpoint as ocp

        latest = manager.latest_step()
        if latest is None:
            return self._initial_state(state_shardings)
        _log(f"resuming from step {latest} of {self.output_dir / 'checkpoints'}")
        abstract = jax.eval_shape(lambda: {
            "step": jnp.int32(0), "params": _init_params(self.model, 0),
            "opt_state": self.optimizer.init(_init_params(self.model, 0))})
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                              state_shardings)
        return manager.restore(latest, args=ocp.args.StandardRestore(target))

    def _write_final(self, params) -> None:
        """OUTPUT_DIR/final: params (scanned layout) + config.json + tokenizer.json, as `bloom-jax convert`
        writes, so `bloom-jax generate OUTPUT_DIR/final` and `from_pretrained` read it."""
        import orbax.checkpoint as ocp

        final = (self.output_dir / "final").absolute()
        if not self.cfg.scan_layers:
            params = stack_layers(params, self.model_config.n_layer)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(final / "params", params, force=True)
        checkpointer.wait_until_finished()
        if jax.process_index() == 0:
            config = self.model_config.replace(extra={**self.model_config.extra, "dtype": self.cfg.param_dtype,
                                                      "torch_dtype": self.cfg.param_dtype})
            config.to_json(final / "config.json")
            self.tokenizer.save(final)
        _log(f"final checkpoint: {final}")

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def _stopping(self) -> bool:
        """Whether any process got SIGTERM (every process must stop at the same step)."""
        local = self._stop_signal is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


def _init_params(model: BloomForCausalLM, seed: int) -> Any:
    return nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"])


class _MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard scalars under OUTPUT_DIR/tensorboard."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(output_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if key != "step":
                self._tensorboard.add_scalar(key, value, metrics["step"])

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()


def evaluate(checkpoint: str, data: Sequence[str], seq_len: int = 512, batch_size: int = 8,
             max_batches: int | None = None, jsonl_field: str = "text") -> dict:
    """Perplexity of a checkpoint on text: the windows of `seq_len + 1` tokens of the data (EOS after each
    document), in order, in full batches. Returns tokens scored, mean loss and perplexity."""
    import tempfile

    from bloom_jax.checkpoint import from_pretrained, read_tokenizer
    from bloom_jax.data import load_corpus

    tokenizer = read_tokenizer(checkpoint)
    if tokenizer is None:
        raise BloomJaxError(f"{checkpoint} has no tokenizer.json")
    model, params = from_pretrained(checkpoint)
    with tempfile.TemporaryDirectory(prefix="bloom-jax-eval-") as cache:
        split = load_corpus(data, tokenizer, seq_len, cache, eval_fraction=0.0, jsonl_field=jsonl_field).train
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


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
