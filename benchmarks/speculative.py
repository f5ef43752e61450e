"""Speculative decoding beside plain decoding of the same target, on held-out text, with the memory roofline.

    python benchmarks/speculative.py [--workdir runs/speculative-bench] [--target-layers 12] [--draft-layers 2]
                                     [--steps 300] [--new 64] [--batches 1,8] [--draft-tokens 3,5] [--repeats 5]

A target (12 layers, hidden 512) and a draft (2 layers, hidden 256) are trained by the project on the quickstart's
corpus (Python's standard library, top-level modules; the draft with the target's tokenizer), once: a later run
reuses `--workdir`. Prompts are 48-token windows of held-out code: the modules of the standard library's packages
(json, email, ...), which neither model saw. Greedy, EOS disabled so that every run makes all `--new` tokens.

Plain decoding, the draft at each K, and prompt lookup (N = 3) run in turn, beside the peer at batch 1:
transformers' PyTorch BLOOM on the same weights (exported), plain and with its assisted generation (the draft as
`assistant_model`, K tokens a round, the first K given), `--repeats` rounds, medians and the
spread (min-max), both models in `--weights` decode format (as `bloom-jax generate`, float32 out-major by default).
Prints (stdout, markdown), per batch: new tokens/s and the ratio to plain decoding; the draft
tokens accepted, and tokens per target pass; the target's decode step beside its roofline (its weights' bytes over
the memory bandwidth, the fastest 1 GiB matrix-vector product of the same rounds). Every speculative run's tokens
are checked equal to plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    DOCS_FLAG,
    interleaved_times,
    jax_matvec,
    log,
    machine,
    markdown_table,
    published,
    versions,
)

PROMPT_TOKENS = 48


def model_config(layers: int, hidden: int, heads: int) -> dict:
    """bloom-mini's config (vocabulary 4096) at another depth and width."""
    from bloom_jax.config import configs_dir

    config = json.loads((configs_dir() / "models" / "bloom-mini.json").read_text())
    return {**config, "n_layer": layers, "hidden_size": hidden, "n_head": heads}


