"""A live `bloom-jax serve` under random and malformed requests (hypothesis), while a steady client keeps sending one
greedy request: every fuzz request gets a well-formed answer (a 4xx with OpenAI's error body, or a 200 whose body or
stream is whole), the steady client's tokens never change, the server logs no error, and afterwards it serves
correctly with no slot or queue entry left. The short run is in the README's test command, the long one is slow.

Requests: bodies of random JSON (any types and sizes, boundary and huge integers, NaN and infinities, unicode and
lone surrogates), bodies close to valid with one field drawn at random, truncated and undecodable bytes, deep
nesting, chat bodies, other routes and methods, missing or wrong API keys, streams dropped after their first
piece, and bodies cut short by a client that goes away.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from served import KEY, MAX_LENGTH, VOCAB, served_checkpoint

hypothesis = pytest.importorskip("hypothesis")
httpx = pytest.importorskip("httpx")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bloom_jax.generate import Generator  # noqa: E402

STEADY = {"model": "tiny", "prompt": "The cat sat on the mat.", "max_tokens": 12, "temperature": 0, "logprobs": 0}
STATUSES = {200, 400, 401, 404, 405, 408, 413, 429}  # 429: the fuzz and the steady client may fill the queue

# -- what is sent ---------------------------------------------------------------------------------------------------

BOUNDARY_INTS = st.sampled_from([0, 1, -1, 2, 5, 20, 21, 95, 96, 97, VOCAB - 1, VOCAB, VOCAB + 1, 2**31 - 1, 2**31,
                                 2**32, 2**32 + 7, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1,
                                 10**30, -10**30, 10**300])
INTS = st.one_of(BOUNDARY_INTS, st.integers(-5, 100), st.integers())
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e-300, 1e308, -0.0,
                                                                                    100.0, 100.5]))
TEXT = st.one_of(st.text(max_size=40), st.text(alphabet="\ud800\udfff\x00é🌍大 a", max_size=10),
                 st.sampled_from(["", " ", "The", "</s>", "\n\n", "a" * 300]))
LEAVES = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT)
ANY_JSON = st.recursive(LEAVES, lambda kids: st.lists(kids, max_size=6) | st.dictionaries(TEXT, kids, max_size=6),
                        max_leaves=24)
IDS = st.lists(st.one_of(st.integers(4, VOCAB - 1), BOUNDARY_INTS), min_size=0, max_size=20)

# Valid values of each field (so that most requests reach the engine), and values at or past each bound.
WORDS = st.text(min_size=1, max_size=30)  # hypothesis's text leaves out surrogates
VALID_IDS = st.lists(st.integers(4, VOCAB - 1), min_size=1, max_size=20)
VALID = {
    "prompt": st.one_of(WORDS, VALID_IDS, st.lists(WORDS, min_size=1, max_size=3),
                        st.lists(VALID_IDS, min_size=1, max_size=3)),
    "max_tokens": st.integers(1, 6),
    "temperature": st.sampled_from([0, 0.7, 1.0, 2.0]),
    "top_p": st.sampled_from([0.5, 0.9, 1.0]),
    "top_k": st.sampled_from([0, -1, 1, 40, VOCAB]),
    "repetition_penalty": st.sampled_from([1.0, 1.3]),
    "seed": st.integers(-2**63, 2**64 - 1),
    "n": st.integers(1, 3),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), min_size=1,
                                                                max_size=4)),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "ignore_eos": st.booleans(),
    "user": WORDS,
}
EDGES = {
    "model": st.sampled_from(["gpt-4", "", "tiny " * 60]),
    "prompt": st.one_of(TEXT, IDS, st.lists(TEXT, max_size=3), st.lists(IDS, max_size=3),
                        st.just(["a"] * 65), st.just(list(range(4, 4 + MAX_LENGTH + 1)))),
    "max_tokens": BOUNDARY_INTS,
    "temperature": FLOATS,
    "top_p": FLOATS,
    "top_k": BOUNDARY_INTS,
    "repetition_penalty": FLOATS,
    "seed": INTS,
    "n": BOUNDARY_INTS,
    "best_of": BOUNDARY_INTS,
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6), st.just("x" * 257)),
    "logprobs": BOUNDARY_INTS,
    "stream_options": st.fixed_dictionaries({"include_usage": ANY_JSON}),
    "suffix": TEXT,
    "logit_bias": st.dictionaries(TEXT, INTS, max_size=2),
    "presence_penalty": FLOATS,
}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "wizard"]),
                                 "content": st.one_of(TEXT, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2))})
CHAT_VALID = {"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                          "content": WORDS}), min_size=1, max_size=3),
              "max_completion_tokens": st.integers(1, 6), "logprobs": st.booleans(),
              "top_logprobs": st.integers(0, 20), "stream": st.booleans()}
CHAT_EDGES = {"messages": st.one_of(st.lists(MESSAGE, max_size=3), ANY_JSON),
              "max_completion_tokens": BOUNDARY_INTS, "top_logprobs": BOUNDARY_INTS}


@st.composite
def body_of(draw, valid: dict, edges: dict) -> dict:
    """A body of valid fields, `valid`'s first always there (the prompt, the messages), with some fields at or past
    their bounds or of any JSON at all (none, about a third of the time)."""
    first, *rest = valid
    body = {"model": "tiny", "max_tokens": draw(st.integers(1, 4)), first: draw(valid[first])}
    for name in draw(st.lists(st.sampled_from(rest), max_size=4, unique=True)):
        body[name] = draw(valid[name])
    if body.get("logprobs") is True and "top_logprobs" not in body:
        body["top_logprobs"] = 2
    if draw(st.integers(0, 2)):
        for name in draw(st.lists(st.sampled_from(sorted({*valid, *edges})), min_size=1, max_size=2, unique=True)):
            body[name] = draw(edges[name] if name in edges and draw(st.booleans()) else ANY_JSON)
    return body


@st.composite
def fuzz_request(draw) -> dict:
    """One request: {kind, method, path, headers, content (bytes), cut (bytes sent before hanging up, or None),
    drop (close a stream after its first piece)}."""
    kind = draw(st.sampled_from(["completion"] * 5 + ["chat"] * 2 + ["any_json", "bytes", "route", "auth",
                                                                    "cut"]))
    method, path = "POST", "/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    if kind == "chat":
        path = "/v1/chat/completions"
        content = _dumps(draw(body_of(CHAT_VALID, CHAT_EDGES)))
    elif kind == "any_json":
        content = _dumps(draw(ANY_JSON))
    elif kind == "bytes":
        content = draw(st.one_of(st.binary(max_size=64), st.sampled_from([b"[" * 50_000, b'{"prompt": ' * 3000,
                                                                         b'{"prompt": "\xff\xfe"}', b"null"])))
    elif kind == "route":
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]))
        path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/tiny",
                                     "/v1/models/x%2F..%2F", "/health", "/metrics", "/", "/v1/embeddings",
                                     "/v1/../etc/passwd", "/v1/completions?x=1"]))
        content = _dumps(draw(body_of(VALID, EDGES)))
    else:
        content = _dumps(draw(body_of(VALID, EDGES)))
        if kind == "auth":
            headers["Authorization"] = draw(st.sampled_from(["", "Bearer", "Bearer wrong", KEY, "Basic " + KEY,
                                                             f"Bearer {KEY} x"]))
    if draw(st.integers(0, 9)) == 0:
        headers["Content-Type"] = draw(st.sampled_from(["text/plain", "", "application/x-www-form-urlencoded"]))
    cut = draw(st.integers(0, max(len(content) - 1, 0))) if kind == "cut" else None
    return {"kind": kind, "method": method, "path": path, "headers": headers, "content": content, "cut": cut,
            "drop": draw(st.booleans())}


def _dumps(value) -> bytes:
    # allow_nan: Python's json writes NaN and Infinity, and reads them (as some clients do); surrogates as escapes.
    return json.dumps(value).encode()


# -- what is checked ------------------------------------------------------------------------------------------------

def _check_error(response, status: int) -> None:
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"], error
    assert isinstance(error["type"], str), error


def _check_stream(lines: list[str], dropped: bool) -> None:
    data = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in data), data[:3]
    for line in data:
        if line != "data: [DONE]":
            chunk = json.loads(line[len("data: "):])
            assert "error" not in chunk, chunk  # a valid request's stream never fails
            assert isinstance(chunk["choices"], list)
    assert dropped or data[-1] == "data: [DONE]"


def send(http, url: str, request: dict, tally: collections.Counter) -> None:
    kind = request["kind"]
    if request["cut"] is not None:  # a body cut short: the client hangs up before sending the rest
        host, port = url.removeprefix("http://").split(":")
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Length: {len(request['content'])}\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(head + request["content"][:request["cut"]])
        tally[(kind, "hung up")] += 1
        return
    build = http.build_request(request["method"], request["path"], headers=request["headers"],
                               content=request["content"] if request["method"] != "GET" else None)
    response = http.send(build, stream=True)
    try:
        status = response.status_code
        tally[(kind, status)] += 1
        assert status in STATUSES, (status, response.read()[:500], request)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if request["drop"] and line.startswith("data: "):
                    break
            _check_stream(lines, request["drop"])
            return
        response.read()
        if status >= 400 and response.headers.get("content-type") == "application/json":
            _check_error(response, status)
        elif status >= 400:
            assert request["path"] not in ("/v1/completions", "/v1/chat/completions"), response.text
        elif request["path"].startswith("/v1/") and request["method"] == "POST":
            body = response.json()
            assert body["choices"] and all(c["finish_reason"] in ("stop", "length") for c in body["choices"]), body
    finally:
        response.close()


# -- the live server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return served_checkpoint(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def server(checkpoint):
    """`bloom-jax serve` in its own process: (url, its stderr lines so far)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "BLOOM_JAX_API_KEY": KEY}
    command = [sys.executable, "-m", "bloom_jax.cli", "serve", str(checkpoint), "--port", "0", "--max-slots", "4",
               "--max-length", str(MAX_LENGTH), "--prefill-chunk", "32", "--served-model-name", "tiny"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines: list[str] = []
    arrived: queue.Queue = queue.Queue()

    def read():
        for line in process.stderr:
            lines.append(line)
            arrived.put(line)

    threading.Thread(target=read, daemon=True).start()
    url, deadline = None, time.monotonic() + 180
    try:
        while url is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                if found := re.search(r"serving \S+ at (http://\S+)", arrived.get(timeout=1)):
                    url = found.group(1)
        assert url, "the server did not start:\n" + "".join(lines[-20:])
        yield url, lines
    finally:
        process.terminate()
        code = process.wait(60)
    assert code in (0, -15), "".join(lines[-20:])  # uvicorn ends by its signal once it has shut down


class Steady(threading.Thread):
    """Sends `STEADY` again and again until stopped: every answer's text and tokens are kept."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.answers, self.errors, self.done = url, [], [], threading.Event()

    def run(self):
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            while not self.done.is_set():
                try:
                    response = http.post("/v1/completions", json=STEADY)
                    choice = response.json()["choices"][0]
                    self.answers.append((choice["text"], tuple(choice["logprobs"]["tokens"])))
                except Exception as e:  # noqa: BLE001 (reported by the test)
                    self.errors.append(repr(e))


def fuzz(server, checkpoint, examples: int) -> collections.Counter:
    url, lines = server
    expected = Generator.from_pretrained(checkpoint).generate([STEADY["prompt"]], 12, temperature=0.0)[0].completion
    steady = Steady(url)
    steady.start()
    tally: collections.Counter = collections.Counter()
    started = time.monotonic()
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
            @given(fuzz_request())
            def one(request):
                send(http, url, request, tally)

            one()
    finally:
        steady.done.set()
        steady.join(60)
    seconds = time.monotonic() - started
    sys.stderr.write(f"{sum(tally.values())} fuzz requests in {seconds:.0f} s beside {len(steady.answers)} steady "
                     f"ones: {dict(sorted(tally.items(), key=str))}\n")
    assert not steady.errors, steady.errors[:3]
    assert len(steady.answers) >= 3 and {text for text, _ in steady.answers} == {expected}
    assert len(set(steady.answers)) == 1
    headers = {"Authorization": f"Bearer {KEY}"}
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{url}/health").json())["busy_slots"] or health["queue_depth"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    after = httpx.post(f"{url}/v1/completions", json=STEADY, headers=headers, timeout=60).json()
    assert after["choices"][0]["text"] == expected
    metrics = httpx.get(f"{url}/metrics", headers=headers).text
    assert not re.search(r'bloom_jax_requests_total\{[^}]*status="5\d\d"', metrics)
    assert not re.search(r"^bloom_jax_failed_requests_total\{", metrics, re.M)
    logged = "".join(lines)
    assert "Traceback" not in logged and not re.search(r"^(ERROR|CRITICAL)", logged, re.M), logged[-3000:]
    return tally


def test_fuzz_requests_against_a_live_server(server, checkpoint):
    tally = fuzz(server, checkpoint, examples=400)
    assert sum(tally.values()) >= 400


@pytest.mark.slow
def test_fuzz_requests_against_a_live_server_long(server, checkpoint):
    tally = fuzz(server, checkpoint, examples=3000)
    assert sum(tally.values()) >= 3000
