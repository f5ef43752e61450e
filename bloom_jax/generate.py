"""Text generation with a preallocated KV cache: one compiled prefill, then a compiled decode loop.

Two layers:
- `prefill` and `decode`, pure jitted functions over a decode state (the cache, the tokens so far, which
  sequences are done, the RNG). `generate` chains them for token ids; no Python runs per token.
- `Generator`, for text: tokenizes, pads prompts and new-token budgets to buckets (so a new prompt length reuses a
  compiled shape), runs the decode loop whole or one token at a time for streaming (`stream`, or `generate` with
  `on_text`), and decodes the output.

The cache (`bloom_jax.cache.KVCache`) has room for T = prompt length + new tokens. A checkpoint's
`generation_config.json` sets the end-of-sequence and pad ids and the default sampling (`GenerationDefaults`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bloom_jax import speculative
from bloom_jax.cache import KVCache
from bloom_jax.config import BloomConfig
from bloom_jax.errors import BloomJaxError
from bloom_jax.kernels import Kernels
from bloom_jax.lora import fold, merge_trees, split_adapters
from bloom_jax.model import BloomForCausalLM, stack_layers, unstack_layers
from bloom_jax.sampling import Sampling, choose, mark_seen, seed_key, seen_tokens
from bloom_jax.sharding import ShardingPlan
from bloom_jax.tokenizer import left_pad
from bloom_jax.weights import to_decode_weights


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a checkpoint sets for generation: the ids that end a sequence, the pad id, and the default token
    budget and sampling, from its `generation_config.json` (transformers' names) over its `config.json`."""

    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int = 3
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()

    @classmethod
    def from_configs(cls, config: BloomConfig, generation: Mapping[str, Any] | None = None) -> GenerationDefaults:
        """From the model's config and a `generation_config.json` dict (None: there is none; a null value: that
        key is not set). Sampling is on when it says `do_sample`, then with transformers' defaults for what it
        leaves out (temperature 1, top-k 50). A value of the wrong type is a `BloomJaxError`."""
        given = {key: value for key, value in (generation or {}).items() if value is not None}
        eos = given.get("eos_token_id", config.eos_token_id)
        eos_list = [] if eos is None else eos if isinstance(eos, (list, tuple)) else [eos]
        eos_ids = tuple(_checked(i, "eos_token_id", int) for i in eos_list)
        pad = _checked(given.get("pad_token_id", 3 if config.pad_token_id is None else config.pad_token_id),
                       "pad_token_id", int)
        max_new_tokens = _checked(given.get("max_new_tokens", cls.max_new_tokens), "max_new_tokens", int)
        if max_new_tokens < 1:
            raise BloomJaxError(f"generation_config.json: max_new_tokens must be >= 1, got {max_new_tokens}")
        penalty = _checked(given.get("repetition_penalty", 1.0), "repetition_penalty", float)
        do_sample = given.get("do_sample", False)
        if not isinstance(do_sample, bool):
            raise BloomJaxError(f"generation_config.json: do_sample must be true or false, got {do_sample!r}")
        sampling = Sampling(repetition_penalty=penalty)
        if do_sample:
            sampling = Sampling(_checked(given.get("temperature", 1.0), "temperature", float),
                                _checked(given.get("top_k", 50), "top_k", int),
                                _checked(given.get("top_p", 1.0), "top_p", float), penalty)
        return cls(eos_ids, pad, max_new_tokens, sampling)


