"""Device mesh and parameter/batch placement.

One mesh with three named axes serves every run, from 1 CPU to a multi-host GPU/TPU slice:

    "data"    pure data parallelism: parameters replicated, batch split
    "fsdp"    data parallelism with parameters (and optimizer state) sharded, gathered per layer by GSPMD
    "tensor"  Megatron-style split of heads / MLP width / vocabulary

The batch's leading axis is split over ("data", "fsdp"); parameters follow the logical partition names their
modules annotate (`gopo_jax.models.qwen3` uses the mesh axis names "fsdp" and "tensor" directly), with an axis
dropped where it does not divide the dimension (e.g. 2 KV heads on a 4-way tensor axis) so that tiny test
models run on any mesh. All axes are `AxisType.Auto`: the code is written for GSPMD propagation, not explicit
sharding types.

Multi-host: a driver joins the job first (`gopo_jax.distributed.maybe_initialize_distributed`), then builds the mesh
from all `jax.devices()` and feeds each process's share of the batch with `shard_batch` (every process passes its
own rows; the global batch is their concatenation in process order).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def _axis_sizes(cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
    unknown = set(cfg) - set(AXES)
    if unknown:
        raise ValueError(f"mesh config has unknown key(s) {sorted(unknown)}; valid keys are {list(AXES)}")
    sizes = [int(cfg.get(name, 1)) for name in AXES]
    rest = [name for name, size in zip(AXES, sizes) if size == -1]
    bad = [f"{name}={size}" for name, size in zip(AXES, sizes) if size == 0 or size < -1]
    if bad or len(rest) > 1:
        raise ValueError(f"mesh config {dict(zip(AXES, sizes))}: each axis must be a positive int, and at most one "
                         f"may be -1 (= the rest of the devices); got {bad or rest}")
    fixed = math.prod(size for size in sizes if size != -1)
    if rest:
        if num_devices % fixed:
            raise ValueError(f"mesh config {dict(zip(AXES, sizes))}: the fixed axes ({fixed}) do not divide the "
                             f"{num_devices} devices, so '{rest[0]}: -1' has no integer size")
        sizes = [num_devices // fixed if size == -1 else size for size in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh config {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
                         f"{num_devices} are available; use -1 on one axis to take the rest")
    return tuple(sizes)


def make_mesh(cfg: Mapping[str, Any], devices=None) -> Mesh:
    """Mesh with axes ("data", "fsdp", "tensor") from `{data, fsdp, tensor}` (missing = 1, one may be -1).

    `cfg` may be a dict or an ml_collections ConfigDict. `devices` defaults to all (global) devices.
    """
    devices = jax.devices() if devices is None else list(devices)
    sizes = _axis_sizes(dict(cfg), len(devices))
    return jax.make_mesh(sizes, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _fit_spec(names: tuple, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """PartitionSpec for `names`, dropping mesh axes whose size does not divide the dimension.

    The spec is written the way jit reports the layout of an output (axes of size 1 left out, no trailing None):
    a state placed by it and the same state returned by a jitted update then compare equal, so the update's
    second call does not trace and compile again for a differently spelled but equal layout."""
    if len(names) != len(shape):
        raise ValueError(f"{where}: partition annotation {names} has {len(names)} entries but the array has shape "
                         f"{shape}; fix the module's partitioning metadata")
    spec = []
    for dim, entry in zip(shape, names):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"{where}: partition annotation names mesh axis {unknown} but the mesh has axes "
                             f"{tuple(mesh.shape)}")
        if dim % math.prod(mesh.shape[a] for a in axes):
            axes = ()  # replicate this dimension rather than fail: uneven splits are not worth padding for
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings (same tree structure) for any pytree holding nnx Variables and plain arrays.

    A Variable with `out_sharding` partitioning metadata (what `nnx.with_partitioning` records) is sharded by
    it; every other leaf (unannotated Variables, optimizer counters, the step, rng keys) is replicated. Works on
    an nnx.State, a dict of them, optax states built from them (they keep the Variable wrappers) and a whole
    `TrainState`.
    """
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, x):
        if isinstance(x, nnx.Variable):
            if not hasattr(x.get_value(), "shape"):
                return x  # e.g. optax.MaskedNode inside multi_transform state: no array, nothing to place
            names = x.get_metadata().get("out_sharding")
            if not names:
                return x.replace(replicated)
            return x.replace(NamedSharding(mesh, _fit_spec(tuple(names), tuple(x.get_value().shape), mesh,
                                                           jax.tree_util.keystr(path))))
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _place(x, sharding: NamedSharding):
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
        # Typed PRNG keys have no host form: place their raw data, then re-wrap with the same PRNG impl.
        return jax.random.wrap_key_data(_place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    # Multi-process: every process holds the same full value (same seed / same checkpoint); each one
    # contributes the slices its own devices need.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(tree: Any, mesh: Mesh) -> Any:
    """Places `tree` (params, optimizer state or a whole TrainState) by `param_shardings`."""
    shardings = param_shardings(tree, mesh)
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten([_place(x, s) for x, s in zip(leaves, treedef.flatten_up_to(shardings))])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ("data", "fsdp"); the other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_split_axes(mesh: Mesh, rows: int) -> tuple[str, ...]:
    """The batch axes that `rows` rows are split over: ("data", "fsdp") when data*fsdp divides `rows`, else the
    larger single axis that divides it, else () (every device holds every row).

    Traced phases lay their batches out by this rule rather than leaving an uneven split to XLA (which pads the
    rows and picks some layout of its own): a batch size that is not a multiple of data*fsdp still runs, on a
    predictable fraction of the devices (`gopo_jax.train.phases.Phases` logs which batches fall back).
    """
    by_size = sorted(((axis,) for axis in BATCH_AXES), key=lambda axes: -mesh.shape[axes[0]])
    for axes in (BATCH_AXES, *by_size):
        shards = math.prod(mesh.shape[a] for a in axes)
        if shards > 1 and rows % shards == 0:
            return axes
    return ()


def rows_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Leading axis of `rows` rows split by `batch_split_axes`; the other dimensions replicated."""
    axes = batch_split_axes(mesh, rows)
    return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def constrain_rows(tree: Any, mesh: Mesh) -> Any:
    """`jax.lax.with_sharding_constraint` of every array leaf with a leading (batch) axis to `rows_sharding`
    (inside a trace); scalars are left to propagation. Typed PRNG key arrays are constrained like any other."""
    def one(x):
        if jax.numpy.ndim(x) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, rows_sharding(mesh, x.shape[0]))

    return jax.tree.map(one, tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays with a leading batch axis on the mesh.

    Single process: `batch` is the global batch. Several processes: `batch` is this process's rows; the global
    batch is the concatenation over processes in process order (`jax.make_array_from_process_local_data`).
    """
    sharding = batch_sharding(mesh)
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    nproc = jax.process_count()

    def one(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or (x.shape[0] * nproc) % shards:
            raise ValueError(f"batch{jax.tree_util.keystr(path)} has shape {x.shape} on each of {nproc} "
                             f"process(es); its global leading size must be a multiple of data*fsdp = {shards}")
        if nproc == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(one, batch)
