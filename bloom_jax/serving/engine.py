"""Continuous batching: the engine thread that owns the device, its bounded queue, and the requests it runs.

The web server submits `Request`s and reads `Event`s; it never touches the device, and the engine never waits
on HTTP. Each turn of the engine's loop:
1. drops requests whose client went away (their slots freed at once);
2. prefills the waiting requests that fit the free slots: short prompts in padded batches of a few, a long
   one (over `chunk` tokens) alone, one chunk per turn so that the running slots keep decoding meanwhile;
3. runs one decode step for every busy slot (with speculative decoding, one round: 1 to K + 1 tokens a slot),
   each with its own sampling, stop strings and token budget, and frees the slot of each sequence that ends.

A request with `n` choices is prefilled once and copied into n slots.

Faults stay with what they touch. An exception in one request's own host work (its sampling settings, its text,
its stop strings, its callback) fails that request alone (`Failed`, kind "request"); an exception in a device call
(an out-of-memory prefill or step) fails the requests in that call (kind "step"), and when the call had taken the
slots' buffers (they are donated to each step) every running request with them, and the slots are made anew. The
engine stops for good (kind "engine") only when it cannot go on: the slots cannot be made anew, the decode step
failed `MAX_STEP_FAILURES` times in a row, or its own bookkeeping failed; `on_failure` is then called (the server
exits so that a supervisor restarts it). Every request it accepted gets a `Finished` for each choice or one
`Failed`, also when the engine stops.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import heapq
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from bloom_jax.errors import one_line
from bloom_jax.generate import Generator, bucket
from bloom_jax.sampling import Features, RowSampling, seed_key
from bloom_jax.serving import batch as device
from bloom_jax.tokenizer import left_pad

log = logging.getLogger("bloom_jax.serving")


class QueueFull(Exception):
    """The engine's queue holds its maximum of waiting requests."""


class EngineStopped(Exception):
    """The engine is not running (stopped, or failed: `Engine.failure` says why)."""


