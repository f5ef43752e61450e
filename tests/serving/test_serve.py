"""`bloom_jax.serving`: the continuous-batching engine against `Generator.generate`, and the OpenAI-compatible
server through plain HTTP, the `openai` package, curl and the CLI.

One tiny model (`served.served_checkpoint`: transformers' random BLOOM with a trained tokenizer and a chat
template) serves every test; one engine of 8 slots of 96 positions, prefill chunks of 32 tokens (so prompts over
32 tokens are prefilled in chunks between decode steps), behind one server with an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from served import CHUNK, KEY, MAX_LENGTH, SLOTS, TEMPLATE, VOCAB, greedy, prompts, run, served_checkpoint

from bloom_jax.generate import Generator
from bloom_jax.serving.app import Server, ServerThread
from bloom_jax.chat import ChatTemplate
from bloom_jax.serving.engine import Engine, Finished, Request, SamplingParams, Token, _find_stop, _held

httpx = pytest.importorskip("httpx")

README = Path(__file__).resolve().parents[2] / "README.md"

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return served_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def gen(checkpoint) -> Generator:
    return Generator.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def engine(gen):
    engine = Engine(gen, max_slots=SLOTS, max_length=MAX_LENGTH, chunk=CHUNK)
    engine.warm_up()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine, checkpoint):
    template = ChatTemplate.load(None, (checkpoint / "tokenizer_config.json").read_bytes())
    with ServerThread(Server(engine, "tiny", template, api_key=KEY).app()) as url:
        yield url


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
        yield client


# -- the engine ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["draft", "lookup"])
def speculative_engine(request, gen):
    """An engine of the same model with speculative decoding: a draft (the model with noise on its weights: it
    agrees often, not always) of 3 tokens, or prompt lookup (N = 2) of 4; metrics on, as a server has them."""
    from bloom_jax.serving.metrics import Metrics

    if request.param == "draft":
        noisy = jax.tree.map(lambda x: x + 0.15 * jnp.std(x) * jax.random.normal(jax.random.key(5), x.shape),
                             gen.params)
        spec = Generator(gen.model, gen.params, gen.tokenizer, draft=Generator(gen.model, noisy), draft_tokens=3)
    else:
        spec = Generator(gen.model, gen.params, gen.tokenizer, prompt_lookup=2, draft_tokens=4)
    engine = Engine(spec, max_slots=SLOTS, max_length=MAX_LENGTH, chunk=CHUNK)
    engine.metrics = Metrics(lambda: engine.queue_depth, lambda: engine.busy_slots, SLOTS,
                             spec.speculation.draft_tokens)
    engine.warm_up()
    yield engine
    engine.stop()


@pytest.mark.slow
def test_speculative_slots_give_the_models_greedy_tokens_and_logprobs(gen, engine, speculative_engine):
    """Greedy requests of every length (some prefilled in chunks), budgets that end inside a round, beside sampled
    ones: each greedy request's tokens equal `Generator.generate` alone, their log-probabilities those of the
    engine without speculation (2e-5); a seed repeats its sampled tokens; the metrics count drafts and
    acceptances."""
    greedy_prompts = prompts(0, 8)
    budgets = [1, 2, 5, 7, 10, 13, 20, 26]
    mine = [dict(prompt_ids=p, max_tokens=m, logprobs=2, sampling=SamplingParams(temperature=0.0))
            for p, m in zip(greedy_prompts, budgets)]
    crowd = [dict(prompt_ids=p, max_tokens=12, sampling=SamplingParams(temperature=0.9, top_p=0.9, seed=i))
             for i, p in enumerate(prompts(1, 4))]
    results = run(speculative_engine, mine[:4] + crowd + mine[4:])
    got = [r["tokens"][0] for r in results[:4] + results[8:]]
    assert got == [greedy(gen, p, m) for p, m in zip(greedy_prompts, budgets)]
    plain = run(engine, mine)
    for ours, theirs in zip(results[:4] + results[8:], plain):
        np.testing.assert_allclose(ours["logprobs"][0], theirs["logprobs"][0], atol=2e-5)
        assert [[t for t, _ in top] for top in ours["tops"][0]] == [[t for t, _ in top] for top in theirs["tops"][0]]
    again = run(speculative_engine, crowd)
    assert [r["tokens"] for r in again] == [r["tokens"] for r in results[4:8]]
    assert speculative_engine.busy_slots == 0
    text = speculative_engine.metrics.render()[0].decode()

    def value(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    drafted, accepted = value("bloom_jax_speculative_drafted_tokens_total"), value(
        "bloom_jax_speculative_accepted_tokens_total")
    assert drafted > 0 and 0 < accepted < drafted
    assert value("bloom_jax_speculative_acceptance_rate") == pytest.approx(accepted / drafted)
    assert value("bloom_jax_speculative_tokens_per_step_count") > 0


@pytest.mark.slow
def test_greedy_tokens_equal_generate_whatever_shares_the_batch(gen, engine):
    """12 greedy prompts (1 to 59 tokens: some prefilled in chunks of 32) submitted at once with 6 sampled ones
    (top-k, top-p, a repetition penalty) and a greedy one with a repetition penalty: each greedy request's tokens
    equal `Generator.generate` on its prompt alone."""
    greedy_prompts = prompts(0, 12)
    budgets = [4 + 3 * i for i in range(12)]
    crowd = [dict(prompt_ids=p, max_tokens=20, sampling=SamplingParams(temperature=0.9, top_k=k, top_p=tp, seed=i,
                                                                      repetition_penalty=rp))
             for i, (p, k, tp, rp) in enumerate(zip(prompts(1, 6), [0, 5, 0, 40, 3, 0], [1, 1, 0.8, 0.9, 1, 0.5],
                                                      [1, 1, 1, 1.3, 1, 1]))]
    mine = [dict(prompt_ids=p, max_tokens=m, sampling=SamplingParams(temperature=0.0))
            for p, m in zip(greedy_prompts, budgets)]
    penalised = dict(prompt_ids=greedy_prompts[3], max_tokens=16,
                     sampling=SamplingParams(temperature=0.0, repetition_penalty=1.5))
    results = run(engine, mine[:6] + crowd + mine[6:] + [penalised])
    got = [r["tokens"][0] for r in results[:6] + results[12:18]]
    expected = [greedy(gen, p, m) for p, m in zip(greedy_prompts, budgets)]
    assert got == expected
    assert any(len(p) > CHUNK for p in greedy_prompts) and any(len(set(e)) >= 4 for e in expected)
    assert results[18]["tokens"][0] == greedy(gen, greedy_prompts[3], 16, repetition_penalty=1.5)
    assert results[18]["tokens"][0] != expected[3][:16]  # the penalty changed something
    assert engine.busy_slots == 0


@pytest.mark.slow
def test_sampled_tokens_are_reproducible_from_the_seed(engine):
    """The same seed gives the same tokens alone and in a crowd of other requests; another seed and another
    choice (n=2) give others."""
    prompt = prompts(2, 1)[0]
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = run(engine, [dict(prompt_ids=prompt, max_tokens=24, sampling=sampling, n=2)])[0]["tokens"]
    crowd = [dict(prompt_ids=p, max_tokens=12, sampling=SamplingParams(temperature=0.7, seed=i))
             for i, p in enumerate(prompts(3, 6))]
    together = run(engine, crowd[:3] + [dict(prompt_ids=prompt, max_tokens=24, sampling=sampling, n=2)] + crowd[3:])
    assert together[3]["tokens"] == alone
    assert alone[0] != alone[1]
    other = run(engine, [dict(prompt_ids=prompt, max_tokens=24,
                              sampling=SamplingParams(temperature=1.0, top_p=0.95, seed=99))])[0]["tokens"][0]
    assert other != alone[0]


@pytest.mark.slow
def test_logprobs_equal_log_softmax_of_the_models_logits(gen, engine):
    """The chosen and alternative tokens' log-probabilities, of the completion and of the prompt (echo), equal
    `log_softmax` of the model's logits over prompt + completion, to 2e-5; the alternatives are the top ones."""
    prompt = prompts(4, 1, 30)[0]
    result = run(engine, [dict(prompt_ids=prompt, max_tokens=10, logprobs=5, prompt_logprobs=3,
                               sampling=SamplingParams(temperature=0.8, seed=5))])[0]
    ids = prompt + result["tokens"][0]
    logits = gen.model.apply({"params": gen.params}, jnp.asarray([ids]))[0]
    logprobs_sv = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    expected = [logprobs_sv[i - 1, t] for i, t in enumerate(ids) if i > 0]
    n = len(prompt)
    scored = result["prompt"]
    assert scored.token_logprobs[0] is None
    np.testing.assert_allclose(scored.token_logprobs[1:], expected[: n - 1], atol=2e-5)
    np.testing.assert_allclose(result["logprobs"][0], expected[n - 1:], atol=2e-5)
    for position, top in [(n - 1 + i, t) for i, t in enumerate(result["tops"][0])] + [
            (i, t) for i, t in enumerate(scored.top[1:])]:
        best = np.argsort(-logprobs_sv[position])[: len(top)]
        assert [t for t, _ in top] == best.tolist()
        np.testing.assert_allclose([lp for _, lp in top], logprobs_sv[position, best], atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["fsdp=2,tensor=4", "data=2,tensor=4"])