def trained(workdir: Path, name: str, config: dict, steps: int, tokenizer: Path | None) -> Path:
    """The final checkpoint of `name`, trained from scratch on the quickstart corpus unless `workdir` has it."""
    final = workdir / name / "final"
    if (final / "config.json").is_file():
        log(f"{name}: reusing {final}")
        return final
    from bloom_jax.recipe import TrainConfig
    from bloom_jax.train import Trainer

    (workdir / name).mkdir(parents=True, exist_ok=True)
    config_file = workdir / name / "model.json"
    config_file.write_text(json.dumps(config, indent=1))
    overrides = {"model": str(config_file), "output_dir": str(workdir / name), "steps": steps,
                 "warmup_steps": max(1, steps // 10), "save_every": steps, "eval_every": steps,
                 "log_every": max(1, steps // 10)}
    if tokenizer is not None:
        overrides["tokenizer"] = str(tokenizer)
    cfg = TrainConfig.from_yaml("quickstart", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    log(f"{name}: training {config['n_layer']} layers x {config['hidden_size']} for {steps} steps")
    started = time.perf_counter()
    Trainer(cfg).run()
    log(f"{name}: trained in {time.perf_counter() - started:.0f} s")
    return final


def held_out_prompts(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """`count` windows of PROMPT_TOKENS tokens from the standard library's package modules (not trained on)."""
    import numpy as np

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    packages = ("json", "email", "http", "logging", "xml")
    files = sorted(p for package in packages for p in (stdlib / package).rglob("*.py"))
    rng = np.random.default_rng(seed)
    prompts = []
    for path in rng.permutation(files):
        ids = tokenizer.encode(Path(path).read_text(errors="replace"))
        if len(ids) > 4 * PROMPT_TOKENS:
            start = int(rng.integers(0, len(ids) - PROMPT_TOKENS))
            prompts.append(ids[start:start + PROMPT_TOKENS])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"only {len(prompts)} held-out files are long enough")


def transformers_peers(workdir: Path, target_dir: Path, draft_dir: Path, k: int) -> dict:
    """The peer: transformers' PyTorch BLOOM on the same weights (exported), plain and with its assisted generation
    (the draft as `assistant_model`, `k` tokens a round, constant), each a function (prompt ids, new) -> run."""
    import torch
    import transformers

    from bloom_jax.checkpoints import export

    models = {}
    for name, directory in (("target", target_dir), ("draft", draft_dir)):
        hf_dir = workdir / name / "hf"
        if not (hf_dir / "config.json").is_file():
            export(directory, hf_dir, overwrite=True, progress=False)
        models[name] = transformers.BloomForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    models["draft"].generation_config.num_assistant_tokens = k
    models["draft"].generation_config.num_assistant_tokens_schedule = "constant"

    def peer(assistant):
        def make(prompt: list[int], new: int):
            ids = torch.as_tensor([prompt])

            def go():
                with torch.inference_mode():
                    models["target"].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                              max_new_tokens=new, min_new_tokens=new, pad_token_id=3,
                                              assistant_model=assistant)
            return go
        return make

    return {"PyTorch plain": peer(None), f"PyTorch assisted K={k}": peer(models["draft"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--workdir", default="runs/speculative-bench", help="the trained models (kept)")
    parser.add_argument("--target-layers", type=int, default=12)
    parser.add_argument("--target-hidden", type=int, default=512)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--draft-hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=300, help="training steps of each model")
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--draft-tokens", default="3,5", help="K values to run")
    parser.add_argument("--lookup", type=int, default=3, help="prompt lookup's N (0: leave it out)")
    parser.add_argument("--weights", default="float32", help="decode weights of both models (bloom-jax generate's "
                                                             "default: float32, out-major)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax

    from bloom_jax.generate import Generator
    from bloom_jax.runtime import reuse_host_memory

    reuse_host_memory()
    workdir = Path(args.workdir)
    target_dir = trained(workdir, "target", model_config(args.target_layers, args.target_hidden, 8), args.steps, None)
    draft_dir = trained(workdir, "draft", model_config(args.draft_layers, args.draft_hidden, 4), args.steps,
                        target_dir)
    no_eos = {"eos_token_id": []}
    target = Generator.from_pretrained(target_dir, decode_weights=args.weights)
    target = Generator(target.model, target.params, target.tokenizer, generation_config=no_eos)
    draft = Generator.from_pretrained(draft_dir, decode_weights=args.weights)
    draft = Generator(draft.model, draft.params, draft.tokenizer, generation_config=no_eos)
    ks = [int(k) for k in args.draft_tokens.split(",")]
    methods = {"plain": target}
    for k in ks:
        methods[f"draft K={k}"] = Generator(target.model, target.params, target.tokenizer, generation_config=no_eos,
                                            draft=draft, draft_tokens=k)
    if args.lookup:
        methods[f"lookup N={args.lookup} K={max(ks)}"] = Generator(
            target.model, target.params, target.tokenizer, generation_config=no_eos, prompt_lookup=args.lookup,
            draft_tokens=max(ks))
    peers = transformers_peers(workdir, target_dir, draft_dir, ks[0])
    matvec, matvec_bytes = jax_matvec()
    target_bytes = sum(x.nbytes for x in jax.tree.leaves(target.params))
    draft_bytes = sum(x.nbytes for x in jax.tree.leaves(draft.params))

    rows, bandwidths, steps = [], [], []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = held_out_prompts(target.tokenizer, batch, seed=batch)
        outputs, stats = {}, {}

        def run(name: str, gen: Generator, new: int):
            def go():
                outputs[name, new] = [c.completion_ids for c in gen.generate(prompts, max_new_tokens=new)]
                stats[name, new] = gen.last_stats
            return go

        runs = {"matvec": matvec}
        for name, gen in methods.items():
            runs[name] = run(name, gen, args.new)
        runs["plain first"] = run("plain", target, 1)
        if batch == 1:  # transformers' assisted generation takes one sequence
            for name, peer in peers.items():
                runs[name] = peer(prompts[0], args.new)
        log(f"batch {batch}: {', '.join(methods)}, in turn")
        times = interleaved_times(runs, args.repeats)
        bandwidth = matvec_bytes / min(times["matvec"])
        bandwidths.append(f"{bandwidth / 1e9:.1f} GB/s (batch {batch} rounds)")
        plain_rate = batch * args.new / statistics.median(times["plain"])
        step = (statistics.median(times["plain"]) - statistics.median(times["plain first"])) / (args.new - 1)
        steps.append(f"batch {batch}: {step * 1e3:.2f} ms (roofline {target_bytes / bandwidth * 1e3:.2f} ms)")
        for name in [*methods, *(peers if batch == 1 else ())]:
            if name in methods and outputs[name, args.new] != outputs["plain", args.new]:
                raise SystemExit(f"batch {batch}, {name}: the tokens differ from plain greedy decoding")
            ts = times[name]
            rate = batch * args.new / statistics.median(ts)
            s = stats.get((name, args.new))
            rows.append([str(batch), name, f"{rate:.0f}",
                         f"{batch * args.new / max(ts):.0f}-{batch * args.new / min(ts):.0f}",
                         f"{rate / plain_rate:.2f}x", "" if s is None else f"{s['acceptance_rate']:.0%}",
                         "" if s is None else f"{s['tokens_per_round']:.2f}"])

    print(f"Speculative decoding, target {args.target_layers} layers x {args.target_hidden} "
          f"({target_bytes / 2**20:.0f} MiB fp32), draft {args.draft_layers} x {args.draft_hidden} "
          f"({draft_bytes / 2**20:.0f} MiB), both trained {args.steps} steps on the quickstart corpus; held-out "
          f"code prompts of {PROMPT_TOKENS} tokens, {args.new} new tokens, greedy (tokens checked equal to plain), "
          f"{args.weights} decode weights, median of {args.repeats} runs")
    print(f"Machine: {machine()}; {versions()}")
    print(f"Memory bandwidth, the fastest fp32 matrix-vector product over 1 GiB in the same rounds: "
          f"{', '.join(bandwidths)}")
    print(f"The target's plain decode step (the roofline: its weights' bytes over that bandwidth): "
          f"{'; '.join(steps)}\n")
    print(markdown_table(["batch", "decoding", "new tok/s", "spread (min-max)", "vs plain", "draft accepted",
                          "tokens per target pass"], rows))


if __name__ == "__main__":
    started = time.perf_counter()
    with published("speculative"):
        main()
    log(f"done in {time.perf_counter() - started:.0f} s")