# Decode steps failed in a row (no step between them went through) before the engine gives up: a step's memory is
# the same whatever the requests (the slots are preallocated), so a step that keeps failing is a device that does.
MAX_STEP_FAILURES = 3


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """A request's sampling: temperature 0 is greedy; `seed` None draws one."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self, vocab_size: int) -> None:
        """Raises ValueError for settings the engine cannot run (the server's protocol refuses them first)."""
        if not (0 <= self.temperature <= 100 and 0 < self.top_p <= 1 and 0 <= self.top_k <= vocab_size
                and 0 < self.repetition_penalty <= 100):
            raise ValueError(f"sampling settings out of range: {self}")
        if self.seed is not None and not -2**63 <= self.seed < 2**64:
            raise ValueError(f"the seed {self.seed} is not a 64-bit integer")


@dataclasses.dataclass(eq=False)  # a request is itself (the engine finds it in its queue by identity)
class Request:
    """One prompt's generation with `n` choices. `logprobs`: the number of alternatives returned with each new
    token's log-probability (None: no log-probabilities); `prompt_logprobs` the same for the prompt's tokens (the
    first has none). `on_event` is called from the engine's thread with each `Event`."""

    prompt_ids: list[int]
    max_tokens: int
    on_event: Callable[[Event], None]
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    stop: Sequence[str] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    failed: bool = False  # the engine sent it `Failed` (or its callback raised): nothing more comes
    finished: int = 0  # choices the engine has sent `Finished`

    def cancel(self) -> None:
        """Frees the request's slots at the engine's next turn (its client went away)."""
        self.cancelled.set()

    def check(self, vocab_size: int, max_length: int, max_slots: int) -> None:
        """Raises ValueError for a request the engine cannot run: an empty prompt or ids out of the vocabulary, a
        prompt and budget beyond `max_length`, n beyond the slots, settings out of range."""
        ids = self.prompt_ids
        if not ids or not all(isinstance(t, (int, np.integer)) and 0 <= t < vocab_size for t in ids):
            raise ValueError(f"a prompt must be 1 or more token ids in [0, {vocab_size})")
        if not 0 <= self.max_tokens or len(ids) + self.max_tokens > max_length:
            raise ValueError(f"{len(ids)} prompt tokens and {self.max_tokens} new ones are beyond {max_length}")
        if not 1 <= self.n <= max_slots:
            raise ValueError(f"n must be between 1 and {max_slots}, got {self.n}")
        for top in (self.logprobs, self.prompt_logprobs):
            if top is not None and not 0 <= top <= device.TOP_LOGPROBS:
                raise ValueError(f"at most {device.TOP_LOGPROBS} alternatives per token, got {top}")
        self.sampling.check(vocab_size)


@dataclasses.dataclass
class PromptScored:
    """The prompt's tokens' log-probabilities (None for the first) and their best alternatives (id, logprob)."""

    token_logprobs: list[float | None]
    top: list[list[tuple[int, float]]]


@dataclasses.dataclass
class Token:
    """Choice `choice` made `token_id`; `text` is the text it settles ('' while a character is incomplete or a
    stop string may be starting); `logprob` and `top` when the request asked for them."""

    choice: int
    token_id: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclasses.dataclass
class Finished:
    """Choice `choice` ended: `reason` is 'stop' (EOS or a stop string), 'length' (its budget) or 'cancelled';
    `text` is what remained to emit (text held back for a stop string that did not come, or the last bytes)."""

    choice: int
    reason: str
    text: str = ""


@dataclasses.dataclass
class Failed:
    """The request failed, all its choices (nothing more comes for it). `kind`: "request" when its own work raised
    (a bug the request met: the others go on), "step" when a device call it was in failed (out of memory: it may
    go through when tried again), "engine" when the engine stopped (failed for good, or the server is shutting
    down)."""

    message: str
    kind: str = "engine"


Event = PromptScored | Token | Finished | Failed


@dataclasses.dataclass
class _Sequence:
    """A choice in a slot: what it has made and how it is decoded into text."""

    request: Request
    choice: int
    slot: int
    key_data: np.ndarray  # uint32 [2]
    stream: object | None  # a TextStream, None without a tokenizer
    made: int = 0
    text: str = ""
    emitted: int = 0  # characters of `text` sent
    last_token: int = 0
    last_time: float = 0.0


@dataclasses.dataclass
class _Prefill:
    """Requests being prefilled together: their padded ids, and the chunks done so far."""

    requests: list[Request]
    ids_bs: np.ndarray
    mask_bs: np.ndarray
    cache: object
    next_ids_bs: np.ndarray  # the ids one position on: what each position's logits score
    done: int = 0  # positions prefilled
    scored: list = dataclasses.field(default_factory=list)  # per chunk: (next logprobs, top ids, top logprobs)
    last_logits: object = None
    draft_cache: object = None  # the draft model's (speculative decoding)


class Engine:
    """Serves a `Generator`'s model with `max_slots` decode slots of `max_length` positions (prompt plus new
    tokens) and a queue of at most `max_queue` waiting requests. `start()` runs its loop on a thread;
    `on_failure(message)` is called from it if the engine stops for good.

    Prompts longer than `chunk` tokens are prefilled a chunk per turn; shorter ones together while the padded
    batch (rows and length rounded up to powers of two) holds at most `prefill_tokens` tokens. A prefill is
    compute-bound, so a big batch gains little and makes every prompt in it wait for all: on 2 CPU cores
    bloom-560m prefills 1 x 64 tokens in 0.17 s, 4 x 64 in 0.6 s, 16 x 64 in 4.4 s."""

    def __init__(self, generator: Generator, max_slots: int = 8, max_length: int = 1024, max_queue: int = 256,
                 chunk: int = 512, prefill_tokens: int = 256, metrics=None,
                 on_failure: Callable[[str], None] | None = None):
        self.generator = generator
        self.model, self.params = generator.model, generator.params
        self.max_slots, self.max_length, self.max_queue = max_slots, max_length, max_queue
        self.chunk, self.prefill_tokens = chunk, prefill_tokens
        self.metrics = metrics
        self.on_failure = on_failure
        self.pad = generator.pad_token_id
        self.eos = frozenset(generator.eos_token_ids)
        self._waiting: collections.deque[Request] = collections.deque()
        self._lock = threading.Lock()
        self._closed = False  # under the lock: no request is taken any more (stopped or failed)
        self._wake = threading.Event()
        self._free = list(range(max_slots))  # a heap: the lowest free slot first keeps busy slots low
        self._running: dict[int, _Sequence] = {}
        self._prefill: _Prefill | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._step_failures = 0  # decode steps failed since the last that went through
        self.failure: str | None = None
        # Speculative decoding: each step a round of K drafts per slot, verified at once (`bloom_jax.speculative`);
        # a round writes K + 1 positions, so the slots have that many past max_length.
        self.speculation = generator.speculation
        self._draft = generator.draft
        self._draft_params = None if self._draft is None else self._draft.params
        self._new_slots()

    def _new_slots(self) -> None:
        """The slots' cache, seen-token marks and draft state, empty."""
        length = self.max_length if self.speculation is None else self.max_length + self.speculation.draft_tokens + 1
        with self._context(self.max_slots):
            self._slots, self._seen = device.new_slots(self.model, self.max_slots, length)
            self._drafts = None if self.speculation is None else device.new_drafts(self.speculation, self.max_slots,
                                                                                   length)

    # -- the web side ---------------------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queues a request. Raises ValueError for one the engine cannot run (`Request.check`: the server's
        protocol refuses those first), `QueueFull`, or `EngineStopped`."""
        request.check(self.model.config.vocab_size, self.max_length, self.max_slots)
        with self._lock:
            if self._closed or self._stop.is_set():
                raise EngineStopped(self.failure or "the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting requests)")
            self._waiting.append(request)
        self._wake.set()

    @property
    def cache_bytes(self) -> int:
        """The slots' KV cache in bytes (keys and values of every layer; the draft's too)."""
        drafts = self._drafts.nbytes if self._drafts is not None else 0
        return self._slots.nbytes + drafts

    @property
    def queue_depth(self) -> int:
        prefill = self._prefill
        return len(self._waiting) + (len(prefill.requests) if prefill else 0)

    @property
    def busy_slots(self) -> int:
        return self.max_slots - len(self._free)

    @property
    def alive(self) -> bool:
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="bloom-jax-engine", daemon=True)
        self._thread.start()
        return self

    def warm_up(self, prompt_buckets: Sequence[int] = (16,), max_group: int = 1) -> None:
        """Compiles before the first client waits for the compiler: the decode step at every row bucket (1, 2,
        4, ... slots), and prefill, slot insertion and first tokens for prompts padded to each of
        `prompt_buckets` in groups of up to `max_group` prompts (powers of two); then runs one request end to
        end, which starts the engine. What it writes into idle slots is rewritten when a request takes them."""
        if self._thread is not None:
            raise RuntimeError("warm_up runs before the engine starts: it uses the slots itself")
        rows = 1
        while True:
            rows = min(rows, self.max_slots)
            sampling, features, _ = self._row_sampling([None] * rows)
            choice = self._step(np.full(rows, self.pad, np.int32), sampling, features, False)
            if rows == self.max_slots:
                break
            rows *= 2
        for length in prompt_buckets:
            group = 1
            while group <= min(max_group, self.max_slots) and group * length <= self.prefill_tokens:
                ids_bs = np.full((group, length), self.pad, np.int32)
                slots = np.arange(group, dtype=np.int32)
                sampling, features, _ = self._row_sampling([None] * group)
                with self._context(group):
                    cache = device.new_prefill_cache(self.model, group, length)
                    cache, last, *_ = device.prefill_chunk(self.model, self.params, cache, ids_bs,
                                                           np.ones_like(ids_bs), ids_bs, False)
                    draft_cache = self._draft_prefill(self._new_draft_prefill(group, length), ids_bs,
                                                      np.ones_like(ids_bs))
                    for slot in range(group):
                        self._slots, self._seen = device.insert(self._slots, self._seen, cache, ids_bs,
                                                                np.int32(slot), np.int32(slot), np.int32(length))
                        self._insert_draft(draft_cache, ids_bs, slot, slot, length)
                    choice = device.first_tokens(self.model.resolved_kernels, last, slots, self._seen, slots,
                                                 sampling, features, False)
                group *= 2
        jax.block_until_ready(choice)
        self._run_one()

    def _run_one(self) -> None:
        done = threading.Event()
        failed: list[str] = []

        def on_event(event):
            if isinstance(event, Failed):
                failed.append(event.message)
                done.set()
            elif isinstance(event, Finished):
                done.set()

        self.submit(Request([self.pad], 2, on_event, SamplingParams(temperature=0.0), ignore_eos=True))
        self.start()
        done.wait()
        if failed:
            raise EngineStopped(failed[0])

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the loop at its next turn; every request not finished by then gets `Failed`."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._thread is None or not self._thread.is_alive():
            self._close("the server is shutting down")

    # -- the engine thread ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        reason = "the server is shutting down"
        try:
            while not self._stop.is_set():
                try:
                    worked = self._turn()
                except _StepFailed:  # its requests are failed and the slots sound again: go on
                    continue
                if not worked:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except Exception as e:  # the engine cannot go on: fail everything, refuse new work
            log.exception("the engine failed")
            self.failure = reason = f"the engine failed: {e}" if isinstance(e, _EngineFailure) else (
                f"the engine failed: {type(e).__name__}: {one_line(e)}")
        finally:
            self._close(reason)
        if self.failure is not None and self.on_failure is not None:
            self.on_failure(self.failure)

    def _turn(self) -> bool:
        """One turn of the loop (the module's docstring); False when there was nothing to do."""
        self._drop_cancelled()
        worked = False
        # Prefills first: every waiting prompt that fits is prefilled before the next decode step (a decode step
        # between two prefills would delay the second's first token by a step), except that a long prompt's chunks
        # alternate with decode steps.
        while self._prefill_some():
            worked = True
            if self._prefill is not None or not self._waiting:
                break
        if self._running:
            self._decode()
            worked = True
        return worked

    def _context(self, batch: int):
        return self.generator.sharding_context(batch)

    @contextlib.contextmanager
    def _device_call(self, requests: Sequence[Request], what: str, decode: bool = False):
        """Runs device work for `requests` (its results made ready inside the block, where an error at run time
        shows). An exception fails them (kind "step"), and, if the slots' buffers went with the failed call, every
        running request too and the slots are made anew; then raises `_StepFailed`. Raises `_EngineFailure` when
        that cannot be done, or when the decode step has failed `MAX_STEP_FAILURES` times in a row."""
        try:
            yield
        except Exception as e:
            log.exception(f"{what} failed")
            message = f"{what} failed: {type(e).__name__}: {one_line(e)}"
            for request in list(requests):
                self._fail(request, message, "step")
            self._make_slots_sound(message)
            if decode:
                self._step_failures += 1
                if self._step_failures >= MAX_STEP_FAILURES:
                    raise _EngineFailure(f"{MAX_STEP_FAILURES} decode steps failed in a row; the last: "
                                         f"{message}") from None
            raise _StepFailed from None
        if decode:
            self._step_failures = 0

    def _make_slots_sound(self, message: str) -> None:
        """After a failed device call: if it took the slots' buffers with it (each step donates them), fails
        every running request and makes the slots anew."""
        buffers = jax.tree.leaves((self._slots, self._seen, self._drafts))
        if not any(buffer.is_deleted() for buffer in buffers):
            return
        for request in self._running_requests():
            self._fail(request, message, "step")
        try:
            self._new_slots()
        except Exception as e:
            raise _EngineFailure(f"the slots could not be made anew after {message} "
                                 f"({type(e).__name__}: {one_line(e)})") from None
        log.warning("the slots were made anew")

    def _running_requests(self) -> list[Request]:
        return list({id(s.request): s.request for s in self._running.values()}.values())

    def _emit(self, request: Request, event: Event) -> None:
        """Hands a request an event (none after its `Failed`); a callback that raises cancels its request."""
        if request.failed and not isinstance(event, Failed):
            return
        request.finished += isinstance(event, Finished)
        try:
            request.on_event(event)
        except Exception:
            log.exception("a request's event callback failed: the request is cancelled")
            request.failed = True  # the callback is not called again
            request.cancel()

    def _fail(self, request: Request, message: str, kind: str) -> None:
        """Ends a request with `Failed` (once, and not after all its choices have finished): out of the queue, its
        slots freed."""
        if request.failed or request.finished >= request.n:
            return
        request.failed = True
        with self._lock:
            with contextlib.suppress(ValueError):
                self._waiting.remove(request)
        for seq in [s for s in self._running.values() if s.request is request]:
            self._release(seq)
        if self.metrics:
            self.metrics.failed_requests.labels(kind).inc()
        self._emit(request, Failed(message, kind))

    def _request_failed(self, request: Request, error: Exception) -> None:
        """A request's own host work raised: it fails alone."""
        log.exception("a request failed")
        self._fail(request, f"an internal error while running this request: {type(error).__name__}: "
                            f"{one_line(error)}", "request")

    def _close(self, reason: str) -> None:
        """Takes no more requests and fails every one not finished (`reason` says why)."""
        with self._lock:
            self._closed = True
            requests = list(self._waiting)
        prefill, self._prefill = self._prefill, None
        requests += (prefill.requests if prefill else []) + self._running_requests()
        for request in requests:
            self._fail(request, reason, "engine")

    def _drop_cancelled(self) -> None:
        with self._lock:
            dropped = [r for r in self._waiting if r.cancelled.is_set()]
            for request in dropped:
                self._waiting.remove(request)
        for request in dropped:
            for choice in range(request.n):
                self._emit(request, Finished(choice, "cancelled"))
        for seq in [s for s in self._running.values() if s.request.cancelled.is_set()]:
            self._finish(seq, "cancelled")

    # -- prefill --------------------------------------------------------------------------------------------------

    def _prefill_some(self) -> bool:
        """Runs one prefill chunk, of the prefill under way or of new requests; False when there was none."""
        if self._prefill is None:
            group = self._take_group()
            if not group:
                return False
            longest = max(len(r.prompt_ids) for r in group)
            padded = bucket(longest) if longest <= self.chunk else -(-longest // self.chunk) * self.chunk
            rows = bucket(len(group), 1)
            ids_bs, mask_bs = left_pad([r.prompt_ids for r in group] + [[self.pad]] * (rows - len(group)), padded,
                                       self.pad)
            next_ids_bs = np.concatenate([ids_bs[:, 1:], ids_bs[:, :1]], axis=1)
            self._prefill = _Prefill(group, ids_bs, mask_bs, None, next_ids_bs)
        prefill = self._prefill
        try:
            with self._device_call(prefill.requests, "a prefill"):
                self._prefill_chunk(prefill)
        except _StepFailed:
            self._prefill = None
            raise
        if prefill.done == prefill.ids_bs.shape[1]:
            self._prefill = None
            self._start(prefill)
        return True

    def _take_group(self) -> list[Request]:
        """The waiting requests to prefill next, in order: as many as the free slots take (a request needs one
        per choice; one that only scores its prompt needs none) within the prefill token budget; a prompt longer
        than a chunk goes alone."""
        group: list[Request] = []
        free = len(self._free)
        nothing_to_do = []
        with self._lock:
            while self._waiting:
                request = self._waiting[0]
                if request.max_tokens == 0 and request.prompt_logprobs is None:  # nothing to compute
                    nothing_to_do.append(self._waiting.popleft())
                    continue
                need = request.n if request.max_tokens > 0 else 0
                length = len(request.prompt_ids)
                size = bucket(max([length] + [len(r.prompt_ids) for r in group]))
                long = length > self.chunk
                if need > free or (group and (long or size * bucket(len(group) + 1, 1) > self.prefill_tokens)):
                    break
                self._waiting.popleft()
                group.append(request)
                free -= need
                if long:
                    break
        for request in nothing_to_do:
            for choice in range(request.n):
                self._emit(request, Finished(choice, "length"))
        return group

    def _prefill_chunk(self, prefill: _Prefill) -> None:
        """The prefill's next chunk (its caches made at the first), its results ready."""
        start = prefill.done
        rows, padded = prefill.ids_bs.shape
        width = min(self.chunk, padded - start)
        scored = any(r.prompt_logprobs is not None for r in prefill.requests)
        stop = start + width
        with self._context(rows):
            if prefill.cache is None:
                prefill.cache = device.new_prefill_cache(self.model, rows, padded)
                prefill.draft_cache = self._new_draft_prefill(rows, padded)
            prefill.cache, prefill.last_logits, *chunk_scores = device.prefill_chunk(
                self.model, self.params, prefill.cache, prefill.ids_bs[:, start:stop],
                prefill.mask_bs[:, start:stop], prefill.next_ids_bs[:, start:stop], scored)
            prefill.draft_cache = self._draft_prefill(prefill.draft_cache, prefill.ids_bs[:, start:stop],
                                                      prefill.mask_bs[:, start:stop])
        if scored:
            prefill.scored.append([np.asarray(x) for x in chunk_scores])
        jax.block_until_ready((prefill.cache, prefill.last_logits, prefill.draft_cache))
        prefill.done = stop

    def _start(self, prefill: _Prefill) -> None:
        """Reports prompt scores, puts each choice of the prefilled requests into a free slot and makes its first
        token."""
        padded = prefill.ids_bs.shape[1]
        if prefill.scored:
            next_bs, top_ids_bsk, top_lp_bsk = (np.concatenate(parts, axis=1) for parts in zip(*prefill.scored))
        seqs: list[_Sequence] = []
        rows: list[int] = []
        for row, request in enumerate(prefill.requests):
            if request.failed:
                continue
            length = len(request.prompt_ids)
            try:
                if request.prompt_logprobs is not None:
                    first = padded - length  # position of the first prompt token; position j scores token j + 1
                    n_top = request.prompt_logprobs
                    self._emit(request, PromptScored(
                        [None] + [float(x) for x in next_bs[row, first:padded - 1]],
                        [[]] + [list(zip(top_ids_bsk[row, j, :n_top].tolist(), top_lp_bsk[row, j, :n_top].tolist()))
                                for j in range(first, padded - 1)]))
                if self.metrics:
                    self.metrics.prompt_tokens.inc(length)
                if request.max_tokens == 0:
                    for choice in range(request.n):
                        self._emit(request, Finished(choice, "length"))
                    continue
                made = [(_key_data(request.sampling, choice), self._text_stream()) for choice in range(request.n)]
            except Exception as e:
                self._request_failed(request, e)
                continue
            for choice, (key_data, stream) in enumerate(made):
                slot = heapq.heappop(self._free)
                seq = _Sequence(request, choice, slot, key_data, stream)
                self._running[slot] = seq  # from here a failure frees its slot
                with self._device_call(prefill.requests, "putting a prompt into its slot"), \
                        self._context(self.max_slots):
                    self._slots, self._seen = device.insert(self._slots, self._seen, prefill.cache, prefill.ids_bs,
                                                            np.int32(row), np.int32(slot), np.int32(length))
                    self._insert_draft(prefill.draft_cache, prefill.ids_bs, row, slot, length)
                seqs.append(seq)
                rows.append(row)
        while True:  # again without a request whose settings could not be read (it failed, its slots freed)
            kept = [(seq, row) for seq, row in zip(seqs, rows) if self._running.get(seq.slot) is seq]
            if not kept:
                return
            seqs, rows = (list(x) for x in zip(*kept))
            # Padded to a bucket by repeating the last choice: a compiled shape per bucket, not per count.
            padded = [*seqs, *[seqs[-1]] * (bucket(len(seqs), 1) - len(seqs))]
            sampling, features, read = self._row_sampling(padded)
            if None not in read:
                break
        rows += [rows[-1]] * (len(padded) - len(seqs))
        slots = np.asarray([s.slot for s in padded], np.int32)
        with self._device_call(prefill.requests, "the first tokens"), self._context(len(padded)):
            choice = device.first_tokens(self.model.resolved_kernels, prefill.last_logits, np.asarray(rows),
                                         self._seen, slots, sampling, features, _wants_top_logprobs(padded))
            if features.penalty:
                self._seen = device.mark_tokens(self._seen, slots, choice.token)
            choice = jax.device_get(choice)
        self._deliver(seqs, choice)

    # -- decode ---------------------------------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = min(self.max_slots, bucket(max(self._running) + 1, 1))
        sampling, features, seqs = self._row_sampling([self._running.get(slot) for slot in range(rows)])
        busy = [s for s in seqs if s is not None]
        if not busy:  # every running request failed while its settings were read
            return
        token_b = np.asarray([s.last_token if s else self.pad for s in seqs], np.int32)
        with self._device_call(self._running_requests(), "a decode step", decode=True):
            choice = jax.device_get(self._step(token_b, sampling, features, _wants_top_logprobs(seqs)))
        index = np.asarray([s.slot for s in busy])
        if self.speculation is None:
            self._deliver(busy, device.Choice(*(None if x is None else x[index] for x in choice)))
            return
        # A round: each slot's made tokens in order, the j-th of every slot that made that many and still runs.
        token, count, logprob, top_ids, top_lp = (None if x is None else x[index] for x in choice)
        if self.metrics:
            self.metrics.speculative_step(len(busy) * self.speculation.draft_tokens, count.tolist())
        for j in range(int(count.max())):
            live = [i for i, seq in enumerate(busy) if count[i] > j and self._running.get(seq.slot) is seq]
            if not live:
                break
            self._deliver([busy[i] for i in live], device.Choice(
                token[live, j], logprob[live, j], None if top_ids is None else top_ids[live, j],
                None if top_lp is None else top_lp[live, j]))

    def _step(self, token_b: np.ndarray, sampling: RowSampling, features: Features, top_logprobs: bool):
        """One decode step of the first len(token_b) slots (a `device.Choice`), or with speculative decoding one
        round (a `device.RoundChoice`)."""
        with self._context(len(token_b)):
            if self.speculation is None:
                self._slots, self._seen, choice = device.decode_step(self.model, self.params, self._slots, self._seen,
                                                                     token_b, sampling, features, top_logprobs)
            else:
                self._slots, self._drafts, self._seen, choice = device.speculative_step(
                    self.model, self.params, self._draft_params, self._slots, self._drafts, self._seen, token_b,
                    sampling, features, top_logprobs, self.speculation)
        return choice

    def _new_draft_prefill(self, rows: int, length: int):
        """The draft model's prefill cache (speculative decoding with a draft), else None."""
        if self._draft is None:
            return None
        return device.new_prefill_cache(self._draft.model, rows, length)

    def _draft_prefill(self, draft_cache, ids_bc: np.ndarray, mask_bc: np.ndarray):
        """A prefill chunk through the draft model too (its logits unused), when there is one."""
        if draft_cache is None:
            return None
        draft_cache, *_ = device.prefill_chunk(self._draft.model, self._draft_params, draft_cache, ids_bc, mask_bc,
                                               ids_bc, False)
        return draft_cache

    def _insert_draft(self, draft_cache, ids_bs: np.ndarray, row: int, slot: int, length: int) -> None:
        """Speculative decoding: the slot's draft cache row, or its context for prompt lookup."""
        if self.speculation is not None:
            self._drafts = device.insert_draft(self._drafts, draft_cache, ids_bs, np.int32(row), np.int32(slot),
                                               np.int32(length))

    def _text_stream(self):
        return self.generator.tokenizer.stream() if self.generator.tokenizer else None

    def _row_sampling(self, seqs: Sequence[_Sequence | None],
                      ) -> tuple[RowSampling, Features, list[_Sequence | None]]:
        """The per-row settings of these sequences (None: an idle row, greedy), what they need, and the sequences
        (those whose settings could not be read are failed, and idle rows here)."""
        idle = (0.0, 0, 1.0, 1.0, np.zeros(2, np.uint32), 0)
        values, kept = [], []
        for seq in seqs:
            row = idle
            if seq is not None:
                try:
                    p = seq.request.sampling
                    # np.int32 raises for a setting an int32 cannot hold: the request's fault, it fails alone.
                    row = (float(p.temperature), np.int32(p.top_k), float(p.top_p), float(p.repetition_penalty),
                           np.asarray(seq.key_data, np.uint32).reshape(2), np.int32(seq.made))
                except Exception as e:
                    self._request_failed(seq.request, e)
                    seq = None
            values.append(row)
            kept.append(seq)
        temperature, top_k, top_p, penalty, key_data, made = zip(*values)
        rows = RowSampling(np.asarray(temperature, np.float32), np.asarray(top_k, np.int32),
                           np.asarray(top_p, np.float32), np.asarray(penalty, np.float32), np.stack(key_data),
                           np.asarray(made, np.int32))
        live = [seq.request.sampling for seq in kept if seq is not None]
        sampled = [p for p in live if p.temperature > 0]
        features = Features(
            sample=bool(sampled),
            top_k=any(p.top_k > 0 for p in sampled),
            top_p=any(p.top_p < 1.0 for p in sampled),
            penalty=any(p.repetition_penalty != 1.0 for p in live))
        return rows, features, kept

    def _deliver(self, seqs: list[_Sequence], choice: device.Choice) -> None:
        """Hands each sequence its new token and ends those that are done; a sequence whose text handling raises
        fails its request alone."""
        now = time.monotonic()
        tokens = np.asarray(choice.token).tolist()
        logprobs = np.asarray(choice.logprob).tolist()
        top_ids, top_logprobs = (None, None) if choice.top_ids is None else (
            np.asarray(choice.top_ids).tolist(), np.asarray(choice.top_logprobs).tolist())
        for i, seq in enumerate(seqs):
            if self._running.get(seq.slot) is not seq:  # its request failed meanwhile
                continue
            try:
                self._advance(seq, tokens[i], logprobs[i], top_ids and top_ids[i], top_logprobs and top_logprobs[i],
                              now)
            except Exception as e:
                self._request_failed(seq.request, e)

    def _advance(self, seq: _Sequence, token: int, logprob: float, top_ids: list[int] | None,
                 top_logprobs: list[float] | None, now: float) -> None:
        """One new token of a sequence: its text (held back while a stop string may be starting), its event, and
        its end."""
        request = seq.request
        if self.metrics:
            if seq.made == 0:
                self.metrics.time_to_first_token.observe(now - request.arrival)
            else:
                self.metrics.time_per_output_token.observe(now - seq.last_time)
            self.metrics.generation_tokens.inc()
        seq.made += 1
        seq.last_token, seq.last_time = token, now
        top = None
        if request.logprobs:
            k = request.logprobs
            top = list(zip(top_ids[:k], top_logprobs[:k]))
        piece = seq.stream.push(token) if seq.stream else ""
        seq.text += piece
        ended = token in self.eos and not request.ignore_eos
        stop_at = _find_stop(seq.text, request.stop, seq.emitted) if request.stop else -1
        if stop_at >= 0:
            seq.text = seq.text[:stop_at]
        elif ended and seq.stream is not None:
            seq.text += seq.stream.flush()
        send_to = len(seq.text) if ended or stop_at >= 0 else len(seq.text) - _held(seq.text, request.stop)
        text, seq.emitted = seq.text[seq.emitted:send_to], max(seq.emitted, send_to)
        self._emit(request, Token(seq.choice, token, text, logprob if request.logprobs is not None else None, top))
        if ended or stop_at >= 0:
            self._finish(seq, "stop")
        elif seq.made >= request.max_tokens:
            self._finish(seq, "length")

    def _release(self, seq: _Sequence) -> None:
        """Frees a sequence's slot."""
        del self._running[seq.slot]
        heapq.heappush(self._free, seq.slot)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        rest = ""
        if reason == "length":
            if seq.stream is not None:
                seq.text += seq.stream.flush()
            rest = seq.text[seq.emitted:]
        self._release(seq)
        if self.metrics and reason != "cancelled":
            self.metrics.request_duration.observe(time.monotonic() - seq.request.arrival)
        self._emit(seq.request, Finished(seq.choice, reason, rest))


class _StepFailed(Exception):
    """A device call failed and its requests were failed; the engine goes on."""


class _EngineFailure(Exception):
    """The engine cannot go on."""


def _wants_top_logprobs(seqs: Sequence[_Sequence | None]) -> bool:
    """Whether a step must return the best alternatives: a sequence asked for them."""
    return any(s is not None and bool(s.request.logprobs) for s in seqs)


def _key_data(sampling: SamplingParams, choice: int) -> np.ndarray:
    """The sampling key of a request's choice: its seed (any 64-bit integer, `bloom_jax.sampling.seed_key`; None: a
    fresh one) folded with the choice's index; zeros for a greedy request, which draws nothing (no JAX call per
    request on the way to its first token)."""
    if sampling.temperature == 0.0:
        return np.zeros(2, np.uint32)
    seed = secrets.randbits(64) if sampling.seed is None else sampling.seed
    return np.asarray(jax.random.key_data(jax.random.fold_in(seed_key(seed), choice)), np.uint32)


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int:
    """Where the first stop string starts in `text` (searching from just before what was already sent), or -1."""
    longest = max(len(s) for s in stops)
    found = [i for s in stops if (i := text.find(s, max(0, emitted - longest + 1))) >= 0]
    return min(found, default=-1)


def _held(text: str, stops: Sequence[str]) -> int:
    """How many of `text`'s last characters could begin a stop string (held back until it is settled)."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


__all__ = ["Engine", "Request", "SamplingParams", "Event", "PromptScored", "Token", "Finished", "Failed",
           "QueueFull", "EngineStopped"]
