"""A LoRA run's adapters as peft adapter directories naming the run's base: the final one (OUTPUT_DIR/final),
and any checkpoint's, exported later from the run's settings (OUTPUT_DIR/adapter_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from bloom_jax import storage
from bloom_jax.checkpoints import checkpoint_location, read_model_config
from bloom_jax.checkpoints.peft import adapter_config_json, lora_config_of, read_adapter_config, save_adapter
from bloom_jax.config import BloomConfig
from bloom_jax.disk_faults import write_failure
from bloom_jax.errors import BloomJaxError
from bloom_jax.lora import LoraConfig
from bloom_jax.sharding import ShardingPlan
from bloom_jax.storage import Location, join
from bloom_jax.tokenizer import Tokenizer

RUN_ADAPTER_CONFIG = "adapter_config.json"  # a LoRA run's settings in its output_dir, for export_run_adapter


def write_run_adapter_config(output_dir: Location, lora: LoraConfig, base: str | None) -> None:
    """The run's LoRA settings and base as OUTPUT_DIR/adapter_config.json (by process 0), for
    `export_run_adapter`; a full or unwritable disk, or a fault on the wire, is one `BloomJaxError`."""
    if jax.process_index() != 0:
        return
    path = join(output_dir, RUN_ADAPTER_CONFIG)
    try:
        storage.write_bytes(path, (json.dumps(adapter_config_json(lora, base), indent=2) + "\n").encode())
    except OSError as error:
        raise write_failure(error, Path(path)) from None


def save_run_adapters(adapters: dict, plan: ShardingPlan, lora: LoraConfig, model_config: BloomConfig,
                      base: str | None, tokenizer: Tokenizer, dst: Location) -> None:
    """The adapters as a peft directory naming `base`, with the tokenizer, written by process 0 (they are small:
    gathered whole to every process first)."""
    with plan.context():
        whole = jax.jit(lambda x: x, out_shardings=plan.replicated)(adapters)
    if jax.process_index() == 0:
        save_adapter(jax.tree.map(np.asarray, whole), lora, model_config, dst, base_model_name_or_path=base,
                     overwrite=True)
        tokenizer.save(dst)


def export_run_adapter(run_dir: Location, dst: Location, step: int | None = None, overwrite: bool = False) -> int:
    """A LoRA run's adapters at checkpoint `step` (default: the newest) as a peft adapter directory at `dst`,
    naming the run's base; either may be a local path or a URL. Returns the step."""
    ocp = storage.orbax()
    run = storage.normalize(run_dir)
    if not storage.is_dir(join(run, "checkpoints")) or not storage.is_file(join(run, RUN_ADAPTER_CONFIG)):
        raise BloomJaxError(f"{run_dir} is not the output_dir of a LoRA run (no checkpoints/ and "
                            f"{RUN_ADAPTER_CONFIG})")
    peft_config = read_adapter_config(run)
    lora = lora_config_of(peft_config, join(run, RUN_ADAPTER_CONFIG))
    lora = LoraConfig(lora.rank, lora.alpha, lora.dropout, tuple(peft_config["target_modules"]), lora.use_rslora)
    base = peft_config.get("base_model_name_or_path")
    with ocp.CheckpointManager(storage.orbax_path(join(run, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        steps = manager.all_steps()
        step = max(steps) if step is None and steps else step
        if step not in steps:
            raise BloomJaxError(f"{run_dir} has no checkpoint of step {step} (it has {sorted(steps) or 'none'})")
        adapters = manager.restore(step, args=ocp.args.StandardRestore())["params"]
    save_adapter(jax.tree.map(np.asarray, adapters), lora, read_model_config(checkpoint_location(base)), dst,
                 base_model_name_or_path=base, overwrite=overwrite)
    return step
