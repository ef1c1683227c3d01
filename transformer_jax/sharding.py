"""Device mesh and the one rules table from logical axis names to mesh axes (MaxText style).

Parameters declare logical axes (`models.Model.logical_axes`); data parallel, FSDP, sequence and
tensor parallel are only mesh sizes in the config. A dimension that a mesh axis does not divide stays
replicated on it, so small models run on any mesh; except `length`, which sequence parallelism asked
for (mesh.sequence > 1) must split evenly (a ConfigError otherwise).
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from transformer_jax.config import ConfigError, MeshConfig

# The last axes get the nearest devices (jax.make_mesh): tensor, then sequence, need the most bandwidth.
MESH_AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis -> mesh axes it is split over (in order). Batch over data and fsdp; weights over
# fsdp (ZeRO-3 style) and tensor (Megatron style: heads and mlp columns).
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "kv": (),
    "layers": (),
    "norm": (),
    "relpos": (),
    # activations (besides batch, heads, mlp, vocab above): the residual stream's length and width,
    # and attention's keys and values [B, S, K, H], whole along S: under sequence parallelism each
    # layer all-gathers K and V while the queries (and everything else) stay split over length.
    "length": ("sequence",),
    "act_embed": (),
    "kv_length": (),
}

# logical axes a mesh axis of the rules must divide: never quietly replicated
STRICT = {"length": "sequence parallelism splits the length evenly"}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> dict[str, int]:
    sizes = {axis: getattr(cfg, axis) for axis in MESH_AXES}
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if num_devices % known:
            raise ConfigError(f"mesh: fixed axes ({known}) do not divide the {num_devices} devices")
        sizes = {a: (num_devices // known if s == -1 else s) for a, s in sizes.items()}
    if math.prod(sizes.values()) != num_devices:
        product = "*".join(MESH_AXES)
        raise ConfigError(f"mesh: {product} = {math.prod(sizes.values())} but there are {num_devices} devices")
    return sizes


def make_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(cfg or MeshConfig(), len(devices))
    # Auto axes: shardings of parameters and batches are given, XLA propagates the rest
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        devices=devices,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def logical_to_spec(axes: tuple, shape: tuple[int, ...], mesh: Mesh | AbstractMesh, rules: dict = RULES) -> P:
    """PartitionSpec for one array: each logical axis maps to the mesh axes of the rules table that
    divide its size and are not already used by another dimension (a STRICT axis must be divided)."""
    used, spec = set(), []
    for name, size in zip(axes, shape):
        chosen: list[str] = []
        for mesh_axis in rules.get(name, ()) if name else ():
            n = mesh.shape[mesh_axis]
            if name in STRICT and n > 1 and size % n:
                raise ConfigError(f"mesh.{mesh_axis}: {n} does not divide the {name} {size} ({STRICT[name]})")
            if n > 1 and mesh_axis not in used and size % (n * math.prod(mesh.shape[a] for a in chosen)) == 0:
                chosen.append(mesh_axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return P(*spec)


def tree_shardings(logical_axes, abstract, mesh: Mesh | AbstractMesh, rules: dict = RULES):
    """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given its tree of logical axes."""
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules)),
        logical_axes,
        abstract,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def constrain(x, axes: tuple[str | None, ...], rules: dict = RULES):
    """Pin an activation's layout by its logical axes (e.g. ("batch", "length", "act_embed")) under the
    mesh in context (`jax.set_mesh`, which `with_mesh` sets); no mesh in context: unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def with_mesh(fn, mesh: Mesh):
    """fn called (and so traced) with `mesh` in context: the activations' `constrain` apply."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches: leading axis split over data and fsdp, the rest replicated."""
    return NamedSharding(mesh, P(RULES["batch"]))


def batch_parallel(mesh: Mesh) -> int:
    """How many ways a batch is split: the product of the mesh axes the batch rule names."""
    return math.prod(mesh.shape[a] for a in RULES["batch"])


def any_process(flags: list[bool]) -> list[bool]:
    """Each flag OR-ed over all processes (one tiny collective; nothing to do on one process): the
    way every process takes the same decision."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    from jax.experimental import multihost_utils

    seen = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return [bool(x) for x in np.any(seen.reshape(-1, len(flags)), axis=0)]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of the batch into global arrays sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
