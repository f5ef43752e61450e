"""The layout tells the design: each module imports only rooms below it, none reaches into another's privates,
and the model imports nothing of training, checkpoints or generation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "bloom_jax"

# Lowest first. A module may import modules of earlier rows only (at module level or inside a function).
LAYERS = [
    ["errors", "log", "platforms"],
    ["config", "devices", "runtime", "distributed", "kernels.flash", "disk_faults"],
    ["storage"],
    ["records"],
    ["tokenizer", "chat", "recipe", "cache", "lora", "quantize", "kernels.attention", "kernels.decode_matmul",
     "kernels.pick", "kernels.barriers", "metrics"],
    ["kernels", "data"],
    ["weights", "sampling", "sft"],
    ["model"],
    ["losses", "sharding", "train.optimizer", "speculative"],
    ["checkpoints.storage", "checkpoints.hub", "checkpoints.hf_files", "train.step"],
    ["checkpoints.hf"],
    ["checkpoints.converted"],
    ["checkpoints.pretrained"],
    ["checkpoints.pipelines"],
    ["checkpoints", "checkpoints.peft"],
    ["generate", "train.state", "train.checkpointing", "train.adapters", "train.evaluation",
     "serving.metrics"],
    ["train.trainer", "plan", "serving.batch"],
    ["train", "serving.engine"],
    ["serving.protocol"],
    ["serving", "serving.app"],
    ["cli"],
]
LAYER_OF = {f"bloom_jax.{name}": i for i, row in enumerate(LAYERS) for name in row}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, str | None]]:
    """(module, imported name or None) for every `bloom_jax` import anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("bloom_jax")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bloom_jax"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                path = PACKAGE.parent / submodule.replace(".", "/")
                if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
                    found.append((submodule, None))  # `from bloom_jax import devices`
                else:
                    found.append((node.module, alias.name))
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    assert set(MODULES) - {"bloom_jax"} == set(LAYER_OF)


def test_imports_point_down_and_not_into_privates():
    wrong = []
    for name, path in MODULES.items():
        for module, imported in imports_of(path):
            if name == "bloom_jax":  # its names load lazily; platforms must act before JAX starts
                if module != "bloom_jax.platforms":
                    wrong.append(f"the package root imports {module} (its names load lazily)")
            elif module != "bloom_jax" and LAYER_OF[module] >= LAYER_OF[name]:
                wrong.append(f"{name} imports {module}, which is not below it")
            if imported is not None and imported.startswith("_") and imported != "__version__":
                wrong.append(f"{name} imports the private {module}.{imported}")
    assert not wrong, "\n".join(wrong)


def test_the_model_loads_alone():
    code = "import sys, bloom_jax.model; print(sorted(m for m in sys.modules if m.startswith('bloom_jax')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["bloom_jax", "bloom_jax.cache", "bloom_jax.config", "bloom_jax.errors",
                            "bloom_jax.kernels", "bloom_jax.kernels.attention", "bloom_jax.kernels.barriers",
                            "bloom_jax.kernels.decode_matmul", "bloom_jax.kernels.flash", "bloom_jax.kernels.pick",
                            "bloom_jax.lora",
                            "bloom_jax.model", "bloom_jax.platforms", "bloom_jax.quantize", "bloom_jax.weights"]


def test_a_recipe_loads_without_jax():
    code = "import sys, bloom_jax.recipe; print('jax' in sys.modules, 'flax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.split() == ["False", "False"]


def test_the_package_root_loads_its_modules_on_first_use():
    # As a package that imported its modules eagerly would: `import bloom_jax` then `bloom_jax.model.X`.
    code = ("import sys, bloom_jax; before = 'jax' in sys.modules; "
            "print(before, bloom_jax.model.stack_layers.__name__, bloom_jax.distributed.initialize.__name__, "
            "bloom_jax.from_pretrained.__module__, hasattr(bloom_jax, 'no_such_room'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "stack_layers", "initialize", "bloom_jax.checkpoints.pretrained", "False"]


def test_the_version_is_the_declared_one():
    import tomllib

    import bloom_jax

    declared = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["version"]
    assert bloom_jax.__version__ == declared
