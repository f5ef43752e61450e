"""The fine-tuning picture of docs/lora.md: LoRA, QLoRA (int8 and nf4 bases) and a full fine-tune of one base on
the same new text, on this machine's CPU, their loss curves in one plot.

    pip install matplotlib && python scripts/lora_curve.py [--out docs/lora-loss.png] [--steps 60]

The base is the README's main job (the quickstart recipe: bloom-mini pretrained on the top-level modules of
Python's standard library, 120 steps), trained first unless --base names a checkpoint. Each fine-tune then reads
the `email` package's modules (text the base never saw), 8 x 128 tokens a step, in the same order. Results go to
stdout (a markdown table of first and last losses); the picture to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

RUNS = {  # label -> recipe overrides on top of the shared ones
    "full fine-tune": {"learning_rate": 3e-4},
    "LoRA r16, fp32 base": {"lora.rank": 16, "lora.base": "float32", "learning_rate": 3e-3},
    "QLoRA r16, int8 base": {"lora.rank": 16, "lora.base": "int8", "learning_rate": 3e-3},
    "QLoRA r16, nf4 base": {"lora.rank": 16, "lora.base": "nf4", "learning_rate": 3e-3},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/lora-loss.png")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--base", default=None, help="a converted checkpoint to fine-tune (default: train one)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bloom_jax.recipe import TrainConfig
    from bloom_jax.train import Trainer

    work = Path(tempfile.mkdtemp(prefix="bloom-jax-lora-curve-"))
    base = args.base
    if base is None:
        print("training the base (the quickstart recipe)", file=sys.stderr)
        Trainer(TrainConfig.from_yaml("quickstart", [f"output_dir={work / 'base'}"])).run()
        base = str(work / "base" / "final")
    shared = {"init_from": base, "train_data": ["{python_stdlib}/email/*.py"], "seq_len": 128, "batch_size": 8,
              "steps": args.steps, "warmup_steps": 5, "eval_fraction": 0.2, "eval_every": args.steps,
              "save_every": args.steps, "log_every": 1, "mesh": "data=-1", "rules": "fsdp", "weight_decay": 0.0,
              "scan_layers": False, "data_cache": str(work / "data-cache")}
    curves = {}
    for label, overrides in RUNS.items():
        print(f"fine-tuning: {label}", file=sys.stderr)
        output = work / label.split(",")[0].replace(" ", "-")
        cfg = TrainConfig.from_dict({**shared, **overrides, "output_dir": str(output)})
        Trainer(cfg).run()
        curves[label] = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, metrics in curves.items():
        ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label=label)
    ax.set_xlabel("step (8 x 128 tokens)")
    ax.set_ylabel("training loss (nats per token)")
    ax.set_title("bloom-mini fine-tuned on new text, CPU")
    ax.legend()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100, bbox_inches="tight")
    print(f"| run | first 5 steps | last 5 steps | held-out at step {args.steps} |")
    print("|---|---|---|---|")
    for label, metrics in curves.items():
        losses = [m["loss"] for m in metrics]
        print(f"| {label} | {sum(losses[:5]) / 5:.3f} | {sum(losses[-5:]) / 5:.3f} | {metrics[-1]['eval_loss']:.3f} |")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
