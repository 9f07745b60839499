"""The rollout, the reference pass / scoring (the method's `prepare_batch`) and the scripted rollouts split over
("data", "fsdp") on the 8 fake devices: the same values as on one device, and the batch really split (output
shardings, and no all-gather of the whole trajectory in the compiled rollout)."""
import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gopo_jax import parallel
from gopo_jax.train.build import build
from gopo_jax.train.driver import _OneSeed
from gopo_jax.train.phases import Phases
from tests.helpers import tiny_run_config

GROUPS, G = 8, 2  # 16 rows: 2 per device on every 8-device mesh
MESHES = {"one": {}, "data2_fsdp4": {"data": 2, "fsdp": 4}, "data8": {"data": 8}}


def _split_8_ways(leaf) -> bool:
    """Each of the 8 devices holds its own 1/8 of the rows (whatever the spec's spelling of the axes)."""
    shards = leaf.addressable_shards
    return (len(shards) == 8 and len({s.index[0].start for s in shards}) == 8
            and {s.data.shape[0] for s in shards} == {leaf.shape[0] // 8})


def _config():
    c = tiny_run_config()
    with c.unlocked():
        c.env.max_turns = 3  # a short buffer keeps the scans cheap; the layouts do not depend on it
        c.sft.episodes, c.sft.batch_size = 16, 8
        c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = GROUPS, G, 2, 1
        c.eval.episodes = 16
    return c


def _mesh(name):
    if name == "one":
        return parallel.make_mesh({}, devices=jax.devices()[:1])
    return parallel.make_mesh(MESHES[name])


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    c = build(_config(), tmp_path_factory.mktemp("sharded"))
    assert c.world.layout.max_turns == 3 and c.hyper.needs_cs_reference and c.hyper.needs_expert_reference
    return c


@pytest.fixture(scope="module")
def runs(comps):
    """Per mesh: (phases, state, reference params) with the state and the reference placed as the driver does."""
    params = comps.init_params(0)
    out = {}
    for name in MESHES:
        mesh = _mesh(name)
        p = Phases(comps, mesh=mesh)
        state = parallel.shard_params(p.method_state(jax.tree.map(jnp.copy, params), comps.method.init_extras(), 0),
                                      mesh)
        out[name] = (p, state, parallel.shard_params(jax.tree.map(jnp.copy, params), mesh))
    return out


@pytest.fixture(scope="module")
def rollouts(runs):
    """Per mesh: (trajectory of iteration 0's rollout, the compiled rollout's HLO text)."""
    out = {}
    for name, (p, state, ref) in runs.items():
        compiled = jax.jit(p.rollout).lower(state, ref, 0, 0).compile()
        out[name] = (compiled(state, ref, 0, 0), compiled.as_text())
    return out


def _close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=0, atol=atol)


def test_rollout_sharded_equals_one_device(rollouts):
    ref, _ = rollouts["one"]
    assert ref.tokens.shape[0] == GROUPS * G and np.asarray(ref.turn_mask).any()
    for name in ("data2_fsdp4", "data8"):
        traj, _ = rollouts[name]
        # nothing here samples differently (the logits agree to ~1e-6; no draw sits on such a tie)
        np.testing.assert_array_equal(np.asarray(traj.tokens), np.asarray(ref.tokens), err_msg=name)
        np.testing.assert_array_equal(np.asarray(traj.strategy), np.asarray(ref.strategy), err_msg=name)
        _close(traj, ref, atol=1e-5)


def _full_batch_all_gathers(hlo: str, rows: int) -> list[str]:
    """The all-gathers whose result has the whole batch as its leading dimension."""
    return [line.strip()[:160] for line in hlo.splitlines()
            if re.search(r"all-gather(-start)?\(", line) and re.search(rf"= \(?\w+\[{rows},", line)]


@pytest.mark.parametrize("name", ["data2_fsdp4", "data8"])
def test_rollout_split_over_the_batch_axes(rollouts, name):
    traj, hlo = rollouts[name]
    assert all(_split_8_ways(leaf) for leaf in jax.tree.leaves(traj)), traj.tokens.sharding
    assert not _full_batch_all_gathers(hlo, GROUPS * G), _full_batch_all_gathers(hlo, GROUPS * G)[:5]


@pytest.fixture(scope="module")
def prepared(runs, rollouts):
    """Per mesh: GOPO's prepared batch (scores, reference Expert / CS log-probs) of the same one-device rollout."""
    traj = jax.device_get(rollouts["one"][0])
    return {name: jax.jit(p.prepare)(traj, ref, state.params) for name, (p, state, ref) in runs.items()}


def test_reference_pass_sharded_equals_one_device(prepared):
    one = prepared["one"]
    assert one.ref_cs_logp.shape == one.traj.tokens.shape and one.ref_expert_logp.shape[0] == GROUPS * G
    assert np.all(np.asarray(one.ref_cs_logp) <= 0) and np.any(np.asarray(one.ref_cs_logp) < 0)
    for name in ("data2_fsdp4", "data8"):
        batch = prepared[name]
        np.testing.assert_array_equal(np.asarray(batch.traj.tokens), np.asarray(one.traj.tokens))
        _close(batch.ref_cs_logp, one.ref_cs_logp, atol=1e-5)
        _close(batch.ref_expert_logp, one.ref_expert_logp, atol=1e-5)
        _close(batch.scores, one.scores, atol=1e-6)
        assert all(_split_8_ways(leaf) for leaf in jax.tree.leaves(batch)), name


def test_scripted_rollouts_split(runs):
    """The reference evaluation and the demonstrations (scripted agents) run split too."""
    p, _, _ = runs["data2_fsdp4"]
    metrics = jax.jit(p.reference_eval)(0)
    assert all(_split_8_ways(v) for v in metrics.values()), {k: v.sharding for k, v in metrics.items()}
    train, held = jax.jit(p.demonstrations)(0)
    assert train.tokens.shape[0] == 14 and held.tokens.shape[0] == 2
    # 14 rows: the larger axis that divides them (data = 2); 2 rows: data too
    assert train.tokens.sharding.spec == P("data") and held.tokens.sharding.spec == P("data")
    unsharded_train, _ = jax.jit(runs["one"][0].demonstrations)(0)
    np.testing.assert_array_equal(np.asarray(train.tokens), np.asarray(unsharded_train.tokens))


def test_uneven_batches_fall_back_visibly(comps, caplog):
    mesh = _mesh("data2_fsdp4")
    assert Phases(comps, mesh=mesh).batch_axes() == {
        "rollout": ("data", "fsdp"), "minibatch": ("data", "fsdp"), "evaluation": ("data", "fsdp"),
        "demonstrations": ("data", "fsdp"), "sft_batch": ("data", "fsdp"), "sft_heldout": ("data",)}
    config = _config()
    with config.unlocked():
        config.eval.episodes = 6
    uneven = dataclasses.replace(comps, config=config)
    with caplog.at_level(logging.WARNING, logger="gopo_jax.train.phases"):
        axes = Phases(uneven, mesh=mesh).batch_axes()
    assert axes["evaluation"] == ("data",)
    assert any("evaluation: 6 rows do not divide data*fsdp = 8" in r.message and "eval.episodes" in r.message
               for r in caplog.records), [r.message for r in caplog.records]
    assert Phases(comps).batch_axes() == {}


@pytest.mark.slow  # compiles one whole iteration on the 8-device mesh: ~1 min on 2 cores
def test_iteration_is_one_call_without_host_transfers(comps):
    """On a pure-JAX world the driver's iteration (rollout -> reference pass -> epochs x minibatches) is one jitted
    call: after the first, a later iteration copies nothing from the device to the host (only its seed and index
    scalars go the other way, with the call) and compiles nothing."""
    ex = _OneSeed(comps, 0)
    params = comps.init_params(0)
    state = ex.method_state(jax.tree.map(jnp.copy, params), comps.method.init_extras())
    ref = parallel.shard_params(params, comps.mesh)
    state, stats, _ = ex.iteration(state, ref, 0)
    jax.block_until_ready(stats)
    with jax.transfer_guard_device_to_host("disallow"):
        state, stats, rollout = ex.iteration(state, ref, 1)
        jax.block_until_ready((state, stats, rollout))
    assert ex._iteration.compiled._cache_size() == 1
    assert all(_split_8_ways(v) for v in rollout.values()), {k: v.sharding for k, v in rollout.items()}
