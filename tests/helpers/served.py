"""The tiny served model of the serving tests: transformers' random BLOOM (linear gain 3, so continuations vary)
with a tokenizer trained on a few multilingual lines and a tokenizer config holding a chat template."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from reference import hf_model, save_hf, tiny_config

from bloom_jax.generate import Generator
from bloom_jax.serving.engine import Engine, Failed, Finished, PromptScored, Request, Token
from bloom_jax.tokenizer import train_tokenizer

KEY = "test-key"
MAX_LENGTH, SLOTS, CHUNK = 96, 8, 32
VOCAB = 512  # tiny_config's
TEXTS = ["The cat sat on the mat. The dog sat on the log. A bird sang in the tree.",
         "Paris est la capitale de la France. Le modèle a été entraîné près de Paris.",
         "¿Qué tal? El modelo habla español, français, English y más… 🌍🚀 大型语言模型。"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


def served_checkpoint(directory: Path) -> Path:
    """A transformers directory in `directory`/model with a tokenizer and a chat template."""
    model = save_hf(hf_model(tiny_config(), linear_gain=3.0), directory / "model")
    train_tokenizer(TEXTS * 3, 400).save(model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "</s>"}))
    return model


def run(engine: Engine, requests: list[dict], allow_failures: bool = False) -> list[dict]:
    """Submits all the requests (Request keyword arguments) at once and waits for every choice: for each request
    {"tokens": [[ids] per choice], "text": [str per choice], "reasons", "logprobs", "tops", "prompt", "failed" (its
    `Failed`, when `allow_failures`, else a failure is an error)}."""
    results, done = [], []
    for spec in requests:
        n = spec.get("n", 1)
        result = {"tokens": [[] for _ in range(n)], "text": [""] * n, "reasons": [None] * n,
                  "logprobs": [[] for _ in range(n)], "tops": [[] for _ in range(n)], "prompt": None, "failed": None}
        results.append(result)

        def on_event(event, result=result, n=n):
            if isinstance(event, PromptScored):
                result["prompt"] = event
            elif isinstance(event, Token):
                result["tokens"][event.choice].append(event.token_id)
                result["text"][event.choice] += event.text
                result["logprobs"][event.choice].append(event.logprob)
                result["tops"][event.choice].append(event.top)
            elif isinstance(event, Finished):
                result["text"][event.choice] += event.text
                result["reasons"][event.choice] = event.reason
                done.append(1)
            elif isinstance(event, Failed) and allow_failures:
                result["failed"] = event
                done.extend([1] * (n - sum(r is not None for r in result["reasons"])))
            else:
                raise AssertionError(event)

        engine.submit(Request(on_event=on_event, **spec))
    total = sum(spec.get("n", 1) for spec in requests)
    deadline = time.monotonic() + 120
    while len(done) < total:
        assert time.monotonic() < deadline, "the engine did not finish"
        time.sleep(0.005)
    return results


def greedy(gen: Generator, ids: list[int], max_tokens: int, **kw) -> list[int]:
    return gen.generate([ids], max_tokens, temperature=0.0, **kw)[0].completion_ids


def prompts(seed: int, count: int, longest: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 400, size=int(n)).tolist() for n in rng.integers(1, longest, size=count)]
