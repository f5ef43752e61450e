"""The notebooks of notebooks/: committed without outputs, and each executed top to bottom on CPU, offline.

The execution tests build once (module fixture) what the notebooks' CI mode reads instead of the hub: a tiny random
transformers BLOOM saved as a Hugging Face directory with a byte-level BPE `tokenizer.json` trained on a small
JSONL corpus, and that corpus. Each notebook then runs in its own Jupyter kernel (this interpreter, through nbclient)
in a fresh working directory, with its parameters given as environment variables:

- BLOOM_JAX_NOTEBOOK_CI=1: no install, tiny sizes, HF_HUB_OFFLINE=1, and what each notebook scales down in CI;
- BLOOM_JAX_NOTEBOOK_MODEL: the tiny Hugging Face directory; BLOOM_JAX_NOTEBOOK_DATA: the corpus directory.

The kernel inherits this process's environment, so it sees conftest's XLA_FLAGS (8 simulated CPU devices, which
make the mesh cells shard for real); the notebooks' CI mode would ask for 8 on its own if the flag were absent.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ("quickstart", "finetune", "big_checkpoints")
CELL_TIMEOUT_S = 300
ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def test_committed_notebooks_have_no_outputs():
    """Outputs are stripped in git: no outputs, no execution counts (read as plain JSON, no Jupyter needed)."""
    for name in NOTEBOOKS:
        notebook = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
        assert notebook["nbformat"] == 4
        code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
        assert code_cells, name
        for index, cell in enumerate(code_cells):
            source = "".join(cell["source"])
            assert cell.get("outputs") == [], f"{name}.ipynb code cell {index} has outputs:\n{source[:200]}"
            assert cell.get("execution_count") is None, f"{name}.ipynb code cell {index} has an execution count"
        # The first code cell reads the parameters from the environment (the test drives the notebook by them).
        assert "BLOOM_JAX_NOTEBOOK_CI" in "".join(code_cells[0]["source"]), name


# -- executing the notebooks ---------------------------------------------------------------------------------------
SUBJECTS = ["The old lighthouse keeper", "A curious fox", "The river", "Our village baker", "The night train",
            "A young astronomer", "The quiet library", "My grandmother", "The harbour crane", "A lost kite"]
VERBS = ["watched", "followed", "remembered", "painted", "carried", "counted", "listened to", "dreamed of"]
OBJECTS = ["the stars above the sea", "the first snow of winter", "a letter from far away", "the bells at noon",
           "the smell of fresh bread", "the long road north", "a map of forgotten islands", "the autumn rain"]
ENDINGS = ["and smiled.", "until morning came.", "without a word.", "while the wind rose.", "for many years."]


def write_corpus(directory: Path, documents: int = 48, seed: int = 0) -> Path:
    """A JSONL corpus of short made-up stories (one document per line), about 35 kB."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "stories.jsonl", "w") as f:
        for _ in range(documents):
            sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
                         for _ in range(rng.randint(8, 14))]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny Hugging Face checkpoint (with tokenizer.json), its corpus, and a Jupyter kernel spec for this
    interpreter (so the kernel is the test's Python, whatever `python` on PATH is)."""
    from reference import hf_model, save_hf, tiny_config

    from bloom_jax.data import iter_documents
    from bloom_jax.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("notebook-assets")
    data = write_corpus(root / "data")
    config = tiny_config()  # vocab 512, hidden 64, 2 layers, 8 heads
    model_dir = save_hf(hf_model(config, linear_gain=3.0), root / "tiny-bloom")
    train_tokenizer(iter_documents([data]), vocab_size=config.vocab_size).save(model_dir)
    kernel_dir = root / "jupyter" / "kernels" / "python3"
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    return {"root": root, "data": data, "model": model_dir, "jupyter": root / "jupyter"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_outside_a_clone_says_what_to_set(name, tmp_path):
    """Opened on its own (no clone around it, bloom-jax not installed: `python -S` hides site-packages), the
    install cell stops with one line saying what to set, not a traceback."""
    import subprocess

    notebook = json.loads((NOTEBOOKS_DIR / f"{name}.ipynb").read_text())
    install = next("".join(c["source"]) for c in notebook["cells"]
                   if c["cell_type"] == "code" and "".join(c["source"]).startswith("# Installs bloom-jax"))
    (tmp_path / "nb").mkdir()
    result = subprocess.run([sys.executable, "-S", "-c", f"CI, PIP_SPEC = False, ''\n{install}"],
                            cwd=tmp_path / "nb", capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "bloom-jax is not installed: set PIP_SPEC in the first cell (or BLOOM_JAX_NOTEBOOK_PIP) to "
        "'git+https://<its git host>/bloom-jax' or a clone's path, then run this cell again"]


def run_notebook(name: str, assets: dict[str, Path], cwd: Path, monkeypatch):
    """Executes notebooks/NAME.ipynb top to bottom in `cwd` in CI mode; returns the executed notebook, or fails
    the test with the failing cell's source and error."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    settings = {
        "BLOOM_JAX_NOTEBOOK_CI": "1", "BLOOM_JAX_NOTEBOOK_MODEL": str(assets["model"]),
        "BLOOM_JAX_NOTEBOOK_DATA": str(assets["data"]), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu",
        "MPLBACKEND": "Agg", "JUPYTER_PATH": str(assets["jupyter"]),
        "JUPYTER_RUNTIME_DIR": str(assets["root"] / "jupyter-runtime"), "IPYTHONDIR": str(assets["root"] / "ipython"),
    }
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S, startup_timeout=120,
                            resources={"metadata": {"path": str(cwd)}})
    error = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as e:  # the failing cell's source and its traceback
        error = ANSI_COLOUR.sub("", str(e))
    if error is not None:  # failed outside the handler, so the report holds the cell's error once
        pytest.fail(f"{name}.ipynb failed:\n{error}", pytrace=False)
    return notebook


def printed(notebook) -> str:
    """Everything the notebook's code cells printed, stdout and stderr."""
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream")


@pytest.mark.slow
def test_quickstart(assets, tmp_path, monkeypatch):
    notebook = run_notebook("quickstart", assets, tmp_path, monkeypatch)
    text = printed(notebook)
    assert "backend 'cpu', 8 x cpu" in text
    assert "'tensor': 8" in text  # 8 heads over 8 devices: tensor parallel
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"prompt"')]
    assert [line["prompt"] for line in lines] == ["Hello, my name is", "La capitale de la France est",
                                                  "def fibonacci(n):"]
    assert all(0 < len(line["completion_ids"]) <= 12 for line in lines)


@pytest.mark.slow
def test_finetune(assets, tmp_path, monkeypatch):
    notebook = run_notebook("finetune", assets, tmp_path, monkeypatch)
    workdir = tmp_path / "bloom-jax-finetune"
    run = workdir / "runs" / "finetune"
    # LoRA by default: the final output and the export are peft adapter directories.
    for adapter in (run / "final", workdir / "adapter-peft"):
        assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert metrics[-1]["loss"] < metrics[0]["loss"] and "eval_loss" in metrics[-1]
    text = printed(notebook)
    assert "before fine-tuning" in text and "after fine-tuning" in text
    # peft, on transformers' model, loads the exported adapter and gives our logits (fp32 on CPU)
    difference = float(re.search(r"peft's logits vs ours: max difference (\S+) of the largest", text).group(1))
    assert difference <= 2e-5
    # Progress bars are Jupyter widgets (tqdm.auto), not text nor hidden: tokenizing and training show one each.
    widgets = [out for c in notebook.cells for out in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in out.get("data", {})]
    assert len(widgets) >= 2 and "tokenizing" in str(widgets) and "training" in str(widgets)
    plotted = any(out.output_type == "display_data" for c in notebook.cells for out in c.get("outputs", []))
    assert plotted or "matplotlib is not installed" in text
    # Instruction tuning: 48 steps on the 48 shipped examples; the loss on the answers falls by more than 5 nats
    # (13.1 to 2.3, measured). A model of hidden size 64 with a tokenizer of 512 stories' tokens learns few exact
    # answers (2 of 48, measured, the random base none): counted, not held to a number.
    sft = [json.loads(line) for line in (workdir / "runs" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(sft) == 48 and sft[-1]["loss"] < sft[0]["loss"] - 5.0 and "eval_loss" in sft[-1]
    assert "48 examples (prompt_completion)" in text
    before, after = (int(n) for n in re.search(r"exact answers: before (\d+) of 48, after (\d+) of 48", text).groups())
    assert after >= before, text[text.find("48 examples"):]


@pytest.mark.slow
def test_big_checkpoints(assets, tmp_path, monkeypatch):
    notebook = run_notebook("big_checkpoints", assets, tmp_path, monkeypatch)
    converted = tmp_path / "bloom-jax-big" / "converted"
    assert (converted / "params" / "_METADATA").is_file() and (converted / "tokenizer.json").is_file()
    text = printed(notebook)
    assert "| bloom-mini | train | fsdp=2,tensor=2 |" in text
    assert "'fsdp': 2, 'tensor': 4" in text  # loaded over 8 devices: fsdp x tensor