def _checked(value: Any, key: str, kind: type) -> Any:
    """A generation_config.json value as `kind` (int or float), or a one-line error naming its key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or kind is int and value != int(value):
        raise BloomJaxError(f"generation_config.json: {key} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {value!r}")
    return kind(value)


@functools.partial(jax.jit, static_argnames=("model", "sampling", "new_tokens", "room"))
def prefill(model: BloomForCausalLM, params, input_ids: jax.Array, attention_mask: jax.Array, active: jax.Array,
            rng: jax.Array, eos_token_ids: jax.Array, pad_token_id: jax.Array | int, sampling: Sampling,
            new_tokens: int, room: int | None = None) -> dict:
    """Runs left-padded prompts (ids and mask [b, s]) into a fresh cache with room for `new_tokens` more
    positions (or `room`: speculative decoding writes past the budget) and picks each sequence's first new token.
    Rows with `active` [b] False are batch padding: done from the start. Any of `eos_token_ids` (int32 [k]) ends a
    sequence.

    Returns the decode state: `tokens_bn` int32 [b, new_tokens] (pad after a sequence's EOS), `step` (tokens
    made so far), `token_b` (the last ones), `done_b`, the cache, the seen-token mask of the repetition penalty,
    the RNG, and the EOS and pad ids.
    """
    ids_bs, active_b = input_ids, active
    batch, prompt_len = ids_bs.shape
    cache = KVCache.init(model.config, batch, prompt_len + (room or new_tokens), model.dtype,
                         per_layer=not model.scan_layers)
    seen_bv = seen_tokens(ids_bs, model.config.vocab_size) if sampling.features.penalty else None
    logits_b1v, cache = model.apply({"params": params}, ids_bs, attention_mask=attention_mask, cache=cache,
                                    last_only=True)
    rng, key = (rng, None) if sampling.greedy else jax.random.split(rng)
    token_b = jnp.where(active_b, choose(model.resolved_kernels, logits_b1v[:, -1], seen_bv, sampling,
                                         sampling.features, key), pad_token_id)
    tokens_bn = jnp.full((batch, new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token_b)
    return {"tokens_bn": tokens_bn, "step": jnp.int32(1), "token_b": token_b,
            "done_b": ~active_b | jnp.isin(token_b, eos_token_ids), "cache": cache,
            "seen_bv": mark_seen(seen_bv, token_b[:, None]), "rng": rng,
            "eos": jnp.asarray(eos_token_ids, jnp.int32), "pad": jnp.int32(pad_token_id)}


@functools.partial(jax.jit, static_argnames=("model", "sampling"), donate_argnames=("state",))
def decode(model: BloomForCausalLM, params, state: dict, stop: jax.Array | int, sampling: Sampling) -> dict:
    """Continues the sequences of a `prefill` state until each has `stop` tokens (at most the room prefill made)
    or every one has produced EOS, in one compiled loop. The state is donated: its cache is updated in place."""
    room = state["tokens_bn"].shape[1]
    stop = jnp.minimum(stop, room)

    def cond(state):
        return (state["step"] < stop) & ~jnp.all(state["done_b"])

    def body(state):
        logits_b1v, cache = model.apply({"params": params}, state["token_b"][:, None], cache=state["cache"],
                                        last_only=True)
        # Greedy draws nothing: no key split (XLA:CPU runs threefry as a loop of its own, every token).
        rng, key = (state["rng"], None) if sampling.greedy else jax.random.split(state["rng"])
        picked_b = choose(model.resolved_kernels, logits_b1v[:, -1], state["seen_bv"], sampling, sampling.features,
                          key)
        token_b = jnp.where(state["done_b"], state["pad"], picked_b)
        tokens_bn = lax.dynamic_update_slice(state["tokens_bn"], token_b[:, None], (0, state["step"]))
        return {**state, "tokens_bn": tokens_bn, "step": state["step"] + 1, "token_b": token_b,
                "done_b": state["done_b"] | jnp.isin(token_b, state["eos"]), "cache": cache,
                "seen_bv": mark_seen(state["seen_bv"], token_b[:, None]), "rng": rng}

    return lax.while_loop(cond, body, state)


def generate(model: BloomForCausalLM, params, input_ids: jax.Array, attention_mask: jax.Array | None = None,
             max_new_tokens: int = 32, eos_token_id: int = 2, pad_token_id: int = 3, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             rng: jax.Array | None = None) -> jax.Array:
    """New tokens int32 [b, max_new_tokens] for left-padded prompts (ids and mask [b, s]; no mask: no padding);
    `pad_token_id` after a sequence's EOS.

    temperature 0 is greedy; otherwise samples with `rng` (default: key 0) after
    `bloom_jax.sampling.process_logits`. The loop
    stops early once every sequence has produced EOS.
    """
    sampling = Sampling(temperature, top_k, top_p, repetition_penalty)
    batch = input_ids.shape[0]
    rng = jax.random.key(0) if rng is None else rng
    mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
    state = prefill(model, params, input_ids, mask, jnp.ones((batch,), jnp.bool_), rng,
                    jnp.asarray([eos_token_id], jnp.int32), pad_token_id, sampling, max_new_tokens)
    return decode(model, params, state, max_new_tokens, sampling)["tokens_bn"]


def bucket(n: int, minimum: int = 16) -> int:
    """The compiled size used for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass
