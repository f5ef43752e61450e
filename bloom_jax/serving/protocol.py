"""OpenAI's completions and chat completions protocol: request bodies checked field by field into `Params`, and
the response bodies and stream chunks built from the engine's results.

A mistake in a request is an `ApiError`: a 4xx status with OpenAI's error body (`{"error": {"message", "type",
"param", "code"}}`), the message one line naming the field. Every field has a bound (`Limits`, the table in
docs/serve.md), checked here before anything reaches the engine: a request that passes cannot make the engine do
more than one request of the server's limits does. Fields OpenAI defines that a local model cannot honour
(`logit_bias`, `suffix`, presence and frequency penalties) are refused when set, not ignored; unknown fields are
ignored, as OpenAI's own clients send extras (`extra_body`). bloom-jax's extras: `top_k`, `repetition_penalty`,
`ignore_eos`.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from bloom_jax.serving.engine import SamplingParams

INT64 = 2**63
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256  # each stop string's length: the engine looks for each one's prefixes after every token
MAX_LOGPROBS = 5  # alternatives per token in completions (OpenAI's limit; chat allows TOP_LOGPROBS)
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs` (OpenAI's limit)
MAX_MESSAGES = 1024  # a chat's messages
MAX_MODEL_CHARS = 256  # the `model` field


class ApiError(Exception):
    """A request the server refuses: `status` with OpenAI's error body; `headers` (Retry-After) when given."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """A checked request: its prompts as token ids (and text, when given as text), and how to complete them."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str | None]
    max_tokens: int
    sampling: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False
    ignore_eos: bool = False


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server can run: its model's name, vocabulary, length limit (prompt plus new tokens) and slots,
    the prompts one request may hold, and the most bytes one token's text has (so that a text that must be too long
    is refused without tokenizing it)."""

    model: str
    vocab_size: int
    max_length: int
    max_slots: int
    max_prompts: int = 64
    max_token_bytes: int = 64

    @property
    def max_text_bytes(self) -> int:
        """The UTF-8 bytes of the longest text that may still be `max_length` tokens or fewer."""
        return self.max_length * self.max_token_bytes


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
          dict: "an object"}


def field(body: dict, name: str, kind: type, default: Any = None, check: Callable[[Any], bool] | None = None,
          must: str = "") -> Any:
    """`body[name]` as `kind` (null or absent: `default`), or a 400 naming the field: of the wrong type, or failing
    `check` (`must` says what it must be)."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind in (int, float))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ApiError(400, f"'{name}' must be {_KINDS[kind]}, got {_show(value)}", name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {must}, got {_show(value)}", name)
    return value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_model(body: dict, limits: Limits) -> None:
    model = field(body, "model", str, limits.model, lambda m: len(m) <= MAX_MODEL_CHARS,
                  f"at most {MAX_MODEL_CHARS} characters")
    if model != limits.model:
        raise ApiError(404, f"the model '{model}' does not exist: this server serves '{limits.model}'", "model",
                       code="model_not_found")


def _unsupported(body: dict) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, float, 0.0) != 0.0:
            raise ApiError(400, f"'{name}' is not supported (use 'repetition_penalty', as transformers has it)", name)
    if field(body, "logit_bias", dict, {}):
        raise ApiError(400, "'logit_bias' is not supported", "logit_bias")


def _sampling(body: dict, limits: Limits) -> SamplingParams:
    top_k = field(body, "top_k", int, 0, lambda k: -1 <= k <= limits.vocab_size,
                  f"-1 or 0 (all tokens) or at most the vocabulary, {limits.vocab_size}")
    return SamplingParams(
        temperature=field(body, "temperature", float, 1.0, lambda t: 0 <= t <= 100, "between 0 and 100"),
        top_k=max(top_k, 0),
        top_p=field(body, "top_p", float, 1.0, lambda p: 0 < p <= 1, "in (0, 1]"),
        repetition_penalty=field(body, "repetition_penalty", float, 1.0, lambda r: 0 < r <= 100,
                                 "in (0, 100] (1: none)"),
        seed=field(body, "seed", int, None, lambda s: -INT64 <= s < 2 * INT64,
                   "a 64-bit integer, signed or unsigned"))


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return ()
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"'stop' must be a string of 1 to {MAX_STOP_CHARS} characters or up to "
                            f"{MAX_STOP_STRINGS} of them, got {_show(stop)}", "stop")
    for s in stops:
        _utf8(s, "stop")
    return tuple(stops)


