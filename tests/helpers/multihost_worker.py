"""One process of the 2-process test: restore a converted checkpoint onto a mesh spanning both processes, run a
sharded forward, and save the sharded parameters again (each process its own shards), twice.
Usage: multihost_worker.py PORT PROCESS_ID CHECKPOINT IDS.npy MASK.npy OUT.npy SAVED_DIR"""

import sys

import numpy as np

from bloom_jax.distributed import initialize

port, process_id, checkpoint, ids_path, mask_path, out_path, saved_dir = sys.argv[1:]
initialize(f"127.0.0.1:{port}", 2, int(process_id), cpu_devices_per_process=4)

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from bloom_jax.checkpoints import from_pretrained, save_pretrained  # noqa: E402
from bloom_jax.sharding import load_rules, make_mesh, sharded_forward  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4
mesh, rules = make_mesh("data=2,fsdp=2,tensor=2"), load_rules("fsdp_tensor")
model, params = from_pretrained(checkpoint, mesh=mesh)
ids, mask = np.load(ids_path), np.load(mask_path)
batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
ids_g = jax.make_array_from_callback(ids.shape, batch, lambda index: ids[index])
mask_g = jax.make_array_from_callback(mask.shape, batch, lambda index: mask[index])
logits = sharded_forward(model, mesh, rules)(params, ids_g, mask_g)
logits = multihost_utils.process_allgather(logits, tiled=True)
if jax.process_index() == 0:
    np.save(out_path, np.asarray(logits))
save_pretrained(params, model.config, saved_dir)
# Saved again over it: nothing of the first save's directory survives, not even a file it did not write.
if jax.process_index() == 0:
    with open(f"{saved_dir}/stale.json", "w") as f:
        f.write("{}")
multihost_utils.sync_global_devices("stale file written")
save_pretrained(params, model.config, saved_dir, overwrite=True)