class Completion:
    """One prompt's result. `completion_ids` stop after EOS (included) or at the token budget."""

    prompt: str | None
    prompt_ids: list[int]
    completion: str | None
    completion_ids: list[int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TextPiece:
    """A streamed piece of prompt `index`'s completion: `token_id` just arrived and `text` is the new text it
    settles ('' while a multi-byte character is incomplete). A sequence that ends inside a character gets a last
    piece with `token_id` None and the rest of its text."""

    index: int
    token_id: int | None
    text: str


def with_adapter(model: BloomForCausalLM, params: dict, adapter: str | os.PathLike, merge: bool,
                 sharding: ShardingPlan | None = None) -> tuple[BloomForCausalLM, dict]:
    """(model, params) with a peft LoRA adapter: folded into the kernels (`merge`: computed in float32, stored in
    the kernels' dtype, so a bfloat16 base rounds the sum), or beside them (the model given the adapters'
    `LoraConfig`, their float32 weights placed by the rules' shardings)."""
    from bloom_jax.checkpoints.peft import load_adapter

    lora, adapters, _ = load_adapter(adapter, model.config, model.scan_layers)
    if merge:
        return model, fold(merge_trees(params, adapters), lora)
    model = model.clone(lora=lora)
    if sharding is None:
        adapters = jax.device_put(adapters, jax.devices()[0])
    else:
        adapters = jax.device_put(adapters, split_adapters(sharding.param_shardings(model))[1])
    return model, merge_trees(params, adapters)


class Generator:
    """Generation for notebooks and the CLI: a model and its parameters, prepared for decoding, and a tokenizer.

    >>> gen = Generator.from_pretrained("converted/bloom-560m", decode_weights="int8")
    >>> gen.generate(["The capital of France is"], max_new_tokens=8)[0].completion
    >>> for piece in gen.stream(["Once upon a time"], max_new_tokens=64, temperature=0.8, top_p=0.9):
    ...     print(piece.text, end="", flush=True)

    Parameters are held in the layer layout the platform decodes fastest with (unrolled on CPU, scanned on
    accelerators: `bloom_jax.kernels.Kernels.decode_scan_layers`), in `decode_weights` if given (see
    `bloom_jax.weights.DECODE_WEIGHTS`: float32, bfloat16 or int8 out-major kernels, the fastest for decoding on
    CPU). Prompt lengths, batch sizes and token budgets are padded up to powers of two (at least 16 tokens), so
    most new requests reuse a compiled program.
    """

    def __init__(self, model: BloomForCausalLM, params, tokenizer=None, decode_weights: str | None = None,
                 mesh: jax.sharding.Mesh | None = None, rules: str | Sequence = "fsdp_tensor",
                 generation_config: Mapping[str, Any] | None = None, scan_layers: bool | None = None,
                 draft: Generator | None = None, draft_tokens: int = 4, prompt_lookup: int = 0):
        """`mesh` and `rules`: where `params` are sharded, and the rules that also shard the KV cache and the
        activations (a preset of configs/sharding or (logical, mesh axes) pairs). `generation_config`: a
        `generation_config.json` dict, for the EOS and pad ids and the default sampling (`GenerationDefaults`).
        `scan_layers`: the layer layout to decode with (None: the model's kernels', `Kernels.decode_scan_layers`).

        Speculative decoding (`bloom_jax.speculative`): `draft`, a generator of a smaller model with this one's
        tokenizer, proposes `draft_tokens` tokens a round; or, without a draft, `prompt_lookup` N >= 1 proposes
        the tokens after the last earlier occurrence of the context's final N. The tokens are those this model
        decodes alone (greedy) or drawn from its distribution (sampling); `last_stats` counts the accepted ones."""
        self.sharding = ShardingPlan.create(mesh, rules) if mesh is not None else None
        if scan_layers is None:
            scan_layers = model.resolved_kernels.decode_scan_layers
        if model.scan_layers and not scan_layers:
            model, params = model.clone(scan_layers=False), unstack_layers(params)
        elif scan_layers and not model.scan_layers:
            model, params = model.clone(scan_layers=True), stack_layers(params, model.config.n_layer)
        if decode_weights is not None:
            model, params = model.clone(decode_weights=decode_weights), to_decode_weights(params, decode_weights)
        self.model, self.params, self.tokenizer = model, params, tokenizer
        config = model.config
        # BLOOM's ALiBi has no position limit; a config may still declare the length it was trained for.
        declared = [config.seq_length] + [config.extra.get(k) for k in ("n_positions", "max_position_embeddings")]
        self.max_length: int | None = next((int(n) for n in declared if n is not None), None)
        self.defaults = GenerationDefaults.from_configs(config, generation_config)
        self.speculation: speculative.Speculation | None = None
        self.draft = draft
        if draft is not None or prompt_lookup:
            if draft is not None:
                speculative.check_draft(model, draft.model)
            self.speculation = speculative.Speculation(draft_tokens, None if draft is None else draft.model,
                                                       prompt_lookup)
        self.last_stats: dict[str, float] | None = None  # the last call's rounds and accepted tokens (speculative)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, decode_weights: str | None = None, dtype: Any = None,
                        mesh: jax.sharding.Mesh | None = None, rules: str | Sequence = "fsdp_tensor",
                        scan_layers: bool | None = None, kernels: str = "auto", attention: str = "auto",
                        adapter: str | os.PathLike | None = None, merge_adapter: bool = True,
                        draft: str | os.PathLike | Generator | None = None, draft_tokens: int = 4,
                        prompt_lookup: int = 0) -> Generator:
        """A converted checkpoint, Hugging Face directory or hub id (see `bloom_jax.from_pretrained`), with the
        tokenizer.json beside it (None if there is none: prompts must then be token ids) and its
        generation_config.json if it has one. `kernels`, `attention`: see `bloom_jax.kernels.Kernels.create`.

        `adapter`: a peft LoRA adapter directory or hub id (`bloom_jax.checkpoints.peft`) for this base, folded
        into the weights (`merge_adapter`, decoding at the base's speed) or applied beside them (the base's
        weights left as they are, in any `decode_weights` format).

        `draft`: a checkpoint (loaded as this one is, with the same dtype, mesh and decode weights) or a `Generator`
        that drafts `draft_tokens` tokens a round; `prompt_lookup`: draft by prompt lookup instead (see `__init__`)."""
        from bloom_jax.checkpoints import checkpoint_location, from_pretrained, read_generation_config, read_tokenizer

        if scan_layers is None:
            scan_layers = Kernels.create(kernels, attention).decode_scan_layers
        location = checkpoint_location(path)  # a hub id resolved once, not for each file
        model, params = from_pretrained(location, mesh=mesh, dtype=dtype, rules=rules, scan_layers=scan_layers,
                                        kernels=kernels, attention=attention)
        if adapter is not None:
            model, params = with_adapter(model, params, adapter, merge_adapter,
                                         ShardingPlan.create(mesh, rules) if mesh is not None else None)
        if draft is not None and not isinstance(draft, Generator):
            draft = cls.from_pretrained(draft, decode_weights, dtype, mesh, rules, scan_layers, kernels, attention)
        return cls(model, params, read_tokenizer(location), decode_weights, mesh, rules,
                   read_generation_config(location), scan_layers, draft, draft_tokens, prompt_lookup)

    def sharding_context(self, batch: int) -> contextlib.AbstractContextManager:
        """The mesh and logical rules to run compiled calls on `batch` rows of this model under (the batch's
        sharding over the mesh), for code that calls the model's compiled functions itself, as the server does;
        without a mesh, a context that does nothing."""
        return self.sharding.for_batch(batch).context() if self.sharding else contextlib.nullcontext()

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids that end a sequence (a config may list several)."""
        return self.defaults.eos_token_ids

    @property
    def pad_token_id(self) -> int:
        return self.defaults.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The first end-of-sequence id (a config may list several; any of them ends a sequence)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | None = None,
                 *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int = 0,
                 on_text: Callable[[TextPiece], None] | None = None) -> list[Completion]:
        """Completes each prompt (text, or token ids). Settings left at None take the checkpoint's defaults
        (`self.defaults`: its generation_config.json, else greedy and 32 new tokens); temperature 0 is greedy.
        With `on_text`, streams: called with each new piece as it arrives; without, the whole loop runs compiled
        with no Python per token."""
        max_new_tokens, sampling = self._settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        texts, prompt_ids = self._encode(prompts)
        ids_per_row: list[list[int]] = [[] for _ in prompt_ids]
        if on_text is None:
            for index, token in self._run(prompt_ids, max_new_tokens, sampling, seed, streaming=False):
                ids_per_row[index].append(token)
        else:
            for piece in self._pieces(prompt_ids, max_new_tokens, sampling, seed):
                if piece.token_id is not None:
                    ids_per_row[piece.index].append(piece.token_id)
                on_text(piece)
        return [Completion(text, ids, self._decode(out), out)
                for text, ids, out in zip(texts, prompt_ids, ids_per_row)]

    def stream(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int | None = None,
               *, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int = 0) -> Iterator[TextPiece]:
        """The new tokens of every prompt as they arrive, one `TextPiece` per token and prompt (settings as in
        `generate`)."""
        max_new_tokens, sampling = self._settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
        _, prompt_ids = self._encode(prompts)
        return self._pieces(prompt_ids, max_new_tokens, sampling, seed)

    def _settings(self, max_new_tokens, temperature, top_k, top_p, repetition_penalty) -> tuple[int, Sampling]:
        """The token budget and sampling of a call: what it gives, the defaults for what it leaves at None."""
        given = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "repetition_penalty": repetition_penalty}
        sampling = dataclasses.replace(self.defaults.sampling, **{k: v for k, v in given.items() if v is not None})
        return (self.defaults.max_new_tokens if max_new_tokens is None else max_new_tokens), sampling

    def _pieces(self, prompt_ids, max_new_tokens, sampling, seed) -> Iterator[TextPiece]:
        decoders = [self.tokenizer.stream() if self.tokenizer else None for _ in prompt_ids]
        for index, token in self._run(prompt_ids, max_new_tokens, sampling, seed, streaming=True):
            yield TextPiece(index, token, decoders[index].push(token) if decoders[index] else "")
        for index, decoder in enumerate(decoders):
            if decoder and (rest := decoder.flush()):
                yield TextPiece(index, None, rest)

    def _encode(self, prompts) -> tuple[list[str | None], list[list[int]]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise BloomJaxError("no prompts")
        if all(isinstance(p, str) for p in prompts):
            if self.tokenizer is None:
                raise BloomJaxError("text prompts need a tokenizer (the checkpoint has no tokenizer.json); "
                                    "pass token ids instead")
            ids = [self.tokenizer.encode(p) for p in prompts]
            return prompts, ids
        ids = [[int(t) for t in p] for p in prompts]
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for p in ids for t in p):
            raise BloomJaxError(f"token ids must be in [0, {vocab})")
        return [None] * len(ids), ids

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer else None

    def _run(self, prompt_ids: list[list[int]], max_new_tokens: int, sampling: Sampling, seed: int,
             streaming: bool) -> Iterator[tuple[int, int]]:
        """(prompt index, token id) of every new token, in order; per step when streaming, else all at the end."""
        if max_new_tokens < 1:
            raise BloomJaxError(f"max new tokens must be at least 1, got {max_new_tokens}")
        if any(not ids for ids in prompt_ids):
            raise BloomJaxError("a prompt is empty (no tokens)")
        longest = max(len(ids) for ids in prompt_ids)
        if self.max_length is not None and longest + max_new_tokens > self.max_length:
            raise BloomJaxError(f"a prompt of {longest} tokens plus {max_new_tokens} new ones exceeds the model's "
                                f"length limit of {self.max_length} tokens")
        batch, length, room = bucket(len(prompt_ids), 1), bucket(longest), bucket(max_new_tokens)
        # Batch padding rows: one pad token each, done from the start.
        padding_rows = [[self.pad_token_id]] * (batch - len(prompt_ids))
        ids_bs, mask_bs = left_pad(list(prompt_ids) + padding_rows, length, self.pad_token_id)
        active_b = np.arange(batch) < len(prompt_ids)
        eos_k = np.asarray(self.eos_token_ids or (-1,), np.int32)  # -1: never produced, never stops
        if self.speculation is not None:
            yield from self._run_speculative(ids_bs, mask_bs, active_b, len(prompt_ids), eos_k, max_new_tokens,
                                             room, sampling, seed, streaming)
            return
        with self.sharding_context(batch):
            state = prefill(self.model, self.params, ids_bs, mask_bs, active_b, seed_key(seed), eos_k,
                            self.pad_token_id, sampling, room)
        done = ~active_b
        if streaming:
            step = 1
            while True:
                tokens_b = np.asarray(state["tokens_bn"][:, step - 1])
                for row in np.flatnonzero(~done):
                    yield int(row), int(tokens_b[row])
                done = done | np.isin(tokens_b, eos_k)
                if step >= max_new_tokens or done.all():
                    return
                with self.sharding_context(batch):
                    state = decode(self.model, self.params, state, step + 1, sampling)
                step += 1
        with self.sharding_context(batch):
            state = decode(self.model, self.params, state, max_new_tokens, sampling)
        yield from _completed_rows(np.asarray(state["tokens_bn"])[:, :max_new_tokens], len(prompt_ids), eos_k)

    def _run_speculative(self, ids_bs, mask_bs, active_b, rows: int, eos_k, max_new_tokens: int, room: int,
                         sampling: Sampling, seed: int, streaming: bool) -> Iterator[tuple[int, int]]:
        """`_run` by speculative rounds: all at once, or one round at a time when streaming (each round's accepted
        tokens arrive together). Sets `last_stats`."""
        spec, batch = self.speculation, len(active_b)
        draft_params = None if self.draft is None else self.draft.params
        with self.sharding_context(batch):
            state = prefill(self.model, self.params, ids_bs, mask_bs, active_b, seed_key(seed), eos_k,
                            self.pad_token_id, sampling, room, speculative.room(room, spec))
            state = speculative.prefill(draft_params, state, ids_bs, mask_bs, spec)
        if streaming:
            sent = np.zeros(batch, np.int64)
            while True:
                tokens_bn, length_b = np.asarray(state["tokens_bn"]), np.asarray(state["length_b"])
                done_b = np.asarray(state["done_b"])
                for row in range(rows):
                    for token in tokens_bn[row, sent[row]:min(length_b[row], max_new_tokens)]:
                        yield row, int(token)
                sent = np.minimum(length_b, max_new_tokens)
                if done_b[:rows].all() or (sent[:rows] >= max_new_tokens).all():
                    break
                with self.sharding_context(batch):
                    state = speculative.decode(self.model, self.params, draft_params, state, max_new_tokens,
                                               sampling, spec, 1)
        else:
            with self.sharding_context(batch):
                state = speculative.decode(self.model, self.params, draft_params, state, max_new_tokens, sampling,
                                           spec)
            yield from _completed_rows(np.asarray(state["tokens_bn"])[:, :max_new_tokens], rows, eos_k)
        self.last_stats = speculative.statistics(state, spec, rows)


def _completed_rows(tokens_bn: np.ndarray, rows: int, eos_k: np.ndarray) -> Iterator[tuple[int, int]]:
    """(row, token) of the first `rows` rows' tokens, each up to its first EOS (included)."""
    for row in range(rows):
        for token in tokens_bn[row]:
            yield row, int(token)
            if token in eos_k:
                break


__all__ = ["GenerationDefaults", "prefill", "decode", "generate", "bucket",
           "Completion", "TextPiece", "Generator"]
