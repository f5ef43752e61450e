"""Training and fine-tuning: one jitted, sharded train step, and the loop around it.

- `optimizer`: `make_optimizer`, AdamW with warmup then cosine or linear decay (`learning_rate_schedule`),
  global-norm clipping, and no weight decay on LayerNorms and biases (`decay_mask`); `optimizer_shardings`.
- `step`: `train_step`, the loss and gradients of `grad_accum` micro-batches (a `lax.scan`), then one optimizer
  update; the state is donated. Its health, and `peak_flops_per_device` for MFU.
- `state`: the train state's shapes and shardings, the state a run starts from, a LoRA run's frozen base.
- `checkpointing`: the run's Orbax checkpoints (async saves every N steps, the last K kept, the newest that
  restores), a full or unwritable disk and a damaged checkpoint each reported as one line.
- `trainer`: `Trainer`, the loop: data by step, metrics (progress bar, JSONL, TensorBoard, eval), a save on
  SIGTERM, exact resume, OUTPUT_DIR/final.
- `adapters`: a LoRA run's adapters as peft directories naming its base; `export_run_adapter`.
- `evaluation`: `evaluate`, a checkpoint's perplexity on text.

The settings of a run are a `TrainConfig` (`bloom_jax.recipe`). LoRA (`lora.rank > 0`, `bloom_jax.lora`): the
base of `init_from` is frozen in `lora.base`'s dtype and passed to the step beside the state, whose parameters are
the adapters alone, and the final output is a peft adapter directory naming its base.
"""

from bloom_jax.train.adapters import export_run_adapter
from bloom_jax.train.evaluation import evaluate
from bloom_jax.train.optimizer import decay_mask, learning_rate_schedule, make_optimizer, optimizer_shardings
from bloom_jax.train.step import peak_flops_per_device, train_step
from bloom_jax.train.trainer import Trainer

__all__ = [
    "Trainer", "decay_mask", "evaluate", "export_run_adapter", "learning_rate_schedule", "make_optimizer",
    "optimizer_shardings", "peak_flops_per_device", "train_step",
]