def test_a_sharded_engine_gives_the_same_greedy_tokens(gen, checkpoint, spec):
    """Weights and the slots' cache sharded over 8 simulated devices (heads over tensor, slots over data or
    fsdp): a crowd of greedy requests gives `Generator.generate`'s tokens."""
    from bloom_jax.sharding import make_mesh

    sharded = Generator.from_pretrained(checkpoint, mesh=make_mesh(spec))
    engine = Engine(sharded, max_slots=4, max_length=64, chunk=CHUNK).start()
    try:
        some = prompts(10, 6, 40)
        results = run(engine, [dict(prompt_ids=p, max_tokens=8, sampling=SamplingParams(temperature=0.0))
                               for p in some])
        assert [r["tokens"][0] for r in results] == [greedy(gen, p, 8) for p in some]
    finally:
        engine.stop()


def test_top_k_1_samples_the_greedy_token(gen, engine):
    prompt = prompts(5, 1)[0]
    result = run(engine, [dict(prompt_ids=prompt, max_tokens=12, sampling=SamplingParams(temperature=1.5, top_k=1))])
    assert result[0]["tokens"][0] == greedy(gen, prompt, 12)


def test_stop_strings_end_the_text_before_them(gen, engine):
    """A stop string ends the choice ('stop') with the text before it, never sent in part (held back while it may
    be starting); the helpers find and hold back across token boundaries."""
    assert _find_stop("abc</s", ["</s>"], 0) == -1 and _find_stop("abc</s>x", ["</s>"], 2) == 3
    assert _held("abc</", ["</s>"]) == 2 and _held("abc", ["</s>"]) == 0 and _held("a<", ["<<x", "<y"]) == 1
    ids = gen.tokenizer.encode("Paris")
    full = gen.generate([ids], 24, temperature=0.0)[0].completion  # '大LeLeLe...' from this random model
    stop = "eL"
    assert stop in full
    result = run(engine, [dict(prompt_ids=ids, max_tokens=24, stop=[stop], sampling=SamplingParams(temperature=0.0))])
    assert result[0]["reasons"] == ["stop"] and result[0]["text"][0] == full[: full.index(stop)]


