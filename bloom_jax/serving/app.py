"""The OpenAI-compatible HTTP server: Starlette routes over an `Engine`, run by uvicorn.

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with `stream`),
`GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus). With an API key, every route but `/health` wants
`Authorization: Bearer KEY`. Every refusal is a 4xx with OpenAI's error body; a full queue is a 429 with
`Retry-After`. A request the engine fails is a 500 (its own work raised) or a 503 with `Retry-After` (a device call
it was in failed, or the engine stopped); in a stream, whose status is sent, an error event ends it.

The routes run on the web server's event loop and only queue work. A body is read in pieces up to
`MAX_BODY_BYTES` (a larger `Content-Length` is refused unread), then parsed, checked and tokenized on a small thread
pool, so that a large body never holds up the other streams. The engine's thread calls back with each event
(`loop.call_soon_threadsafe`), and a client that goes away (a closed stream, or a dropped connection while it waits
for a whole response) cancels its requests, which frees their slots at the engine's next turn.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable

from bloom_jax.errors import BloomJaxError, RunFailed, one_line
from bloom_jax.serving import protocol
from bloom_jax.chat import ChatTemplate
from bloom_jax.serving.engine import (
    Engine,
    EngineStopped,
    Failed,
    Finished,
    PromptScored,
    QueueFull,
    Request,
    Token,
)
from bloom_jax.serving.metrics import Metrics
from bloom_jax.serving.protocol import ApiError, Params

log = logging.getLogger("bloom_jax.serving")

MAX_BODY_BYTES = 8 << 20  # a request body beyond this is refused (413): prompts of a 2048-token model fit 100x over
BODY_TIMEOUT_S = 60  # a body still arriving after this is refused (408): a slow sender holds no connection forever
RETRY_AFTER_S = 1
PREPARE_THREADS = 2  # bodies parsed, checked and tokenized at once, off the event loop


class _Choice:
    """What one choice has made so far (for a whole response, or a chat stream's bookkeeping)."""

    def __init__(self):
        self.ids: list[int] = []
        self.text: list[str] = []
        self.logprobs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []
        self.finish_reason: str | None = None


class _Run:
    """A request's prompts submitted to the engine, and their events in order on the web loop."""

    def __init__(self, engine: Engine, params: Params):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.params = params
        self.requests: list[Request] = []
        for i, ids in enumerate(params.prompt_ids):
            def on_event(event, i=i):
                with contextlib.suppress(RuntimeError):  # the web loop is closed: the server is shutting down
                    loop.call_soon_threadsafe(self.events.put_nowait, (i, event))

            wants_prompt = params.echo and params.logprobs is not None
            self.requests.append(Request(ids, params.max_tokens, on_event, params.sampling, params.n, params.stop,
                                         params.logprobs, params.logprobs if wants_prompt else None,
                                         params.ignore_eos))
        try:
            for request in self.requests:
                engine.submit(request)
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"{e}; retry later", type="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except EngineStopped as e:
            self.cancel()
            raise ApiError(503, str(e), type="server_error", code="engine_stopped",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except BaseException:  # a request the engine refuses (a bug in the checks): none of the others runs
            self.cancel()
            raise

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def __aiter__(self) -> AsyncIterator[tuple[int, object]]:
        """(choice index, event) until every choice has finished. A failed request raises `ApiError` (500 for a
        fault of its own, 503 otherwise: `_failure`) after cancelling the run's other prompts."""
        left = len(self.requests) * self.params.n
        while left:
            prompt, event = await self.events.get()
            if isinstance(event, Failed):
                self.cancel()
                raise _failure(event)
            index = prompt * self.params.n + (0 if isinstance(event, PromptScored) else event.choice)
            yield index, event
            left -= isinstance(event, Finished)


def _failure(event: Failed) -> ApiError:
    """The HTTP error of a request the engine failed."""
    if event.kind == "request":
        return ApiError(500, event.message, type="server_error", code="request_failed")
    return ApiError(503, event.message, type="server_error",
                    code="step_failed" if event.kind == "step" else "engine_stopped",
                    headers={"Retry-After": str(RETRY_AFTER_S)})


def _parse_json(body: bytes) -> dict:
    """A request body as a JSON object, or a 400."""
    try:
        parsed = json.loads(body)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer past Python's 4300 digits
        why = "an integer has over 4300 digits" if "digits" in str(e) else one_line(e)
        raise ApiError(400, f"the request body is not valid JSON: {why}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return parsed


class Server:
    """The routes of one served model. `api_key` None: no key asked; `max_prompts`: prompts one completions
    request may hold."""

    def __init__(self, engine: Engine, model_name: str, chat_template: ChatTemplate | None = None,
                 api_key: str | None = None, max_prompts: int = 64):
        tokenizer = engine.generator.tokenizer
        if tokenizer is None:
            raise BloomJaxError("the checkpoint has no tokenizer.json: the server needs one to read and write text")
        self.engine, self.tokenizer, self.chat_template, self.api_key = engine, tokenizer, chat_template, api_key
        longest_token = max(len(token.encode()) for token in tokenizer.tokenizer.get_vocab(with_added_tokens=True))
        self.limits = protocol.Limits(model_name, engine.model.config.vocab_size, engine.max_length,
                                      engine.max_slots, min(max_prompts, engine.max_queue), longest_token)
        self._prepare = concurrent.futures.ThreadPoolExecutor(PREPARE_THREADS, "bloom-jax-prepare")
        self.metrics = engine.metrics or Metrics(lambda: engine.queue_depth, lambda: engine.busy_slots,
                                                 engine.max_slots,
                                                 engine.speculation.draft_tokens if engine.speculation else 0)
        engine.metrics = self.metrics
        self.started = int(time.time())

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/v1/completions", self._route(self.completions, "/v1/completions"), methods=["POST"]),
            Route("/v1/chat/completions", self._route(self.chat, "/v1/chat/completions"), methods=["POST"]),
            Route("/v1/models", self._route(self.models, "/v1/models"), methods=["GET"]),
            Route("/v1/models/{model:path}", self._route(self.model, "/v1/models"), methods=["GET"]),
            Route("/health", self._route(self.health, "/health", auth=False), methods=["GET"]),
            Route("/metrics", self._route(self.prometheus, "/metrics"), methods=["GET"]),
        ]
        handlers = {404: self._http_error, 405: self._http_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _route(self, handler, name: str, auth: bool = True):
        from starlette.responses import JSONResponse

        @functools.wraps(handler)
        async def route(request):
            from starlette.requests import ClientDisconnect
            from starlette.responses import Response

            try:
                if auth:
                    self._authorize(request)
                response = await handler(request)
            except ApiError as e:
                response = JSONResponse(e.body(), e.status, headers=e.headers)
            except ClientDisconnect:  # gone before its body was read: nobody to answer
                log.debug(f"{name}: the client went away while sending its request")
                response = Response(status_code=499)
            except Exception:
                log.exception(f"{name} failed")
                response = JSONResponse(ApiError(500, "internal error (see the server's log)",
                                                 type="server_error").body(), 500)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            return response

        return route

    def _authorize(self, request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           type="authentication_error", code="invalid_api_key")

    async def _http_error(self, request, exc):
        from starlette.responses import JSONResponse

        status = getattr(exc, "status_code", 404)
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        error = ApiError(status, message.get(status, str(exc)), code="not_found" if status == 404 else None)
        return JSONResponse(error.body(), status)

    async def _body(self, request) -> dict:
        """The body as a JSON object: read a piece at a time while it stays within `MAX_BODY_BYTES` (a declared
        larger one is refused unread) and `BODY_TIMEOUT_S`, parsed off the event loop."""
        too_big = ApiError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_big
        pieces, size = [], 0
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                async for piece in request.stream():
                    size += len(piece)
                    if size > MAX_BODY_BYTES:
                        raise too_big
                    pieces.append(piece)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S} s") from None
        return await self._off_loop(_parse_json, b"".join(pieces))

    async def _off_loop(self, function, *args):
        """`function(*args)` on the preparing threads (parsing, checking, rendering and tokenizing a body)."""
        return await asyncio.get_running_loop().run_in_executor(self._prepare, function, *args)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # encode_batch lets go of the GIL while it tokenizes (encode does not): the event loop runs meanwhile.
        return [e.ids for e in self.tokenizer.tokenizer.encode_batch(texts)]

    @functools.lru_cache(maxsize=1 << 16)
    def _token(self, token_id: int) -> str:
        """A token's own text, special tokens included (for log-probabilities)."""
        return self.tokenizer.tokenizer.decode([token_id], skip_special_tokens=False)

    def _named(self, pairs) -> list[tuple[str, float]]:
        return [(self._token(t), lp) for t, lp in pairs]

    def _prompt_tops(self, scored: PromptScored) -> list[dict | None]:
        """A scored prompt's alternatives per token by their text (None for the first, which has none)."""
        return [None] + [dict(self._named(t)) for t in scored.top[1:]]

    async def _collect(self, request, run: _Run, choices: int) -> tuple[list[_Choice], list]:
        """Every choice's tokens, and each prompt's scores, of a whole response; a client that disconnects while
        it waits cancels the run."""
        async def watch():
            while (await request.receive())["type"] != "http.disconnect":
                pass
            run.cancel()

        watcher = asyncio.create_task(watch())
        made = [_Choice() for _ in range(choices)]
        scores: list = [None] * len(run.requests)
        try:
            async for index, event in run:
                if isinstance(event, PromptScored):
                    scores[index // run.params.n] = event
                    continue
                choice = made[index]
                if isinstance(event, Token):
                    choice.ids.append(event.token_id)
                    choice.text.append(event.text)
                    if event.logprob is not None:
                        choice.logprobs.append(event.logprob)
                        choice.tops.append(event.top or [])
                else:
                    choice.text.append(event.text)
                    choice.finish_reason = event.reason
        finally:
            watcher.cancel()
        return made, scores

    def _sse(self, run: _Run, chunks: AsyncIterator[dict]):
        from starlette.responses import StreamingResponse

        async def events():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except ApiError as e:  # the request failed mid-stream: the status is sent, the error goes in the stream
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception:
                log.exception("a stream failed")
                error = ApiError(500, "internal error (see the server's log)", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            finally:
                run.cancel()  # the client went away (or all is done: then it changes nothing)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _prompt_text(self, params: Params, i: int) -> str:
        text = params.prompt_texts[i]
        return self.tokenizer.decode(params.prompt_ids[i]) if text is None else text

    # -- completions ----------------------------------------------------------------------------------------------

    async def completions(self, request):
        from starlette.responses import JSONResponse

        params = await self._off_loop(protocol.completion_params, await self._body(request), self.limits,
                                      self._encode)
        run = _Run(self.engine, params)
        request_id, created = protocol.new_id("cmpl"), int(time.time())
        if params.stream:
            return self._sse(run, self._completion_chunks(run, request_id, created))
        made, scores = await self._collect(request, run, len(params.prompt_ids) * params.n)
        choices = []
        for index, choice in enumerate(made):
            prompt = index // params.n
            text, logprobs = "".join(choice.text), None
            if params.echo:
                text = self._prompt_text(params, prompt) + text
            if params.logprobs is not None:
                logprobs = self._completion_logprobs(params, prompt, choice, scores[prompt])
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": choice.finish_reason})
        use = protocol.usage(sum(map(len, params.prompt_ids)), sum(len(c.ids) for c in made))
        return JSONResponse(protocol.envelope("text_completion", request_id, self.limits.model, choices, created,
                                              use))

    def _completion_logprobs(self, params: Params, prompt: int, choice: _Choice, scored: PromptScored | None,
                             ) -> dict:
        tokens = [self._token(t) for t in choice.ids]
        logprobs, tops = list(choice.logprobs), [dict(self._named(t)) for t in choice.tops]
        if params.echo and scored is not None:
            tokens = [self._token(t) for t in params.prompt_ids[prompt]] + tokens
            logprobs = scored.token_logprobs + logprobs
            tops = self._prompt_tops(scored) + tops
        return protocol.completion_logprobs(tokens, logprobs, tops)

    async def _completion_chunks(self, run: _Run, request_id: str, created: int) -> AsyncIterator[dict]:
        params = run.params

        def chunk(index, text, logprobs=None, finish=None):
            return protocol.envelope("text_completion", request_id, self.limits.model,
                                     [{"index": index, "text": text, "logprobs": logprobs,
                                       "finish_reason": finish}], created)

        made = 0
        if params.echo and params.logprobs is None:
            for index in range(len(params.prompt_ids) * params.n):
                yield chunk(index, self._prompt_text(params, index // params.n))
        async for index, event in run:
            if isinstance(event, PromptScored):  # echo with logprobs: the prompt, scored, for each of its choices
                prompt = index // params.n
                tokens = [self._token(t) for t in params.prompt_ids[prompt]]
                tops = self._prompt_tops(event)
                logprobs = protocol.completion_logprobs(tokens, event.token_logprobs, tops)
                for j in range(params.n):
                    yield chunk(prompt * params.n + j, self._prompt_text(params, prompt), logprobs)
            elif isinstance(event, Token):
                made += 1
                logprobs = None
                if event.logprob is not None:
                    logprobs = protocol.completion_logprobs([self._token(event.token_id)], [event.logprob],
                                                            [dict(self._named(event.top or []))])
                if event.text or logprobs:
                    yield chunk(index, event.text, logprobs)
            else:
                yield chunk(index, event.text, finish=event.reason)
        if params.include_usage:
            yield protocol.envelope("text_completion", request_id, self.limits.model, [], created,
                                    protocol.usage(sum(map(len, params.prompt_ids)), made))

    # -- chat -----------------------------------------------------------------------------------------------------

    async def chat(self, request):
        from starlette.responses import JSONResponse

        params = await self._off_loop(self._chat_params, await self._body(request))
        run = _Run(self.engine, params)
        request_id, created = protocol.new_id("chatcmpl"), int(time.time())
        if params.stream:
            return self._sse(run, self._chat_chunks(run, request_id, created))
        made, _ = await self._collect(request, run, params.n)
        choices = [{"index": index, "message": {"role": "assistant", "content": "".join(choice.text)},
                    "logprobs": self._chat_logprobs(choice) if params.logprobs is not None else None,
                    "finish_reason": choice.finish_reason} for index, choice in enumerate(made)]
        use = protocol.usage(len(params.prompt_ids[0]), sum(len(c.ids) for c in made))
        return JSONResponse(protocol.envelope("chat.completion", request_id, self.limits.model, choices, created,
                                              use))

    def _chat_params(self, body: dict) -> Params:
        """A chat body checked, its messages rendered by the template and tokenized."""
        protocol.check_model(body, self.limits)
        messages = protocol.chat_messages(body)
        if self.chat_template is None:
            raise ApiError(400, "this model has no chat template: start the server with --chat-template FILE, or "
                                "use /v1/completions", code="no_chat_template")
        try:
            prompt = self.chat_template.render(messages)
        except ValueError as e:  # the template refused them (raise_exception)
            raise ApiError(400, one_line(e), "messages") from None
        except Exception as e:  # a template that meets fields it did not expect (the messages are all that vary)
            raise ApiError(400, f"the chat template cannot render these messages: {type(e).__name__}: "
                                f"{one_line(e)}", "messages") from None
        return protocol.chat_params(body, self.limits, protocol.chat_prompt(prompt, self.limits, self._encode),
                                    prompt)

    def _chat_logprobs(self, choice: _Choice) -> dict:
        return protocol.chat_logprobs([self._token(t) for t in choice.ids], choice.logprobs,
                                      [self._named(t) for t in choice.tops])

    async def _chat_chunks(self, run: _Run, request_id: str, created: int) -> AsyncIterator[dict]:
        params = run.params

        def chunk(index, delta, logprobs=None, finish=None):
            return protocol.envelope("chat.completion.chunk", request_id, self.limits.model,
                                     [{"index": index, "delta": delta, "logprobs": logprobs,
                                       "finish_reason": finish}], created)

        for index in range(params.n):
            yield chunk(index, {"role": "assistant", "content": ""})
        made = 0
        async for index, event in run:
            if isinstance(event, Token):
                made += 1
                logprobs = None
                if event.logprob is not None:
                    logprobs = protocol.chat_logprobs([self._token(event.token_id)], [event.logprob],
                                                      [self._named(event.top or [])])
                if event.text or logprobs:
                    yield chunk(index, {"content": event.text}, logprobs)
            elif isinstance(event, Finished):
                yield chunk(index, {"content": event.text} if event.text else {}, finish=event.reason)
        if params.include_usage:
            yield protocol.envelope("chat.completion.chunk", request_id, self.limits.model, [], created,
                                    protocol.usage(len(params.prompt_ids[0]), made))

    # -- the rest -------------------------------------------------------------------------------------------------

    def _model_card(self) -> dict:
        return {"id": self.limits.model, "object": "model", "created": self.started, "owned_by": "bloom-jax",
                "max_model_len": self.limits.max_length}

    async def models(self, request):
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request):
        from starlette.responses import JSONResponse

        protocol.check_model({"model": request.path_params["model"]}, self.limits)
        return JSONResponse(self._model_card())

    async def health(self, request):
        from starlette.responses import JSONResponse

        if self.engine.alive:
            return JSONResponse({"status": "ok", "busy_slots": self.engine.busy_slots,
                                 "queue_depth": self.engine.queue_depth})
        return JSONResponse({"status": "failed", "error": self.engine.failure or "the engine is not running"}, 503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})

    async def prometheus(self, request):
        from starlette.responses import Response

        data, content_type = self.metrics.render()
        return Response(data, headers={"Content-Type": content_type})


class ServerThread:
    """Runs an app under uvicorn on a thread (for tests and notebooks): `with ServerThread(app) as url: ...`.
    Port 0 picks a free one."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                                    timeout_graceful_shutdown=5))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="bloom-jax-http", daemon=True)
        self.host = host

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def serve(server: Server, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None,
          log_level: str = "info") -> None:
    """Runs the server in this thread until SIGINT or SIGTERM, then stops its engine. If the engine stops for good
    (`Engine.on_failure`), the server shuts down too and this raises `RunFailed` (a non-zero exit, so that a
    supervisor restarts the process)."""
    import uvicorn

    # The engine thread wants the GIL back after each decode step; at Python's default 5 ms switch interval the web
    # thread kept it that long (1 streaming client, bloom-560m on 2 CPU cores: 90 ms per token, 73 ms at 0.5 ms).
    sys.setswitchinterval(0.0005)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    uv = uvicorn.Server(config)
    if on_ready is not None:
        startup = uv.startup

        async def announce(sockets=None):
            await startup(sockets)
            if uv.started:
                bound = uv.servers[0].sockets[0].getsockname()
                on_ready(f"http://{bound[0]}:{bound[1]}")

        uv.startup = announce

    def engine_failed(message: str) -> None:
        log.error(f"{message}: shutting down")
        uv.should_exit = True

    server.engine.on_failure = engine_failed
    try:
        if server.engine.failure is None:
            uv.run()
    finally:
        server.engine.stop()
    if server.engine.failure is not None:
        raise RunFailed(f"{server.engine.failure}; the server stopped")


__all__ = ["Server", "ServerThread", "serve"]
