"""Generation: our decode loop beside transformers' PyTorch `generate` on the same weights, and the roofline.

    python benchmarks/generate.py [--model bloom-560m] [--prompt 32] [--new 64] [--batches 1,8]
                                  [--weights float32,bfloat16,int8] [--repeats 5]

Random prompts of `--prompt` tokens, `--new` new tokens each (EOS disabled so every run makes all of them), greedy,
KV cache on both sides. PyTorch and each of our formats run in turn, `--repeats` rounds, so that a shared
machine's slow spells fall on all alike; medians. Freed memory is kept mapped (`reuse_host_memory`, as
`bloom-jax generate` does) for both. For each batch size and decode weight format, prints (stdout, markdown):
- new tokens/s end to end (prefill included), as PyTorch's `generate` is timed, and the ratio to PyTorch;
- the decode step alone (time of `--new` tokens minus time of 1, per step) beside the roofline: the bytes of
  weights one step reads, over the memory bandwidth: the fastest of the matrix-vector products over 1 GiB
  run in the same rounds;
- the quality of each weight format against float32: top-1 agreement of the next-token logits and the largest
  logit error over the largest logit, on every position of 4 random prompts;
- time to first token of a fresh process (compile included): cold, then from the persistent compilation cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    DOCS_FLAG,
    interleaved_times,
    jax_matvec,
    log,
    machine,
    markdown_table,
    published,
    random_ids,
    torch_and_ours,
    versions,
)

# A fresh process: random weights, one prompt, the time from calling the generator to its first token.
_TTFT_CHILD = """
import json, sys, time
import jax, numpy as np
from bloom_jax.config import load_config
from bloom_jax.generate import Generator
from bloom_jax.runtime import enable_compilation_cache
from bloom_jax.model import init_params, make_model
name, prompt, weights, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
enable_compilation_cache(cache)
model = make_model(load_config(name), scan_layers=False)
gen = Generator(model, init_params(model, jax.random.key(0)), decode_weights=weights)
jax.block_until_ready(gen.params)  # the weights' conversion is not part of the first token's latency
ids = np.random.default_rng(0).integers(4, model.config.vocab_size, (1, prompt)).tolist()
start = time.perf_counter()
next(iter(gen.stream(ids, max_new_tokens=16)))
print(json.dumps({"ttft_s": time.perf_counter() - start}))
"""


def time_to_first_token(name: str, prompt: int, weights: str, cache_dir: str) -> float:
    result = subprocess.run([sys.executable, "-c", _TTFT_CHILD, name, str(prompt), weights, cache_dir],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"time-to-first-token child failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout)["ttft_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--model", default="bloom-560m", help="preset name (random weights)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--weights", default="float32,bfloat16,int8", help="decode weight formats to run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token child processes")
    parser.add_argument("--ttft-only", action="store_true", help="only the time-to-first-token child processes")
    args = parser.parse_args()

    import jax
    import numpy as np
    import torch

    from bloom_jax.config import load_config
    from bloom_jax.generate import Generator, generate
    from bloom_jax.runtime import reuse_host_memory

    weight_formats = args.weights.split(",")
    # The fresh processes first, while this one holds no model: both at once needed 19.8 GiB.
    ttft_table = None if args.no_ttft else ttft(args.model, args.prompt, weight_formats)
    if args.ttft_only:
        print(ttft_table)
        return
    reuse_host_memory()  # as `bloom-jax generate` does; both sides run with it
    config = load_config(args.model)
    log(f"building {args.model} with random weights (PyTorch init, copied to ours)")
    torch_model, model, params = torch_and_ours(config)
    matvec, matvec_bytes = jax_matvec()
    bandwidths = []
    generators = {}
    for weights in weight_formats:
        generators[weights] = Generator(model, params, decode_weights=weights)
    del params

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = random_ids(config.vocab_size, batch, args.prompt)
        mask = np.ones_like(ids)
        ids_t, mask_t = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

        def theirs() -> None:
            with torch.inference_mode():
                torch_model.generate(input_ids=ids_t, attention_mask=mask_t, max_new_tokens=args.new,
                                     min_new_tokens=args.new, do_sample=False, use_cache=True, pad_token_id=3)

        def ours(gen: Generator, new: int) -> Callable[[], None]:
            return lambda: np.asarray(generate(gen.model, gen.params, ids, mask, max_new_tokens=new,
                                               eos_token_id=-1))

        runs = {"PyTorch": theirs, "matvec": matvec}
        for weights, gen in generators.items():
            runs[f"{weights} all"], runs[f"{weights} first"] = ours(gen, args.new), ours(gen, 1)
        log(f"batch {batch}: transformers PyTorch generate and ours ({', '.join(generators)}), in turn")
        times = interleaved_times(runs, args.repeats)
        seconds = {name: statistics.median(ts) for name, ts in times.items()}
        bandwidth = matvec_bytes / min(times["matvec"])  # a physical limit: the best the machine did
        bandwidths.append(f"{bandwidth / 1e9:.1f} GB/s (batch {batch} rounds)")
        theirs_rate = batch * args.new / seconds["PyTorch"]
        rows.append([str(batch), "PyTorch fp32", f"{theirs_rate:.1f}", "1.00x", "", "", "", ""])
        float32_rate = None
        for weights, gen in generators.items():
            total = seconds[f"{weights} all"]
            step = (total - seconds[f"{weights} first"]) / (args.new - 1)
            weight_bytes = sum(x.nbytes for x in jax.tree.leaves(gen.params))
            roofline_step = weight_bytes / bandwidth
            rate = batch * args.new / total
            float32_rate = rate if weights == "float32" else float32_rate
            rows.append([str(batch), f"ours {weights}", f"{rate:.1f}", f"{rate / theirs_rate:.2f}x",
                         f"{rate / float32_rate:.2f}x" if float32_rate else "", f"{step * 1e3:.1f}",
                         f"{roofline_step * 1e3:.1f}", f"{roofline_step / step:.2f}"])

    print(f"Generation, {args.model} architecture, random weights, prompt {args.prompt}, {args.new} new tokens, "
          f"greedy, median of {args.repeats} runs")
    print(f"Machine: {machine()}; {versions()}")
    print(f"Memory bandwidth, the fastest fp32 matrix-vector product over 1 GiB in the same rounds: "
          f"{', '.join(bandwidths)}\n")
    print(markdown_table(["batch", "weights", "new tok/s", "vs PyTorch", "vs our fp32", "decode step ms",
                          "roofline step ms", "of roofline"], rows))

    quality_rows = []
    ids = random_ids(config.vocab_size, 4, args.prompt, seed=1)
    reference = None
    for weights, gen in generators.items():
        logits = np.asarray(jax.jit(gen.model.apply)({"params": gen.params}, ids))
        reference = logits if reference is None else reference
        agreement = np.mean(logits.argmax(-1) == reference.argmax(-1))
        error = np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
        quality_rows.append([weights, f"{agreement:.3f}", f"{error:.2e}"])
    print(f"\nQuality against the first format ({weight_formats[0]}), 4 x {args.prompt} positions\n")
    print(markdown_table(["weights", "top-1 agreement", "max logit error / max logit"], quality_rows))

    if ttft_table is not None:
        print(ttft_table)


def ttft(model: str, prompt: int, weight_formats: list[str]) -> str:
    """The time-to-first-token table: each format cold, then from the persistent compilation cache."""
    rows = []
    for weights in weight_formats:
        with tempfile.TemporaryDirectory() as cache_dir:
            log(f"time to first token, {weights}: cold, then cached")
            cold = time_to_first_token(model, prompt, weights, cache_dir)
            cached = time_to_first_token(model, prompt, weights, cache_dir)
        rows.append([weights, f"{cold:.2f}", f"{cached:.2f}"])
    return (f"\nTime to first token of a fresh process, batch 1, prompt {prompt} (compile included), s\n\n"
            + markdown_table(["weights", "cold", "persistent compilation cache"], rows))


if __name__ == "__main__":
    started = time.perf_counter()
    with published("generate"):
        main()
    log(f"done in {time.perf_counter() - started:.0f} s")
