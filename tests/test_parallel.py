"""Tests for gopo_jax.parallel (mesh from config, shardings from nnx annotations, batch placement) and the
environment check of gopo_jax.distributed's multi-host start-up (the real 2-process run is tests/test_multihost.py)."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gopo_jax import distributed, parallel
from gopo_jax.models import qwen3


@pytest.mark.parametrize("cfg,shape", [
    ({"data": 2, "fsdp": -1}, (2, 4, 1)),
    ({"data": -1, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
    ({"fsdp": 8}, (1, 8, 1)),
])
def test_make_mesh_sizes_and_axis_types(cfg, shape):
    mesh = parallel.make_mesh(cfg)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_make_mesh_accepts_configdict_and_device_subset():
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1}),
                              devices=jax.devices()[:2])
    assert tuple(mesh.shape.values()) == (1, 2, 1)


@pytest.mark.parametrize("cfg,match", [
    ({"data": 3}, "needs 3 devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": 3, "fsdp": -1}, "do not divide"),
    ({"model": 2}, "unknown key"),
    ({"data": 0, "fsdp": -1}, "positive"),
])
def test_make_mesh_errors_name_the_problem(cfg, match):
    with pytest.raises(ValueError, match=match):
        parallel.make_mesh(cfg)


def test_param_shardings_follow_annotations_and_drop_uneven_axes():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    tree = {
        "kernel": nnx.Param(jnp.zeros((4, 6)), out_sharding=("fsdp", "tensor"), eager_sharding=False),
        # 3 rows on a 2-way fsdp axis: that dimension is replicated instead.
        "uneven": nnx.Param(jnp.zeros((3, 6)), out_sharding=("fsdp", "tensor"), eager_sharding=False),
        "scale": nnx.Param(jnp.ones(6), out_sharding=(None,), eager_sharding=False),
        "plain": nnx.Param(jnp.ones(6)),
        "count": jnp.zeros((), jnp.int32),
    }
    sh = parallel.param_shardings(tree, mesh)
    assert sh["kernel"].get_value().spec == P("fsdp", "tensor")
    assert sh["uneven"].get_value().spec == P(None, "tensor")
    assert sh["scale"].get_value().spec == P()  # written as jit writes an output's layout: no trailing None
    assert sh["plain"].get_value().spec == P()
    assert sh["count"].spec == P()

    placed = parallel.shard_params(tree, mesh)
    assert placed["kernel"][...].sharding.spec == P("fsdp", "tensor")
    assert placed["kernel"][...].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(placed["scale"][...], np.ones(6))


def test_param_shardings_reject_unknown_axis_name():
    mesh = parallel.make_mesh({"data": -1})
    with pytest.raises(ValueError, match=r"\['model'\].*axes"):
        parallel.param_shardings(
            {"w": nnx.Param(jnp.zeros((4,)), out_sharding=("model",), eager_sharding=False)}, mesh)


def test_qwen3_params_placed_by_their_annotations():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, params = nnx.split(qwen3.Qwen3(qwen3.get_config("tiny"), rngs=nnx.Rngs(0)), nnx.Param)
    placed = parallel.shard_params(params, mesh)
    assert placed["embed_tokens"]["embedding"][...].sharding.spec == P("tensor", "fsdp")
    # the layers' parameters are stacked (a leading layer axis, never split)
    assert placed["layers"]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P(None, "tensor", "fsdp")
    assert placed["norm"]["scale"][...].sharding.spec == P()
    # an axis of size 1 splits nothing and is left out of the spec
    one_tensor = parallel.shard_params(params, parallel.make_mesh({"data": 2, "fsdp": 4}))
    assert one_tensor["layers"]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P(None, None, "fsdp")


def test_shard_batch_splits_leading_axis_over_data_and_fsdp():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = {"tokens": np.arange(8 * 3).reshape(8, 3), "mask": np.ones((8,), bool)}
    placed = parallel.shard_batch(batch, mesh)
    assert placed["tokens"].sharding == parallel.batch_sharding(mesh)
    assert {s.data.shape for s in placed["tokens"].addressable_shards} == {(2, 3)}  # 4-way split, tensor replicates
    np.testing.assert_array_equal(placed["tokens"], batch["tokens"])
    with pytest.raises(ValueError, match=r"batch\['mask'\].*multiple of data\*fsdp = 4"):
        parallel.shard_batch({"mask": np.ones((6,), bool)}, mesh)


@pytest.mark.parametrize("cfg,rows,axes", [
    ({"data": 2, "fsdp": 4}, 16, ("data", "fsdp")),
    ({"data": 2, "fsdp": 4}, 12, ("fsdp",)),  # 8 does not divide 12: the larger single axis that does
    ({"data": 2, "fsdp": 4}, 6, ("data",)),
    ({"data": 2, "fsdp": 4}, 3, ()),
    ({"data": 8}, 4, ()),  # the size-1 fsdp axis is no split
    ({"data": 2, "fsdp": 2, "tensor": 2}, 4, ("data", "fsdp")),
])
def test_batch_split_axes_largest_even_split(cfg, rows, axes):
    mesh = parallel.make_mesh(cfg)
    assert parallel.batch_split_axes(mesh, rows) == axes
    assert parallel.rows_sharding(mesh, rows).spec == (P(axes) if axes else P(None))


def test_constrain_rows_splits_every_leaf_by_its_rows():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
    tree = {"even": jnp.arange(16 * 3).reshape(16, 3), "uneven": jnp.arange(6.0), "scalar": jnp.float32(2.0),
            "keys": jax.random.split(jax.random.key(0), 8)}
    out = jax.jit(lambda t: parallel.constrain_rows(t, mesh))(tree)
    assert {s.data.shape for s in out["even"].addressable_shards} == {(2, 3)}
    assert {s.data.shape for s in out["uneven"].addressable_shards} == {(3,)}  # over data only
    assert {s.data.shape for s in out["keys"].addressable_shards} == {(1,)}  # typed keys split like any array
    out["keys"], tree["keys"] = jax.random.key_data(out["keys"]), jax.random.key_data(tree["keys"])
    for k, x in tree.items():
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(x))


_DIST_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "SLURM_PROCID",
              "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES")


def test_maybe_initialize_distributed_is_a_no_op_for_single_process(monkeypatch):
    for var in _DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    assert distributed.maybe_initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task SLURM job is single-process too
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.maybe_initialize_distributed() is False
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
    monkeypatch.setenv("JAX_PROCESS_ID", "0")
    assert distributed.maybe_initialize_distributed() is False
    assert not jax.distributed.is_initialized()


def test_maybe_initialize_distributed_reports_incomplete_env(monkeypatch):
    for var in _DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.maybe_initialize_distributed()
