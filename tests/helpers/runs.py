"""The training runs the tests share: run A's recipe (`RECIPE`), what a run leaves in its OUTPUT_DIR (metrics,
checkpoints, final weights), and JAX's persistent compilation cache, which lets the runs after A skip compiling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import yaml

from bloom_jax import from_pretrained
from bloom_jax.runtime import enable_compilation_cache

MESH = "data=2,fsdp=2,tensor=2"
# Run A: bloom-tiny (vocab 1024, hidden 64, 2 layers, 8 heads) on json/*.py (5 documents, ~48 KB; one held out),
# with a 512-token BPE the Trainer trains itself.
RECIPE = dict(model="bloom-tiny", train_data=["{python_stdlib}/json/*.py"], tokenizer_vocab_size=512, seq_len=32,
              eval_fraction=0.2, batch_size=8, steps=24, learning_rate=3e-3, warmup_steps=4, mesh=MESH,
              rules="fsdp_tensor", save_every=8, keep=3, eval_every=12, eval_batches=2, log_every=1,
              peak_tflops=1.0)
TIMING = ("time", "tokens_per_s", "mfu")  # the wall-clock figures of a metrics line


def write_recipe(path: Path, **changes) -> Path:
    """RECIPE with `changes` as a YAML recipe file at `path`."""
    path.write_text(yaml.safe_dump({**RECIPE, **changes}))
    return path


def read_metrics(output_dir: Path) -> list[dict]:
    """The lines of a run's metrics.jsonl."""
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(metrics: list[dict]) -> list[dict]:
    """Metrics lines without their wall-clock figures: what two runs of the same steps share bit for bit (CPU)."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def checkpoint_steps(output_dir: Path) -> list[int]:
    """The steps of a run's committed checkpoints."""
    return sorted(int(p.name) for p in (output_dir / "checkpoints").iterdir() if p.name.isdigit())


def same_final_weights(output_dir: Path, reference_dir: Path) -> bool:
    """Whether two runs' final/ checkpoints hold the same weights, bit for bit."""
    _, ours = from_pretrained(output_dir / "final")
    _, ref = from_pretrained(reference_dir / "final")
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), ours, ref))


@contextlib.contextmanager
def persistent_compilation_cache(directory: Path):
    """JAX's persistent compilation cache in `directory` for the block (then the previous settings back)."""
    from jax._src import compilation_cache as jax_cache  # reset_cache: so that the directory set here applies

    flags = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in flags}
    jax_cache.reset_cache()
    enable_compilation_cache(directory)
    try:
        yield
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()


def two_processes(recipe: Path, overrides: list[str], stop_step: int = 0, env: list[dict] | None = None
                  ) -> list[tuple[str, str]]:
    """`bloom-jax train RECIPE OVERRIDES` as a 2-process run, 4 CPU devices each (train_worker.py; process 1 gets
    SIGTERM during `stop_step`, 0: never), each process's environment updated with `env[i]`; asserts both
    succeeded and returns their (stdout, stderr)."""
    from commands import WORKERS, free_port

    port, worker = free_port(), WORKERS / "train_worker.py"
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(port), str(i), str(stop_step), str(recipe),
                               *overrides], env={**base, **(env[i] if env else {})}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return outputs
