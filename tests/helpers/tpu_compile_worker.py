"""The TPU compiler's view of flash attention, in its own process: libtpu's topology holds a lockfile for the life
of the process that made it, which would lock every later `bloom-jax plan` subprocess of the test session out.

Usage: tpu_compile_worker.py TOPOLOGY X,Y,Z. Prints JSON: per attention implementation ("flash", "blockwise",
"reference", and "flash_packed": flash over packed rows with segment ids), the temporary bytes of forward and
backward at 1 x 16 heads x 2048 x 64 in bf16 on one chip, and, for each flash, which of its three kernels the
compiled program calls and whether it holds any [2048, 2048] buffer.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bloom_jax.kernels import Kernels, attend
from bloom_jax.kernels.attention import AttentionMask

topology, bounds = sys.argv[1], tuple(int(x) for x in sys.argv[2].split(","))
devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                       chips_per_host_bounds=bounds, num_slices=1, wrap=(False, False, False)).devices
sharding = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), PartitionSpec())
b, n, s, h = 1, 16, 2048, 64
qkv = jax.ShapeDtypeStruct((b, n, s, h), jnp.bfloat16, sharding=sharding)
key_mask = jax.ShapeDtypeStruct((b, s), jnp.int32, sharding=sharding)
result = {}
for name in ("flash", "blockwise", "reference", "flash_packed"):
    kernels = Kernels.create("reference", name.removesuffix("_packed"), platform="tpu")
    packed = name.endswith("_packed")

    def loss(q, k, v, key_mask, segment_ids, kernels=kernels, packed=packed):
        mask = AttentionMask.create(key_mask, n, s, 0, dense=kernels.attention == "reference",
                                    segment_ids=segment_ids if packed else None)
        return jnp.sum(attend(kernels, q, k, v, mask, jnp.bfloat16).astype(jnp.float32))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, key_mask, key_mask).compile()
    result[name] = compiled.memory_analysis().temp_size_in_bytes
    if name.startswith("flash"):
        text = compiled.as_text()
        result[f"{name}_kernels"] = [k for k in ("alibi_flash_fwd", "alibi_flash_dkv", "alibi_flash_dq")
                                     if k in text]
        result[f"{name}_square"] = f"{s},{s}]" in text
print(json.dumps(result))
