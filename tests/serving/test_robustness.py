"""The server survives its requests: faults stay with the request or step they touch, the engine recovers from a
failed device step and stops for good (the process exiting non-zero) only when it cannot go on, bodies are read
within bounds and prepared off the event loop, and seeds span 64 bits. Faults are injected by wrapping the engine's
device calls and host helpers; the model is `served.served_checkpoint`'s."""

from __future__ import annotations

import asyncio
import json
import re
import select
import socket
import threading
import time

import jax
import numpy as np
import pytest
from served import MAX_LENGTH, greedy, prompts, run, served_checkpoint

from bloom_jax.errors import RunFailed
from bloom_jax.generate import Generator
from bloom_jax.sampling import seed_key
from bloom_jax.serving import app as app_module
from bloom_jax.serving import batch as device
from bloom_jax.serving import engine as engine_module
from bloom_jax.serving.app import Server, ServerThread, serve
from bloom_jax.serving.engine import Engine, EngineStopped, Failed, Request, SamplingParams
from bloom_jax.serving.metrics import Metrics

httpx = pytest.importorskip("httpx")

GREEDY = SamplingParams(temperature=0.0)
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB (injected)"


@pytest.fixture(scope="module")
def gen(tmp_path_factory) -> Generator:
    return Generator.from_pretrained(served_checkpoint(tmp_path_factory.mktemp("robust")))


@pytest.fixture
def engine(gen):
    """A fresh engine of 4 slots with metrics (its compiled programs are shared with the other engines')."""
    engine = Engine(gen, max_slots=4, max_length=MAX_LENGTH, chunk=32)
    engine.metrics = Metrics(lambda: engine.queue_depth, lambda: engine.busy_slots, 4)
    yield engine.start()
    engine.stop()


class Faulty:
    """A device function that raises at the calls in `fail_at` (1-based; "all": every call from now on),
    deleting the slots' buffers first when `takes_slots` (as a failed call that had them donated leaves them)."""

    def __init__(self, real, fail_at=(), takes_slots: bool = False):
        self.real, self.fail_at, self.takes_slots, self.calls = real, fail_at, takes_slots, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail_at == "all" or self.calls in self.fail_at:
            if self.takes_slots:
                for buffer in jax.tree.leaves(args[2:4]):  # decode_step(model, params, slots, seen, ...)
                    buffer.delete()
            raise RuntimeError(OOM)
        return self.real(*args, **kwargs)


def failures(engine: Engine, kind: str) -> float:
    found = re.search(rf'^bloom_jax_failed_requests_total{{kind="{kind}"}} (\S+)$',
                      engine.metrics.render()[0].decode(), re.M)
    return float(found.group(1)) if found else 0.0


def wait_until(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# -- seeds ------------------------------------------------------------------------------------------------------

def test_seeds_span_64_bits(gen, engine):
    """A seed's high 32 bits count (2**32 + 7 draws otherwise than 7); a negative seed is its two's complement;
    seeds below 2**31 keep the keys they had (`jax.random.key`), so earlier runs repeat."""
    for seed in (0, 7, 2**31 - 1):
        assert np.array_equal(jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed)))
    prompt = prompts(3, 1)[0]
    seeds = [7, 7 + 2**32, 2**63 + 7, -1, 2**64 - 1, 7]
    results = run(engine, [dict(prompt_ids=prompt, max_tokens=16, sampling=SamplingParams(temperature=1.0, seed=s))
                           for s in seeds])
    tokens = [r["tokens"][0] for r in results]
    assert len({tuple(t) for t in tokens[:3]}) == 3
    assert tokens[3] == tokens[4] and tokens[5] == tokens[0]
    sampled = [gen.generate([prompt], 16, temperature=1.0, seed=s)[0].completion_ids for s in (7, 7 + 2**32)]
    assert sampled[0] != sampled[1]


# -- a request's own fault ----------------------------------------------------------------------------------------