def _utf8(text: str, param: str) -> None:
    """A 400 for a string that is not Unicode text (a lone surrogate escape such as \\ud800, which JSON allows)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode text (it holds a lone surrogate)", param) from None


def _common(body: dict, limits: Limits) -> dict:
    check_model(body, limits)
    _unsupported(body)
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    if options and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    include_usage = field(options, "include_usage", bool, False) if options else False
    n = field(body, "n", int, 1, lambda n: 1 <= n <= limits.max_slots, f"between 1 and {limits.max_slots}")
    return dict(n=n, stream=stream, include_usage=include_usage, stop=_stop(body), sampling=_sampling(body, limits),
                ignore_eos=field(body, "ignore_eos", bool, False))


def _check_length(prompt_ids: list[list[int]], max_tokens: int, limits: Limits, param: str) -> None:
    for ids in prompt_ids:
        if not ids:
            raise ApiError(400, f"a prompt is empty: it has no tokens ('{param}')", param)
        if len(ids) + max_tokens > limits.max_length:
            raise ApiError(400, f"this server's length limit is {limits.max_length} tokens; you asked for "
                                f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to complete)",
                           "max_tokens" if len(ids) < limits.max_length else param, code="context_length_exceeded")


def completion_params(body: dict, limits: Limits, encode: Callable[[list[str]], list[list[int]]]) -> Params:
    """A /v1/completions body, checked; `encode` tokenizes its text prompts (all at once), after every bound that
    can be checked without it has been."""
    common = _common(body, limits)
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", "prompt")
    prompts = body["prompt"]
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and _is_ids(prompts)):
        prompts = [prompts]
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "'prompt' must be a string, an array of strings, an array of token ids or an array of "
                            f"those, got {_show(body['prompt'])}", "prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"'prompt' holds {len(prompts)} prompts: this server takes at most "
                            f"{limits.max_prompts} in one request", "prompt")
    for prompt in prompts:
        if isinstance(prompt, str):
            _check_text(prompt, limits, "prompt")
        elif isinstance(prompt, list) and _is_ids(prompt):
            if len(prompt) > limits.max_length:
                raise _too_long(limits, len(prompt), "prompt")
            if not all(0 <= t < limits.vocab_size for t in prompt):
                raise ApiError(400, f"'prompt' token ids must be in [0, {limits.vocab_size})", "prompt")
        else:
            raise ApiError(400, f"each 'prompt' must be a string or an array of token ids, got {_show(prompt)}",
                           "prompt")
    max_tokens = field(body, "max_tokens", int, 16, lambda m: 0 <= m <= limits.max_length,
                       f"between 0 and the length limit, {limits.max_length}")
    logprobs = field(body, "logprobs", int, None, lambda k: 0 <= k <= MAX_LOGPROBS, f"between 0 and {MAX_LOGPROBS}")
    echo = field(body, "echo", bool, False)
    if field(body, "suffix", str, None):
        raise ApiError(400, "'suffix' is not supported", "suffix")
    best_of = field(body, "best_of", int, None)
    if best_of is not None and best_of != common["n"]:
        raise ApiError(400, "'best_of' is not supported beyond 'n'", "best_of")
    if max_tokens == 0 and not echo:
        raise ApiError(400, "'max_tokens' is 0: nothing to do without 'echo'", "max_tokens")
    texts = [p if isinstance(p, str) else None for p in prompts]
    encoded = iter(encode([t for t in texts if t is not None]) if any(t is not None for t in texts) else [])
    ids = [next(encoded) if t is not None else list(p) for p, t in zip(prompts, texts)]
    _check_length(ids, max_tokens, limits, "prompt")
    return Params(ids, texts, max_tokens, logprobs=logprobs, echo=echo, **common)


def _check_text(text: str, limits: Limits, param: str) -> None:
    """Refuses a text that is not Unicode, or that has too many bytes to be `max_length` tokens or fewer (before
    tokenizing it: a text of many megabytes takes the tokenizer seconds)."""
    _utf8(text, param)
    if len(text) > limits.max_text_bytes or len(text.encode()) > limits.max_text_bytes:
        raise ApiError(400, f"a text of {len(text.encode())} bytes is more than this server's length limit of "
                            f"{limits.max_length} tokens can hold ({limits.max_text_bytes} bytes at most)", param,
                       code="context_length_exceeded")


def _too_long(limits: Limits, tokens: int, param: str) -> ApiError:
    return ApiError(400, f"this server's length limit is {limits.max_length} tokens; a prompt has {tokens}", param,
                    code="context_length_exceeded")


def _is_ids(value: list) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


ROLES = ("system", "user", "assistant", "tool", "developer")


def chat_messages(body: dict) -> list[dict]:
    """The `messages` of a chat body, each {role, content (text)}; parts of type text are joined."""
    messages = field(body, "messages", list, None)
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty array", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' holds {len(messages)} messages: this server takes at most {MAX_MESSAGES}",
                       "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a 'role' of {', '.join(ROLES)}", "messages")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content parts must be text parts ({{'type': 'text', "
                                    "'text': ...}): this model reads text only", "messages")
            content = "".join(p["text"] for p in content)
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts", "messages")
        out.append({**message, "content": content or ""})
    return out


def chat_prompt(prompt: str, limits: Limits, encode: Callable[[list[str]], list[list[int]]]) -> list[int]:
    """A rendered chat's token ids, the text checked first as a completion's prompt is."""
    _check_text(prompt, limits, "messages")
    return encode([prompt])[0]


def chat_params(body: dict, limits: Limits, prompt_ids: list[int], prompt: str) -> Params:
    """A /v1/chat/completions body, checked, its messages already rendered into `prompt` (and its ids)."""
    common = _common(body, limits)
    budget = max(limits.max_length - len(prompt_ids), 0)
    must = f"between 1 and the length limit, {limits.max_length}"
    max_tokens = field(body, "max_completion_tokens", int, None, lambda m: 1 <= m <= limits.max_length, must)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, budget, lambda m: 1 <= m <= limits.max_length, must)
    logprobs = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int, None, lambda k: 0 <= k <= MAX_TOP_LOGPROBS,
                f"between 0 and {MAX_TOP_LOGPROBS}")
    if top is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    _check_length([prompt_ids], max(max_tokens, 1), limits, "messages")
    return Params([prompt_ids], [prompt], max_tokens, logprobs=(top or 0) if logprobs else None, **common)


# -- responses -------------------------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float | None],
                        tops: Sequence[dict[str, float] | None], offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: each token, its log-probability, its best alternatives
    ({token: logprob}, None for a prompt's first token) and where its text starts in the choice's text (from
    `offset`)."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {"tokens": list(tokens), "token_logprobs": list(logprobs), "top_logprobs": list(tops),
            "text_offset": offsets}


def chat_logprobs(tokens: Sequence[str], logprobs: Sequence[float],
                  tops: Sequence[Sequence[tuple[str, float]]]) -> dict:
    """The chat `logprobs` object: `content`, one entry per token with its bytes and best alternatives."""
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top]}
                        for t, lp, top in zip(tokens, logprobs, tops)]}


def envelope(kind: str, request_id: str, model: str, choices: list, created: int | None = None,
             usage_: dict | None = None) -> dict:
    """A response or stream chunk of `kind` (text_completion, chat.completion, chat.completion.chunk)."""
    body = {"id": request_id, "object": kind, "created": int(time.time()) if created is None else created,
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


__all__ = ["ApiError", "Params", "Limits", "field", "check_model", "completion_params", "chat_messages",
           "chat_prompt", "chat_params", "new_id", "usage", "completion_logprobs", "chat_logprobs", "envelope"]
