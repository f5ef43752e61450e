"""Conversion: Hugging Face safetensors shards -> converted (Orbax) checkpoint, time and peak memory.

    python benchmarks/convert.py [--models bloom-560m,bloom-1b7] [--dtype bfloat16] [--workdir DIR]

For each architecture, writes a random fp16 checkpoint as the hub stores BLOOM (500 MB safetensors shards with an
index, no `transformer.` prefix), measures the disk's cold sequential read speed on those files, then runs
`bloom-jax convert` in a child process and reports its wall time (interpreter start and imports included), the
conversion's own time and MB/s of source converted, and peak resident memory
beside the largest source tensor (target: peak RSS <= 2 x largest tensor + 1 GiB, whatever the model's size).
Page caches of the source files are dropped (posix_fadvise) before each timed read.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import DOCS_FLAG, log, machine, markdown_table, published  # noqa: E402

from bloom_jax.checkpoints.hf import hf_tensor_shapes, plan_hf_tensors  # noqa: E402
from bloom_jax.checkpoints.hf_files import WeightFiles, write_safetensors  # noqa: E402
from bloom_jax.config import load_config  # noqa: E402
from bloom_jax.model import make_model  # noqa: E402

SHARD_BYTES = 500 * 10**6


def write_random_checkpoint(name: str, directory: Path) -> None:
    """A random fp16 checkpoint of preset `name`, as the hub stores BLOOM, written one tensor at a time."""
    config = load_config(name)
    config = config.replace(extra={**config.extra, "torch_dtype": "float16"})
    shapes = dict(hf_tensor_shapes(config))
    rng = np.random.default_rng(0)

    def read(tensor_name: str) -> np.ndarray:
        return (0.02 * rng.standard_normal(shapes[tensor_name], dtype=np.float32)).astype(np.float16)

    directory.mkdir(parents=True)
    write_safetensors(directory, list(shapes.items()), np.dtype(np.float16), SHARD_BYTES, read)
    config.to_json(directory / "config.json")


def drop_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def cold_read_speed(directory: Path) -> float:
    """Bytes/s of reading every safetensors file once, sequentially, from a dropped cache."""
    drop_cache(directory)
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(64 * 2**20):
                total += len(chunk)
    return total / (time.perf_counter() - start)


# The child reports its own high-water mark: ru_maxrss of a forked child would include the parent's memory.
_CHILD = ("import sys; from bloom_jax.cli import main; code = main(sys.argv[1:]); "
          "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]; "
          "print('VmHWM_KB', hwm, file=sys.stderr); sys.exit(code)")


def run_convert(src: Path, dst: Path, dtype: str) -> tuple[float, float, int]:
    """Wall seconds of `bloom-jax convert` in a child process (interpreter start and imports included), the
    seconds of the conversion itself (as the command reports them), and the child's peak RSS in bytes."""
    drop_cache(src)
    command = [sys.executable, "-c", _CHILD, "convert", str(src), str(dst), "--dtype", dtype]
    start = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"convert failed: {result.stderr.strip().splitlines()[-1:]}")
    hwm_kb = int(result.stderr.rsplit("VmHWM_KB", 1)[1].split()[0])
    return wall, json.loads(result.stdout)["seconds"], hwm_kb * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[DOCS_FLAG])
    parser.add_argument("--models", default="bloom-560m,bloom-1b7")
    parser.add_argument("--dtype", default="bfloat16", help="stored dtype of the conversion")
    parser.add_argument("--workdir", default=None, help="where to write checkpoints (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=3, help="conversions per model (medians; peak RSS: max)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bloom-jax-convert-", dir=args.workdir))
    rows, gib = [], 2**30
    try:
        for name in args.models.split(","):
            src, dst = workdir / f"{name}-hf", workdir / f"{name}-converted"
            log(f"{name}: writing a random fp16 checkpoint")
            write_random_checkpoint(name, src)
            files = WeightFiles(src)
            plan = plan_hf_tensors(files, make_model(load_config(src)))
            total = sum(t.nbytes for t in plan)
            largest = max(t.nbytes for t in plan)
            del files
            log(f"{name}: cold read speed")
            read_speed = cold_read_speed(src)
            runs = []
            for run in range(args.repeats):
                log(f"{name}: converting ({run + 1}/{args.repeats})")
                runs.append(run_convert(src, dst, args.dtype))
                shutil.rmtree(dst)
            wall = statistics.median(r[0] for r in runs)
            seconds = statistics.median(r[1] for r in runs)
            peak_rss = max(r[2] for r in runs)
            bound = 2 * largest + gib
            rows.append([name, f"{total / 1e9:.2f}", str(len(list(src.glob('*.safetensors')))),
                         f"{largest / gib:.2f}", f"{wall:.1f}", f"{seconds:.1f}", f"{total / seconds / 1e6:.0f}",
                         f"{read_speed / 1e6:.0f}", f"{peak_rss / gib:.2f}", f"{bound / gib:.2f}",
                         "yes" if peak_rss <= bound else "NO"])
            shutil.rmtree(src)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"Conversion of random fp16 safetensors (500 MB shards) to a {args.dtype} converted checkpoint; "
          f"medians of {args.repeats} runs, peak RSS the largest")
    print(f"Machine: {machine()}\n")
    print(markdown_table(["model", "source GB", "shards", "largest tensor GiB", "command s", "convert s", "MB/s",
                          "disk cold read MB/s", "peak RSS GiB", "2 x largest + 1 GiB", "within"], rows))


if __name__ == "__main__":
    with published("convert"):
        main()