def test_a_request_whose_own_work_raises_fails_alone(gen, engine, monkeypatch):
    """A request whose stop-string search raises, one whose sampling key cannot be made and one whose event callback
    raises end (`Failed` "request"; the callback's request is cancelled) while the greedy requests beside them
    give `Generator.generate`'s tokens, and no slot is left taken."""
    real_find_stop = engine_module._find_stop

    def find_stop(text, stops, emitted):
        if "BOOM" in stops:
            raise KeyError("the stop-string search broke")
        return real_find_stop(text, stops, emitted)

    real_key_data = engine_module._key_data

    def key_data(sampling, choice):
        if sampling.seed == 666:
            raise ValueError("no key for this seed")
        return real_key_data(sampling, choice)

    monkeypatch.setattr(engine_module, "_find_stop", find_stop)
    monkeypatch.setattr(engine_module, "_key_data", key_data)
    some = prompts(11, 4, 40)
    calls = []

    def raising(event):
        calls.append(event)
        raise RuntimeError("the client's callback broke")

    engine.submit(Request(some[0], 30, raising, GREEDY, ignore_eos=True))
    results = run(engine, [
        dict(prompt_ids=some[1], max_tokens=12, sampling=GREEDY),
        dict(prompt_ids=some[2], max_tokens=20, sampling=GREEDY, stop=["BOOM"]),
        dict(prompt_ids=some[3], max_tokens=12, sampling=GREEDY),
        dict(prompt_ids=some[0], max_tokens=8, sampling=SamplingParams(temperature=1.0, seed=666), n=2),
        dict(prompt_ids=some[2], max_tokens=12, sampling=GREEDY)], allow_failures=True)
    assert [r["failed"] is None for r in results] == [True, False, True, False, True]
    assert "KeyError: 'the stop-string search broke'" in results[1]["failed"].message
    assert "ValueError: no key for this seed" in results[3]["failed"].message
    assert {results[1]["failed"].kind, results[3]["failed"].kind} == {"request"}
    for i in (0, 2, 4):
        assert results[i]["tokens"][0] == greedy(gen, some[i + 1 if i < 4 else 2], 12)
    wait_until(lambda: engine.busy_slots == 0 and engine.queue_depth == 0)
    assert len(calls) == 1 and engine.alive and failures(engine, "request") == 2
    assert run(engine, [dict(prompt_ids=some[3], max_tokens=12, sampling=GREEDY)])[0]["tokens"][0] == greedy(
        gen, some[3], 12)


# -- a failed device call ---------------------------------------------------------------------------------------

def test_an_out_of_memory_step_fails_its_requests_and_the_engine_recovers(gen, engine, monkeypatch):
    """A decode step that fails after taking the slots' buffers fails the requests in it ("step"); the slots are
    made anew and the next requests get `Generator.generate`'s tokens. A failed prefill fails its own requests
    only: the requests decoding meanwhile go on to their exact tokens."""
    step = Faulty(device.decode_step, takes_slots=True)
    monkeypatch.setattr(device, "decode_step", step)
    some = prompts(12, 6, 40)
    results: list = []
    thread = threading.Thread(target=lambda: results.extend(run(engine, [
        dict(prompt_ids=p, max_tokens=40, sampling=GREEDY, ignore_eos=True) for p in some[:2]],
        allow_failures=True)))
    thread.start()
    wait_until(lambda: engine.busy_slots == 2 and step.calls >= 3)
    step.fail_at = (step.calls + 1,)
    thread.join(60)
    assert [r["failed"].kind for r in results] == ["step", "step"] and OOM in results[0]["failed"].message
    wait_until(lambda: engine.busy_slots == 0)
    after = run(engine, [dict(prompt_ids=p, max_tokens=10, sampling=GREEDY) for p in some[2:5]])
    assert [r["tokens"][0] for r in after] == [greedy(gen, p, 10) for p in some[2:5]]

    prefill = Faulty(device.prefill_chunk)
    monkeypatch.setattr(device, "prefill_chunk", prefill)
    results.clear()
    thread = threading.Thread(target=lambda: results.extend(run(engine, [
        dict(prompt_ids=p, max_tokens=30, sampling=GREEDY, ignore_eos=True) for p in some[:2]])))
    thread.start()
    wait_until(lambda: engine.busy_slots == 2)
    prefill.fail_at = (prefill.calls + 1,)
    doomed = run(engine, [dict(prompt_ids=some[5], max_tokens=4, sampling=GREEDY)], allow_failures=True)
    thread.join(60)
    assert doomed[0]["failed"].kind == "step"
    assert [r["tokens"][0] for r in results] == [greedy(gen, p, 30) for p in some[:2]]
    assert engine.alive and failures(engine, "step") == 3