def test_cancelled_requests_free_their_slots(engine):
    """Requests cancelled while running or waiting end as 'cancelled' and leave no slot taken."""
    results = []

    def on_event(event):
        results.append(event)

    requests = [Request(p, 60 - len(p) % 20, on_event, SamplingParams(temperature=0.0), ignore_eos=True)
                for p in prompts(7, 12, 30)]
    for request in requests:
        engine.submit(request)
    while sum(isinstance(e, Token) for e in results) < 10:
        time.sleep(0.002)
    for request in requests[::2]:
        request.cancel()
    deadline = time.monotonic() + 60
    while sum(isinstance(e, Finished) for e in results) < 12:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    reasons = [e.reason for e in results if isinstance(e, Finished)]
    assert reasons.count("cancelled") == 6 and reasons.count("length") == 6
    assert engine.busy_slots == 0 and engine.queue_depth == 0


# -- HTTP ----------------------------------------------------------------------------------------------------------

def test_completions_over_http_equal_generate(gen, client):
    body = {"model": "tiny", "prompt": ["The cat sat", "Paris est"], "max_tokens": 12, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    expected = gen.generate(["The cat sat", "Paris est"], 12, temperature=0.0)
    assert [c["text"] for c in data["choices"]] == [c.completion for c in expected]
    assert data["object"] == "text_completion" and data["model"] == "tiny"
    assert data["usage"] == {"prompt_tokens": sum(len(c.prompt_ids) for c in expected),
                             "completion_tokens": sum(len(c.completion_ids) for c in expected),
                             "total_tokens": sum(len(c.prompt_ids) + len(c.completion_ids) for c in expected)}


def test_echo_with_logprobs_scores_the_prompt_as_evaluation_harnesses_read_it(gen, client):
    """lm-evaluation-harness's log-likelihood request (token ids, echo, logprobs=1, max_tokens=1): the tokens are
    the prompt's then one new, the first without a log-probability, each with its best alternative."""
    ids = gen.tokenizer.encode("The cat sat on the mat.")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    data = client.post("/v1/completions", json=body).json()
    logprobs = data["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None and all(len(t) == 1 for t in logprobs["top_logprobs"][1:])
    assert "".join(logprobs["tokens"][:-1]) == "The cat sat on the mat."
    assert data["choices"][0]["text"].startswith("The cat sat on the mat.")
    assert logprobs["text_offset"][:2] == [0, len(logprobs["tokens"][0])]
    logits = gen.model.apply({"params": gen.params}, jnp.asarray([ids]))[0]
    want = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose(logprobs["token_logprobs"][1:-1], want, atol=2e-5)


def test_streaming_sends_pieces_then_done(gen, client):
    body = {"model": "tiny", "prompt": "Le modèle", "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    expected = gen.generate(["Le modèle"], 10, temperature=0.0)[0]
    assert text == expected.completion
    assert chunks[-2]["choices"][0]["finish_reason"] in ("length", "stop")
    assert chunks[-1]["usage"]["completion_tokens"] == len(expected.completion_ids)


def test_chat_renders_the_tokenizer_configs_template(gen, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est Paris ?"}]
    data = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                                     "temperature": 0}).json()
    prompt = "system: Be brief.\nuser: Où est Paris ?\nassistant:"
    expected = gen.generate([prompt], 8, temperature=0.0)[0]
    assert data["choices"][0]["message"] == {"role": "assistant", "content": expected.completion}
    assert data["usage"]["prompt_tokens"] == len(expected.prompt_ids)


def test_the_openai_package_talks_to_the_server(gen, url):
    """The official client: completions, a stream, chat (streamed too, with log-probabilities)."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    expected = gen.generate(["The dog"], 10, temperature=0.0)[0].completion
    completion = client.completions.create(model="tiny", prompt="The dog", max_tokens=10, temperature=0)
    assert completion.choices[0].text == expected
    stream = client.completions.create(model="tiny", prompt="The dog", max_tokens=10, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == expected
    messages = [{"role": "user", "content": "Bonjour"}]
    chat_expected = gen.generate(["user: Bonjour\nassistant:"], 6, temperature=0.0)[0].completion
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                          logprobs=True, top_logprobs=2)
    assert chat.choices[0].message.content == chat_expected
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in chat.choices[0].logprobs.content)
    pieces = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                            stream=True, extra_body={"top_k": 0})
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == chat_expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_64_concurrent_clients(gen, engine, url):
    """64 clients at once: mixed prompt lengths (1 to 59 tokens) and budgets, half streaming, 8 of the streams
    dropped after their second piece, 8 sampling with a seed. Every answer that was read to the end is right
    (greedy ones equal `Generator.generate`, seeded ones equal the same request made alone), no slot or queue
    entry is left behind, and the server serves the next request."""
    rng = np.random.default_rng(8)
    specs = []
    for i, ids in enumerate(prompts(9, 64)):
        body = {"model": "tiny", "prompt": ids, "max_tokens": int(rng.integers(1, 30)), "temperature": 0,
                "stream": i % 2 == 0}
        if i % 8 == 3:
            body.update(temperature=0.9, seed=i, max_tokens=16)
        specs.append((body, i % 8 == 0))  # (request, drop after two pieces): streams only (i even)
    headers = {"Authorization": f"Bearer {KEY}"}
    expected = {}
    for i, (body, _) in enumerate(specs):
        if body["temperature"] == 0:
            expected[i] = gen.generate([body["prompt"]], body["max_tokens"], temperature=0.0)[0].completion
        else:
            expected[i] = httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers,
                                     timeout=60).json()["choices"][0]["text"]

    async def one(client, body, drop):
        if not body["stream"]:
            response = await client.post("/v1/completions", json=body)
            return response.json()["choices"][0]["text"]
        text, pieces = "", 0
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line or line == "data: [DONE]":
                    continue
                text += json.loads(line[len("data: "):])["choices"][0]["text"]
                pieces += 1
                if drop and pieces == 2:
                    return None
        return text

    async def everyone():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, body, drop) for body, drop in specs))

    answers = asyncio.run(everyone())
    dropped = [i for i, answer in enumerate(answers) if answer is None]
    assert set(dropped) <= {i for i, (_, drop) in enumerate(specs) if drop} and len(dropped) >= 4
    for i, answer in enumerate(answers):
        if answer is not None:
            assert answer == expected[i], i
    deadline = time.monotonic() + 30
    while engine.busy_slots or engine.queue_depth:
        assert time.monotonic() < deadline, (engine.busy_slots, engine.queue_depth)
        time.sleep(0.01)
    after = httpx.post(f"{url}/v1/completions", json=specs[1][0], headers=headers, timeout=60)
    assert after.json()["choices"][0]["text"] == expected[1]


BAD_REQUESTS = [
    (b"{", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"prompt": 3}, 400, "prompt", "must be a string"),
    ({"prompt": []}, 400, "prompt", "must be a string"),
    ({"prompt": [[1, 2], 5]}, 400, "prompt", "each 'prompt'"),
    ({"prompt": [1, 100000]}, 400, "prompt", "token ids must be in"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
    ({"model": 3, "prompt": "a"}, 400, "model", "must be a string"),
    ({"prompt": "a", "max_tokens": "8"}, 400, "max_tokens", "must be an integer"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens", "between 0 and the length limit, 96"),
    ({"prompt": "a", "max_tokens": 10**30}, 400, "max_tokens", "between 0 and the length limit, 96"),
    ({"prompt": "a", "max_tokens": MAX_LENGTH}, 400, "max_tokens", "length limit is 96"),
    ({"prompt": list(range(5, 5 + MAX_LENGTH + 4)), "max_tokens": 1}, 400, "prompt", "length limit is 96"),
    ({"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "nothing to do"),
    ({"prompt": "a", "temperature": -0.5}, 400, "temperature", "between 0 and 100"),
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p", "in (0, 1]"),
    ({"prompt": "a", "top_k": -3}, 400, "top_k", "-1 or 0"),
    ({"prompt": "a", "top_k": 4294967296}, 400, "top_k", "at most the vocabulary"),
    ({"prompt": "a", "top_k": VOCAB + 1}, 400, "top_k", f"at most the vocabulary, {VOCAB}"),
    ({"prompt": "a", "temperature": 1e308}, 400, "temperature", "between 0 and 100"),
    (b'{"prompt": "a", "temperature": NaN}', 400, "temperature", "between 0 and 100"),
    (b'{"prompt": "a", "top_p": Infinity}', 400, "top_p", "in (0, 1]"),
    ({"prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty", "(0, 100]"),
    ({"prompt": "a", "n": 0}, 400, "n", "between 1 and 8"),
    ({"prompt": "a", "n": 9}, 400, "n", "between 1 and 8"),
    ({"prompt": "a", "n": 2**70}, 400, "n", "between 1 and 8"),
    ({"prompt": "a", "best_of": 2**70}, 400, "best_of", "not supported"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs", "between 0 and 5"),
    ({"prompt": "a", "logprobs": 10**12}, 400, "logprobs", "between 0 and 5"),
    ({"prompt": "a", "stop": [1]}, 400, "stop", "string of 1 to 256 characters"),
    ({"prompt": "a", "stop": ""}, 400, "stop", "string of 1 to 256 characters"),
    ({"prompt": "a", "stop": "x" * 257}, 400, "stop", "string of 1 to 256 characters"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    (b'{"prompt": "a", "stop": "\\ud800"}', 400, "stop", "lone surrogate"),
    (b'{"prompt": "\\udfff x"}', 400, "prompt", "lone surrogate"),
    ({"prompt": ["a"] * 65}, 400, "prompt", "at most 64 in one request"),
    ({"prompt": [[5]] * 65}, 400, "prompt", "at most 64 in one request"),
    ({"prompt": "a" * (MAX_LENGTH * 1000)}, 400, "prompt", "bytes at most"),
    ({"prompt": [[5, 6], [1, 2, -1]]}, 400, "prompt", "token ids must be in"),
    ({"model": "m" * 300, "prompt": "a"}, 400, "model", "at most 256 characters"),
    (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested too deeply"),
    (b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", 400, None, "not valid JSON"),
    (b"\xff\xfe{}", 400, None, "not valid JSON"),
    (b"", 400, None, "not valid JSON"),
    (b"x" * (8 << 20) + b"x", 413, None, "over 8 MiB"),
    ({"prompt": "a", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed"),
    ({"prompt": "a", "seed": 2**64}, 400, "seed", "64-bit"),
    ({"prompt": "a", "seed": -2**63 - 1}, 400, "seed", "64-bit"),
    ({"prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "a", "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported"),
    ({"prompt": "a", "suffix": "z"}, 400, "suffix", "not supported"),
    ({"prompt": "a", "best_of": 3}, 400, "best_of", "not supported"),
]


@pytest.mark.parametrize("body, status, param, says", BAD_REQUESTS, ids=[f"{b[3]}-{i}" for i, b in
                                                                          enumerate(BAD_REQUESTS)])
def test_bad_completion_requests_get_4xx_with_an_openai_error_body(client, engine, body, status, param, says):
    response = (client.post("/v1/completions", content=body) if isinstance(body, bytes)
                else client.post("/v1/completions", json=body))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["param"] == param and error["type"]
    assert "\n" not in error["message"] and engine.alive


@pytest.mark.parametrize("body, status, says", [
    ({"messages": []}, 400, "non-empty array"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "'role'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text parts"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "must be a string"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "between 1 and the length limit"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "needs 'logprobs'"),
    ({"messages": [{"role": "user", "content": "x" * 200}]}, 400, "length limit"),
])
def test_bad_chat_requests_get_4xx(client, body, status, says):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]


def test_the_api_key_guards_every_route_but_health(url):
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, f"{url}{path}", headers=headers, json={"prompt": "a"})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_unknown_routes_and_methods_get_openai_errors(client):
    assert client.get("/v1/nothing").status_code == 404 and "error" in client.get("/v1/nothing").json()
    assert client.get("/v1/completions").status_code == 405
    assert client.get("/v1/models/tiny").json()["id"] == "tiny"
    assert client.get("/v1/models/other").status_code == 404


def test_metrics_count_requests_tokens_and_latencies(client):
    client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3, "temperature": 0})
    text = client.get("/metrics").text

    def value(name):
        return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    assert value('bloom_jax_requests_total') >= 1 and value("bloom_jax_generation_tokens_total") >= 3
    assert value("bloom_jax_prompt_tokens_total") >= 1 and value("bloom_jax_slots") == SLOTS
    assert value("bloom_jax_time_to_first_token_seconds_count") >= 1
    assert value("bloom_jax_time_per_output_token_seconds_count") >= 2
    assert "bloom_jax_queue_depth" in text and "bloom_jax_running_slots" in text


def test_a_full_queue_gets_429_with_retry_after(gen):
    """An engine that is not running keeps what it queues: the queue fills, then 429; stopped, 503."""
    engine = Engine(gen, max_slots=2, max_length=MAX_LENGTH, max_queue=2)
    with ServerThread(Server(engine, "tiny").app()) as url:
        body = {"prompt": "The", "max_tokens": 2}

        async def fill():
            async with httpx.AsyncClient(base_url=url, timeout=5) as client:
                waiting = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2)]
                while engine.queue_depth < 2:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/completions", json=body)
                for task in waiting:
                    task.cancel()
                return refused

        refused = asyncio.run(fill())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "queue_full"
        assert httpx.get(f"{url}/health").status_code == 503  # never started
        engine.stop()
        stopped = httpx.post(f"{url}/v1/completions", json=body)
        assert stopped.status_code == 503 and "retry-after" in stopped.headers


def test_chat_without_a_template_says_how_to_get_one(gen):
    engine = Engine(gen, max_slots=1, max_length=MAX_LENGTH)
    with ServerThread(Server(engine, "tiny").app()) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 400 and "--chat-template" in response.json()["error"]["message"]


def _readme_block(language: str, contains: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if contains in block)


@pytest.mark.slow
def test_the_readme_serving_examples_run(gen, checkpoint, tmp_path):
    """`bloom-jax serve` started as the README says (on a free port, with an API key from the environment); the
    README's curl and openai examples run against it unchanged but for the address and the model's name."""
    env = {"BLOOM_JAX_API_KEY": KEY, "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "bloom_jax.cli", "serve", str(checkpoint), "--port", "0", "--max-slots", "2",
               "--max-length", "64", "--served-model-name", "bigscience/bloomz-560m"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        url, deadline = None, time.monotonic() + 120
        while url is None and time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(queue.Empty):
                if (found := re.search(r"serving \S+ at (http://\S+)", lines.get(timeout=1))):
                    url = found.group(1)
        assert url, "the server did not start"
        curl = _readme_block("bash", "curl").replace("http://127.0.0.1:8000", url)
        curl = curl.replace("$BLOOM_JAX_API_KEY", KEY)
        out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["choices"][0]["text"] == gen.generate(
            [json.loads(re.search(r"-d '(.*?)'", curl, re.S).group(1))["prompt"]], 8,
            temperature=0.0)[0].completion
        snippet = _readme_block("python", "openai").replace("http://127.0.0.1:8000", url)
        out = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60,
                             env={**env, "OPENAI_API_KEY": KEY})
        assert out.returncode == 0, out.stderr
    finally:
        process.terminate()
        assert process.wait(30) in (0, -15)


def test_a_checkpoint_in_a_bucket_serves_what_a_local_one_does(gen, checkpoint, bucket):
    from bloom_jax import storage
    from bloom_jax.checkpoints import convert, read_side_file

    url = storage.join(bucket, "served")
    convert(checkpoint, url, progress=False)
    storage.write_bytes(storage.join(bucket, "template.jinja"), TEMPLATE.encode())  # --chat-template from it
    assert ChatTemplate.load(storage.join(bucket, "template.jinja"), None).render(
        [{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    engine = Engine(Generator.from_pretrained(url), max_slots=2, max_length=MAX_LENGTH).start()
    template = ChatTemplate.load(None, read_side_file(url, "tokenizer_config.json"))
    try:
        with ServerThread(Server(engine, "tiny", template).app()) as server:
            completion = httpx.post(f"{server}/v1/completions", timeout=120,
                                    json={"prompt": "The cat sat", "max_tokens": 8, "temperature": 0}).json()
            chat = httpx.post(f"{server}/v1/chat/completions", timeout=120, json={
                "messages": [{"role": "user", "content": "Paris?"}], "max_tokens": 4, "temperature": 0}).json()
    finally:
        engine.stop()
    assert completion["choices"][0]["text"] == gen.generate(["The cat sat"], 8, temperature=0.0)[0].completion
    prompt = template.render([{"role": "user", "content": "Paris?"}])
    assert chat["choices"][0]["message"]["content"] == gen.generate([prompt], 4, temperature=0.0)[0].completion


def test_serve_flag_mistakes_are_one_line_errors(checkpoint, capsys):
    from bloom_jax.cli import main

    assert main(["serve", str(checkpoint), "--chat-template", "no-such-file"]) == 2
    assert "neither a file nor a Jinja template" in capsys.readouterr().err
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(checkpoint), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--draft", str(checkpoint), "--prompt-lookup", "2"]) == 2
    assert "--draft and --prompt-lookup are two ways to draft: give one" in capsys.readouterr().err
