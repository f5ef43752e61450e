"""Serving: `bloom-jax serve`'s throughput and latency at 1, 4, 16 and 64 concurrent clients, beside the same
prompts run one by one through `Generator.generate`, and the memory-bandwidth roofline of a decode step.

    python benchmarks/serve.py [--model bloom-560m] [--clients 1,4,16,64] [--slots 16] [--new 32]
                               [--dtype float32] [--decode-weights float32]

The server runs in a child process (random weights from the preset, seed 0, a small byte-level tokenizer: the
prompts are token ids) on 127.0.0.1; the clients are asyncio streams in this process. Each client sends its
requests one after another (closed loop), 4 per client (8 for a lone client): prompts of 16 to 63 random
tokens, `--new` / 2 to 3 `--new` / 2 greedy tokens each (`ignore_eos`; lengths vary, as a server's do, so that
requests do not finish in lockstep and come back together), streamed with `logprobs: 0` so that every token is
its own event. The server compiles every shape the levels meet before any is timed. Clients start spread over
one lone request's latency, as in a server's steady state rather than a synchronised burst (a burst of 16
prompts at once is 16 prefills of compute before the last first token).

Prints (stdout, markdown) per level: generated tokens/s (all tokens over the level's wall time), time to first
token and time per output token (medians and p99), and the ratios the serving targets are judged by. The
one-by-one baseline is `Generator.generate` on the first 8 prompts in this process (the server idle), end to end
(prefill included, as the server's figures are).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DOCS_FLAG, jax_matvec, log, machine, markdown_table, median_seconds, published  # noqa: E402

PROMPT_LENGTHS = (16, 64)


def build_generator(preset: str, dtype: str, decode_weights: str):
    import jax

    from bloom_jax.config import load_config
    from bloom_jax.generate import Generator
    from bloom_jax.model import init_params, make_model
    from bloom_jax.tokenizer import train_tokenizer

    model = make_model(load_config(preset), dtype=dtype)
    params = init_params(model, jax.random.key(0))
    tokenizer = train_tokenizer(["The cat sat on the mat. Le chat est sur le tapis. 大型语言模型。"] * 4, 300)
    return Generator(model, params, tokenizer, decode_weights=decode_weights)


def serve_child(args) -> None:
    """The server process: prints its URL on stdout once it is ready."""
    from bloom_jax.runtime import reuse_host_memory
    from bloom_jax.serving.app import Server, serve
    from bloom_jax.serving.engine import Engine

    reuse_host_memory()
    generator = build_generator(args.model, args.dtype, args.decode_weights)
    engine = Engine(generator, max_slots=args.slots, max_length=args.max_length)
    # Every shape the levels meet, compiled before any is timed: prompts of 16-63 tokens pad to 16, 32 or 64.
    engine.warm_up(prompt_buckets=(16, 32, 64), max_group=args.slots)
    server = Server(engine, args.model)
    serve(server, port=0, on_ready=lambda url: print(url, flush=True), log_level="warning")


def prompts(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=int(n)).tolist() for n in rng.integers(*PROMPT_LENGTHS, size=count)]


async def one_request(client, body: dict) -> dict:
    """Streams one completion: (time to first token, gaps between tokens, tokens, wall time)."""
    start = time.perf_counter()
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["logprobs"]:
                    times.append(time.perf_counter())
    return {"ttft": times[0] - start, "gaps": [b - a for a, b in zip(times, times[1:])], "tokens": len(times),
            "wall": time.perf_counter() - start}


async def level(url: str, clients: int, bodies: list[dict], spread_s: float) -> tuple[list[dict], float]:
    import httpx

    queue = list(bodies)
    results = []

    async def client_loop(client, index):
        await asyncio.sleep(spread_s * index / clients)
        while queue:
            results.append(await one_request(client, queue.pop(0)))

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
        return results, time.perf_counter() - start


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--model", default="bloom-560m")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--decode-weights", default="float32")
    parser.add_argument("--serve-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_child:
        return serve_child(args)

    import jax
    import numpy as np

    from bloom_jax.runtime import reuse_host_memory

    reuse_host_memory()
    levels = [int(c) for c in args.clients.split(",")]
    generator = build_generator(args.model, args.dtype, args.decode_weights)
    vocab = generator.model.config.vocab_size
    all_prompts = prompts(vocab, 4 * max(levels))
    log("baseline: Generator.generate one prompt at a time")
    budgets = np.random.default_rng(1).integers(args.new // 2, args.new * 3 // 2 + 1, size=len(all_prompts))
    for ids, m in zip(all_prompts[:8], budgets):  # compiles each request's buckets
        generator.generate([ids], int(m), temperature=0.0)
    start = time.perf_counter()
    made = sum(len(generator.generate([ids], int(m), temperature=0.0)[0].completion_ids)
               for ids, m in zip(all_prompts[:8], budgets))
    alone_tps = made / (time.perf_counter() - start)
    matvec, nbytes = jax_matvec(1.0)
    bandwidth = nbytes / median_seconds(matvec, 5)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(generator.params))
    del generator, matvec
    log(f"one by one: {alone_tps:.2f} tokens/s; bandwidth {bandwidth / 1e9:.1f} GB/s")

    child = subprocess.Popen([sys.executable, __file__, "--serve-child", "--model", args.model, "--slots",
                              str(args.slots), "--max-length", str(args.max_length), "--dtype", args.dtype,
                              "--decode-weights", args.decode_weights], stdout=subprocess.PIPE, text=True)
    try:
        url = next((line.strip() for line in child.stdout if line.startswith("http")), None)
        if url is None:
            raise SystemExit("the server did not start")
        rows, figures = [], {}
        bodies = [{"model": args.model, "prompt": ids, "max_tokens": int(m), "temperature": 0, "stream": True,
                   "logprobs": 0, "ignore_eos": True} for ids, m in zip(all_prompts, budgets)]
        spread = 0.0
        for clients in levels:
            count = 4 * clients if clients > 1 else 8
            results, wall = asyncio.run(level(url, clients, bodies[:count], spread))
            if clients == 1:
                spread = statistics.median(r["wall"] for r in results)
            tokens = sum(r["tokens"] for r in results)
            ttft = [r["ttft"] for r in results]
            gaps = [g for r in results for g in r["gaps"]]
            figures[clients] = {"tps": tokens / wall, "ttft_p50": statistics.median(ttft), "ttft_p99": p99(ttft),
                                "tpot_p50": statistics.median(gaps), "tpot_p99": p99(gaps)}
            f = figures[clients]
            log(f"{clients} clients: {f['tps']:.1f} tokens/s")
            rows.append([str(clients), str(count), f"{f['tps']:.1f}", f"{f['tps'] / alone_tps:.2f}x",
                         f"{f['ttft_p50'] * 1e3:.0f} / {f['ttft_p99'] * 1e3:.0f}",
                         f"{f['tpot_p50'] * 1e3:.0f} / {f['tpot_p99'] * 1e3:.0f}"])
    finally:
        child.terminate()
        child.wait(60)
    print(f"Machine: {machine()}; {args.model} architecture, random weights, {args.dtype} compute, "
          f"{args.decode_weights} decode weights; {args.slots} slots of {args.max_length} positions; prompts of "
          f"{PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1] - 1} tokens, {args.new // 2}-{args.new * 3 // 2} new tokens each.\n")
    print(f"One by one through `Generator.generate`: {alone_tps:.2f} tokens/s. Decode roofline at batch 1: "
          f"{bandwidth / weight_bytes:.1f} tokens/s ({weight_bytes / 1e9:.2f} GB of weights per step at "
          f"{bandwidth / 1e9:.1f} GB/s).\n")
    print(markdown_table(["clients", "requests", "tokens/s", "vs one by one", "TTFT ms p50 / p99",
                          "per token ms p50 / p99"], rows))
    if 1 in figures:
        lone = figures[1]
        lines = [f"- 1 client: {lone['tps'] / alone_tps:.2f} of one by one (target >= 0.90)"]
        if 16 in figures:
            lines += [f"- 16 clients: {figures[16]['tps'] / alone_tps:.2f}x one by one (target >= 4); TTFT p99 "
                      f"{figures[16]['ttft_p99'] / lone['ttft_p50']:.2f}x a lone request's (target <= 3)"]
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    with published("serve"):
        main()