def test_a_step_that_keeps_failing_stops_the_engine_for_good(gen, monkeypatch):
    """`MAX_STEP_FAILURES` failed decode steps in a row: the engine stops, calls `on_failure`, fails what it holds
    and refuses new requests; nothing is left waiting for an answer."""
    stopped = []
    engine = Engine(gen, max_slots=2, max_length=MAX_LENGTH, on_failure=stopped.append).start()
    monkeypatch.setattr(device, "decode_step", Faulty(device.decode_step, fail_at="all"))
    with ServerThread(Server(engine, "tiny").app()) as url:
        got = [run(engine, [dict(prompt_ids=[5, 6, 7], max_tokens=4, sampling=GREEDY)], allow_failures=True)[0]
               for _ in range(engine_module.MAX_STEP_FAILURES - 1)]
        assert [r["failed"].kind for r in got] == ["step"] * (engine_module.MAX_STEP_FAILURES - 1)
        assert engine.alive
        last = run(engine, [dict(prompt_ids=[5, 6, 7], max_tokens=4, sampling=GREEDY)] * 2, allow_failures=True)
        wait_until(lambda: not engine.alive)
        assert all(r["failed"] is not None for r in last)
        assert len(stopped) == 1 and "3 decode steps failed in a row" in stopped[0] and OOM in stopped[0]
        with pytest.raises(EngineStopped, match="decode steps failed in a row"):
            engine.submit(Request([5], 2, lambda event: None, GREEDY))
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and "decode steps failed in a row" in health.json()["error"]
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "The"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_stopped"


def test_serve_stops_and_raises_when_the_engine_stops_for_good(gen, monkeypatch):
    """`serve` (the process of `bloom-jax serve`): each request of a failing device gets a 503 with Retry-After,
    and once the engine has stopped `serve` shuts the server down and raises `RunFailed` (exit status 1)."""
    engine = Engine(gen, max_slots=2, max_length=MAX_LENGTH).start()
    monkeypatch.setattr(device, "decode_step", Faulty(device.decode_step, fail_at="all"))
    answers = []

    def client(url):
        def go():
            with httpx.Client(base_url=url, timeout=60) as http:
                for _ in range(engine_module.MAX_STEP_FAILURES):
                    answers.append(http.post("/v1/completions", json={"prompt": "The", "max_tokens": 3}))

        threading.Thread(target=go, daemon=True).start()

    with pytest.raises(RunFailed, match="decode steps failed in a row.*the server stopped"):
        serve(Server(engine, "tiny"), port=0, on_ready=client, log_level="warning")
    assert [a.status_code for a in answers] == [503] * engine_module.MAX_STEP_FAILURES
    assert answers[0].json()["error"]["code"] == "step_failed" and answers[0].headers["retry-after"] == "1"
    assert not engine.alive


