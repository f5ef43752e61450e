"""One process of the 2-process training test: `bloom-jax train RECIPE [KEY=VALUE ...]` joined to a 2-process run
(4 CPU devices each), where process 1 alone gets a real SIGTERM during step STOP_STEP: both must stop after it.

Usage: train_worker.py PORT PROCESS_ID STOP_STEP RECIPE [KEY=VALUE ...]
"""

import os
import signal
import sys

from bloom_jax.cli import main
from bloom_jax.train import Trainer

port, process_id, stop_step, recipe, *overrides = sys.argv[1:]
fetch_batch = Trainer._global_batch


def global_batch(self, batches, step, sharding):
    if process_id == "1" and step == int(stop_step) - 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the Trainer's handler notes it; the step still completes
    return fetch_batch(self, batches, step, sharding)


Trainer._global_batch = global_batch
sys.exit(main(["train", recipe, *overrides, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
               "--process-id", process_id, "--cpu-devices", "4"]))
