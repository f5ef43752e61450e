"""Shared pieces of the benchmarks: timing, the measured matmul peak, same-weights peer models, the machine, and
publishing a run's tables into the docs (`--docs`)."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def run_times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of `repeats` runs of `fn()` after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    return statistics.median(run_times(fn, repeats, warmup))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      pause: float = 0.5) -> dict[str, list[float]]:
    """Wall times of each `fns` entry, the entries run in turn `repeats` times (after `warmup` rounds), so that a
    shared machine's slow spells fall on all of them alike and their ratios hold. Each run starts `pause` seconds
    after the last: PyTorch's OpenMP threads spin for a while after their work, on the cores the next run needs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(pause)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def jax_matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """fp32 FLOP/s of a jitted n^3 matmul, measured now (the physical limit the model is compared to)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * n**3 / seconds


def jax_matvec(gib: float = 1.0) -> tuple[Callable[[], object], int]:
    """A jitted fp32 matrix-vector product over a `gib` GiB matrix, and the matrix's bytes: the speed at which
    XLA streams weights from memory, the limit of decoding one token."""
    import jax
    import jax.numpy as jnp

    cols = 1024
    matrix = jnp.ones((int(gib * 2**30) // (4 * cols), cols), jnp.float32)
    vector = jnp.ones((cols,), jnp.float32)
    matvec = jax.jit(lambda m, v: m @ v)
    return lambda: matvec(matrix, vector).block_until_ready(), matrix.nbytes


def torch_matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    """fp32 FLOP/s of PyTorch's n^3 matmul, measured now."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB"


def versions() -> str:
    import jax
    import torch
    import transformers

    return f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"


def torch_bloom(config, seed: int = 0):
    """transformers' PyTorch BloomForCausalLM of `config` with its own random init (seeded)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.BloomConfig(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    return transformers.BloomForCausalLM(hf_config)


def torch_and_ours(config, seed: int = 0):
    """transformers' PyTorch model (its own random init) and our (model, params) holding the same weights,
    passed through `save_pretrained` and our loader."""
    import tempfile

    from bloom_jax.checkpoints import load_hf_params
    from bloom_jax.model import make_model

    torch_model = torch_bloom(config, seed).eval()
    model = make_model(config)
    with tempfile.TemporaryDirectory() as directory:
        torch_model.save_pretrained(directory)
        params = load_hf_params(directory, model)
    return torch_model, model, params


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, vocab, size=(batch, seq), dtype=np.int32)


DOCS = Path(__file__).resolve().parent.parent / "docs"

# `argparse.ArgumentParser(parents=[DOCS_FLAG])` gives a benchmark the flag that `published` acts on.
DOCS_FLAG = argparse.ArgumentParser(add_help=False)
DOCS_FLAG.add_argument("--docs", action="store_true",
                       help="also write what this prints into its <!-- benchmark:NAME --> block under docs/")


class _Tee(io.TextIOBase):
    """A text stream that writes through to `stream` and keeps a copy."""

    def __init__(self, stream) -> None:
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def published(name: str, machine_line: str | None = None) -> Iterator[None]:
    """Prints as usual; with `--docs` on the command line, also puts what the block printed to stdout into the docs
    page that holds `<!-- benchmark:NAME -->` ... `<!-- /benchmark:NAME -->`, under the command and the date
    (and `machine_line`, for output that does not name its machine). Nothing is written if the block fails."""
    if "--docs" not in sys.argv[1:]:
        yield
        return
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}",
                          *(arg for arg in sys.argv[1:] if arg != "--docs")])
    header = f"`{command}`, {time.strftime('%Y-%m-%d')}" + (f"; {machine_line}" if machine_line else "")
    pages = [page for page in sorted(DOCS.rglob("*.md")) if begin_marker(name) in page.read_text()]
    if len(pages) != 1:
        raise SystemExit(f"--docs: {len(pages)} pages under {DOCS} hold {begin_marker(name)}; it must be one")
    pages[0].write_text(replace_block(pages[0].read_text(), name, header + ":\n\n" + as_markdown("".join(tee.parts))))
    log(f"wrote the {name} block of {pages[0]}")


def begin_marker(name: str) -> str:
    return f"<!-- benchmark:{name} -->"


def as_markdown(output: str) -> str:
    """A benchmark's printed lines as markdown: each line of prose its own paragraph, tables kept whole."""
    lines: list[str] = []
    for line in output.strip().splitlines():
        if lines and lines[-1] and line and not (line.startswith("|") and lines[-1].startswith("|")):
            lines.append("")
        lines.append(line)
    return "\n".join(lines)


def replace_block(page: str, name: str, body: str) -> str:
    """`page` with the text between NAME's begin and end markers replaced by `body` (the markers kept)."""
    begin, end = begin_marker(name), f"<!-- /benchmark:{name} -->"
    start, stop = page.find(begin), page.find(end)
    if start < 0 or stop < start:
        raise SystemExit(f"--docs: no {begin} ... {end} block to replace")
    return page[: start + len(begin)] + "\n\n" + body.strip() + "\n\n" + page[stop:]