def test_over_http_a_failed_request_is_a_500_or_an_error_event_and_the_rest_go_on(gen, engine, monkeypatch):
    real_find_stop = engine_module._find_stop
    monkeypatch.setattr(engine_module, "_find_stop", lambda text, stops, emitted: (
        1 // 0 if "BOOM" in stops else real_find_stop(text, stops, emitted)))
    with ServerThread(Server(engine, "tiny").app()) as url, httpx.Client(base_url=url, timeout=60) as http:
        body = {"prompt": "The cat", "max_tokens": 8, "temperature": 0}
        failed = http.post("/v1/completions", json={**body, "stop": "BOOM"})
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "request_failed"
        assert "ZeroDivisionError" in failed.json()["error"]["message"]
        with http.stream("POST", "/v1/completions", json={**body, "stop": "BOOM", "stream": True}) as stream:
            assert stream.status_code == 200
            lines = [line for line in stream.iter_lines() if line]
        assert json.loads(lines[-1][len("data: "):])["error"]["code"] == "request_failed"
        ok = http.post("/v1/completions", json=body).json()
        assert ok["choices"][0]["text"] == gen.generate(["The cat"], 8, temperature=0.0)[0].completion
        assert http.get("/health").json()["status"] == "ok"


def test_stopping_answers_every_request_it_holds(gen):
    """An engine stopped with requests queued (never started here) fails each of them: none waits forever."""
    engine = Engine(gen, max_slots=1, max_length=MAX_LENGTH)
    events = []
    for ids in ([5, 6], [7]):
        engine.submit(Request(ids, 3, events.append, GREEDY))
    engine.stop()
    assert [type(e) for e in events] == [Failed, Failed] and "shutting down" in events[0].message
    with pytest.raises(EngineStopped):
        engine.submit(Request([5], 2, events.append, GREEDY))


# -- bodies -------------------------------------------------------------------------------------------------------

@pytest.fixture
def url(engine):
    with ServerThread(Server(engine, "tiny").app()) as url:
        yield url


def _raw(url: str, head: bytes, body: bytes = b"", then=None, timeout: float = 30) -> bytes:
    """Sends a request's head and body (bytes) on a socket, runs `then(sock)` if given, and returns what comes back
    until the server closes or answers in full."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        if then is not None:
            then(sock)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return data


def _length(data: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", data, re.I)
    return int(found.group(1)) if found else 0


def _head(length: int | None, chunked: bool = False) -> bytes:
    size = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % length
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + size + b"\r\n"


def test_a_declared_body_over_the_limit_is_refused_unread(url):
    answer = _raw(url, _head(app_module.MAX_BODY_BYTES + 1))  # no body sent: the answer comes before it
    assert answer.startswith(b"HTTP/1.1 413") and b"over 8 MiB" in answer


def test_a_body_is_read_in_pieces_and_refused_once_over_the_limit(url):
    """Chunked, with no length declared: the server stops reading at the limit and answers 413 while the client
    still has more to send."""
    piece = b"x" * (1 << 20)
    sent = []

    def send_more(sock):
        try:
            for _ in range(64):
                if select.select([sock], [], [], 0.2)[0]:  # the answer has come
                    return
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent.append(len(piece))
        except OSError:  # the server answered and closed
            pass

    answer = _raw(url, _head(None, chunked=True), then=send_more)
    assert answer.startswith(b"HTTP/1.1 413") and sum(sent) < 40 * len(piece)


def test_a_body_too_slow_gets_408(url, monkeypatch):
    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.5)
    answer = _raw(url, _head(100), b'{"prompt": ')
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer


def test_clients_gone_mid_body_leave_no_error(url, engine, gen):
    host, port = url.removeprefix("http://").split(":")
    for cut in (1, 10, 40):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(_head(100) + b'{"prompt": "The cat", "max_tokens": 4}'[:cut])
    time.sleep(0.5)
    body = {"prompt": "The cat", "max_tokens": 4, "temperature": 0}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"] == gen.generate(
        ["The cat"], 4, temperature=0.0)[0].completion
    metrics = engine.metrics.render()[0].decode()
    assert 'status="500"' not in metrics


def test_bodies_are_prepared_off_the_event_loop(gen, engine):
    """A body whose tokenizing takes 3 s (a slowed tokenizer) holds up no other request: a stream runs from start
    to end meanwhile, and the tokenizing ran on the preparing threads."""
    server = Server(engine, "tiny")
    real, threads = server._encode, []

    def slow(texts):
        threads.append(threading.current_thread().name)
        if any("slow" in t for t in texts):
            time.sleep(3)
        return real(texts)

    server._encode = slow

    async def both(url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            warm = {"prompt": "The cat", "max_tokens": 6, "temperature": 0}
            await http.post("/v1/completions", json=warm)  # its programs compiled before the clock starts
            slowed = asyncio.create_task(http.post("/v1/completions", json={"prompt": "slow", "max_tokens": 2}))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            pieces = []
            async with http.stream("POST", "/v1/completions", json={"prompt": "The cat", "max_tokens": 6,
                                                                    "temperature": 0, "stream": True}) as stream:
                async for line in stream.aiter_lines():
                    pieces.append(line)
            streamed = time.monotonic() - started
            return await slowed, pieces, streamed, slowed.done()

    with ServerThread(server.app()) as url:
        slowed, pieces, streamed, _ = asyncio.run(both(url))
    assert slowed.status_code == 200 and "data: [DONE]" in pieces
    assert streamed < 2.5, f"the stream took {streamed:.2f} s beside a 3 s tokenizing"
    assert threads and all(name.startswith("bloom-jax-prepare") for name in threads)
