"""Device meshes and the logical-to-mesh sharding rules for parameters and activations.

A mesh is named by a spec such as `data=2,fsdp=-1,tensor=4` (axes outermost first: `slice`, `data`, `fsdp`,
`tensor`; -1 takes the devices left over). Rules map the logical axis names that `bloom_jax.model` puts on every
parameter and block-boundary activation to mesh axes; the presets live in `configs/sharding/*.yaml`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import yaml
from jax.sharding import AxisType, Mesh

from bloom_jax.config import configs_dir
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params

MESH_AXES = ("slice", "data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]


def parse_mesh_spec(spec: str, n_devices: int) -> dict[str, int]:
    """Axis sizes from `data=2,fsdp=-1,tensor=4`: missing axes are 1, one axis may be -1 (the rest)."""
    sizes = mesh_spec_sizes(spec)
    free = [name for name, size in sizes.items() if size == -1]
    known = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if n_devices % known:
            raise BloomJaxError(f"mesh: {n_devices} devices do not divide into {spec!r}")
        sizes[free[0]] = n_devices // known
    elif known != n_devices:
        raise BloomJaxError(f"mesh: {spec!r} has {known} devices, but there are {n_devices}")
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def mesh_spec_sizes(spec: str) -> dict[str, int]:
    """The sizes a spec names, checked (-1 kept, at most one); axes it does not name are absent."""
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in MESH_AXES:
            raise BloomJaxError(f"mesh: unknown axis {name!r} (axes: {', '.join(MESH_AXES)})")
        if name in sizes:
            raise BloomJaxError(f"mesh: axis {name!r} given twice")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise BloomJaxError(f"mesh: {part!r} is not AXIS=SIZE") from None
        if sizes[name] == 0 or sizes[name] < -1:
            raise BloomJaxError(f"mesh: axis {name!r} must be positive or -1, got {sizes[name]}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise BloomJaxError(f"mesh: only one axis may be -1, got {', '.join(free)}")
    return sizes


def make_mesh(spec: str = "fsdp=-1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) from a spec string, with Auto axes for logical sharding rules."""
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rule_names() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "sharding").glob("*.yaml"))


def load_rules(name: str = "fsdp_tensor") -> Rules:
    """A preset of `configs/sharding/` as Flax logical axis rules: (logical name, mesh axes or None)."""
    path = configs_dir() / "sharding" / f"{name}.yaml"
    if not path.is_file():
        raise BloomJaxError(f"no sharding rules named {name!r} (presets: {', '.join(rule_names())})")
    data = yaml.safe_load(path.read_text())
    rules = []
    for section in ("params", "activations"):
        for logical, axes in (data.get(section) or {}).items():
            rules.append((logical, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(rules)


def fit_rules(rules: Rules, mesh: Mesh) -> Rules:
    """The rules without the mesh axes `mesh` lacks (a missing axis acts as an axis of size 1), so that a
    preset also serves a user's own mesh, say one with a single `data` axis."""
    fitted = []
    for logical, axes in rules:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a in mesh.axis_names)
        fitted.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(fitted)


def fit_batch(rules: Rules, mesh: Mesh, batch: int) -> Rules:
    """`rules` (fitted to `mesh`) for a batch of `batch` rows. A batch that does not divide over the batch's mesh
    axes (generation at batch 1 on a data-parallel mesh) is replicated, and the KV cache's batch x heads axis is
    then split as the heads alone."""
    by_name = dict(rules)
    axes = by_name.get("activation_batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    if batch % math.prod(mesh.shape[a] for a in axes) == 0:
        return rules
    replace = {"activation_batch": None, "activation_batch_heads": by_name.get("activation_heads")}
    return tuple((name, replace.get(name, value)) for name, value in rules)


def logical_to_sharding(specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a pytree of logical PartitionSpecs."""
    return nn.logical_to_mesh_sharding(specs, mesh, list(fit_rules(rules, mesh)))


def param_shardings(model: BloomForCausalLM, mesh: Mesh, rules: Rules) -> Any:
    """The NamedSharding of every parameter, checked: each sharded dimension divides by its mesh axes."""
    boxed = abstract_params(model)
    shardings = logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    shapes = nn.unbox(boxed)
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                       jax.tree.leaves(shardings)):
        for dim, axes in zip(shape.shape, sharding.spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            size = math.prod(mesh.shape[a] for a in axes)
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise BloomJaxError(
                    f"sharding: {name} has a dimension of {dim}, not divisible by mesh axes {'x'.join(axes)} = {size}"
                )
    return shardings


def init_sharded(model: BloomForCausalLM, rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
    """Random parameters born sharded: `jax.jit` of init with the rules' out_shardings (never whole on a device)."""
    import jax.numpy as jnp

    shardings = param_shardings(model, mesh, rules)

    def init(rng):
        return nn.unbox(model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"])

    with jax.set_mesh(mesh), nn.logical_axis_rules(list(fit_rules(rules, mesh))):
        return jax.jit(init, out_shardings=shardings)(rng)


def sharded_forward(model: BloomForCausalLM, mesh: Mesh, rules: Rules):
    """A jitted `(params, input_ids_bs, attention_mask_bs) -> logits_bsv` whose activations follow `rules`."""
    forward = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask))

    def run(params, input_ids_bs, attention_mask_bs):
        with jax.set_mesh(mesh), nn.logical_axis_rules(list(fit_rules(rules, mesh))):
            return forward(params, input_ids_bs, attention_mask_bs)

    return run
