"""Device meshes and the logical-to-mesh sharding rules for parameters and activations.

A mesh is named by a spec such as `data=2,fsdp=-1,tensor=4` (axes outermost first: `slice`, `data`, `fsdp`,
`tensor`; -1 takes the devices left over). Rules map the logical axis names that `bloom_jax.model` puts on every
parameter and block-boundary activation to mesh axes; the presets live in `configs/sharding/*.yaml`.
`ShardingPlan` joins a mesh and its rules: every sharding of a run, and the context of its compiled calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import yaml
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from bloom_jax.config import configs_dir
from bloom_jax.errors import BloomJaxError
from bloom_jax.model import BloomForCausalLM, abstract_params, init_params

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
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(tuple(sizes.values()), MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:  # a TPU slice whose physical axes the sizes do not match (tensor=4 on 8x8)
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


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
        kept = tuple(a for a in _axes_tuple(axes) if a in mesh.axis_names)
        fitted.append((logical, kept[0] if len(kept) == 1 else (kept or None)))
    return tuple(fitted)


def _axes_tuple(axes: str | Sequence[str] | None) -> tuple[str, ...]:
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Where everything goes on a mesh: the logical rules fitted to it, the parameters' shardings, the batch's,
    and the context that compiled calls run in.

    >>> plan = ShardingPlan.create(make_mesh("fsdp=2,tensor=4"), "fsdp_tensor")
    >>> params = jax.device_put(params, plan.param_shardings(model))
    >>> with plan.for_batch(1).context():
    ...     logits = jax.jit(forward)(params, input_ids)

    `rules` are already fitted to `mesh` (use `create`). A plan is hashable; parameter shardings are computed once
    per model.
    """

    mesh: Mesh
    rules: Rules

    @classmethod
    def create(cls, mesh: Mesh, rules: str | Sequence = "fsdp_tensor") -> ShardingPlan:
        """The plan for `mesh` under `rules`: a preset name of `configs/sharding/` or (logical, mesh axes) pairs."""
        return cls(mesh, fit_rules(load_rules(rules) if isinstance(rules, str) else tuple(rules), mesh))

    def for_batch(self, batch: int) -> ShardingPlan:
        """This plan for a batch of `batch` rows. A batch that does not divide over the batch's mesh axes
        (generation at batch 1 on a data-parallel mesh) is replicated, and the KV cache's batch x heads axis is
        then split as the heads alone."""
        by_name = dict(self.rules)
        if batch % math.prod(self.mesh.shape[a] for a in _axes_tuple(by_name.get("activation_batch"))) == 0:
            return self
        replace = {"activation_batch": None, "activation_batch_heads": by_name.get("activation_heads")}
        return ShardingPlan(self.mesh, tuple((name, replace.get(name, axes)) for name, axes in self.rules))

    def context(self) -> contextlib.AbstractContextManager:
        """The mesh and the logical rules, around tracing and running compiled calls."""
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(list(self.rules)))
        return stack

    def shardings(self, logical_specs: Any) -> Any:
        """NamedShardings for a pytree of logical PartitionSpecs."""
        return nn.logical_to_mesh_sharding(logical_specs, self.mesh, list(self.rules))

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def batch_sharding(self, ndim: int = 2) -> NamedSharding:
        """The sharding of an array [b, ...] of `ndim` axes split by rows, such as token ids [b, s]."""
        return self.shardings(PartitionSpec("activation_batch", *(None,) * (ndim - 1)))

    def param_shardings(self, model: BloomForCausalLM) -> Any:
        """The NamedSharding of every parameter, checked: each sharded dimension divides by its mesh axes."""
        return _param_shardings(self, model)

    def abstract_params(self, model: BloomForCausalLM) -> Any:
        """The parameters' shapes and dtypes, each with its sharding (what an AOT compile or a restore takes)."""
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            nn.unbox(abstract_params(model)), self.param_shardings(model))


@functools.lru_cache(maxsize=64)
def _param_shardings(plan: ShardingPlan, model: BloomForCausalLM) -> Any:
    boxed = abstract_params(model)
    shardings = plan.shardings(nn.get_partition_spec(boxed))
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(boxed)),
                                       jax.tree.leaves(shardings)):
        for dim, axes in zip(shape.shape, sharding.spec):
            size = math.prod(plan.mesh.shape[a] for a in _axes_tuple(axes))
            if dim % size:
                name = "/".join(str(getattr(k, "key", k)) for k in path)
                raise BloomJaxError(f"sharding: {name} has a dimension of {dim}, not divisible by mesh axes "
                                    f"{'x'.join(_axes_tuple(axes))} = {size}")
    return shardings


def init_sharded(model: BloomForCausalLM, rng: jax.Array, mesh: Mesh, rules: str | Rules = "fsdp_tensor") -> Any:
    """Random parameters born sharded: `jax.jit` of init with the rules' out_shardings (never whole on a device)."""
    plan = ShardingPlan.create(mesh, rules)
    shardings = plan.param_shardings(model)
    with plan.context():
        return jax.jit(init_params, static_argnums=0, out_shardings=shardings)(model, rng)


def sharded_forward(model: BloomForCausalLM, mesh: Mesh, rules: str | Rules = "fsdp_tensor"):
    """A jitted `(params, input_ids, attention_mask) -> logits` whose activations follow `rules`."""
    plan = ShardingPlan.create(mesh, rules)
    forward = jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, attention_mask=mask))

    def run(params, input_ids, attention_mask=None):
        with plan.for_batch(input_ids.shape[0]).context():
            return forward(params, input_ids, attention_mask)

    return run
