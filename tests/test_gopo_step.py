"""The hierarchical GOPO train step: identical on 1 and 8 devices; μ follows dual ascent; β = 0 skips the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gopo_jax import parallel
from gopo_jax.algorithms.gopo import GOPOBatch, GOPOHyper, make_dual_ascent, make_gopo_loss
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from gopo_jax.metrics.episode import EpisodeMetricSettings
from gopo_jax.train.methods import MethodContext
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_train_step

GROUPS, G = 4, 2


@pytest.fixture(scope="module")
def setup(tiny_world):
    world, ge, gc, params = tiny_world
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.group_episodes(jax.random.key(0), GROUPS, G), jax.random.key(1))
    # An untrained CS realises nothing (all turns misaligned, zero-variance CS rewards): give the batch varied
    # alignment and quality so that both objectives carry gradient (the step is a function of the batch).
    k1, k2 = jax.random.split(jax.random.key(2))
    traj = traj.replace(aligned=jax.random.bernoulli(k1, 0.6, traj.aligned.shape).astype(jnp.float32) * traj.turn_mask,
                        quality=jax.random.uniform(k2, traj.quality.shape) * traj.turn_mask)
    hyper = GOPOHyper(group_size=G)
    ctx = MethodContext(config=None, world=world, expert_gd=ge, cs_gd=gc, hyper=hyper,
                        metric_settings=EpisodeMetricSettings(max_relevance=world.spec.max_relevance,
                                                              t_max=world.spec.max_turns))
    batch = GOPOBatch(traj=traj, scores=ctx.scores(traj)[0], ref_expert_logp=ctx.reference_expert_log_probs(params, traj),
                      ref_cs_logp=ctx.reference_cs_log_probs(params, traj))
    return world, ge, gc, params, batch, hyper


def _train(world, ge, gc, params, batch, hyper, mesh, steps=2):
    loss_fn = make_gopo_loss(ge, gc, world.layout, world.vocab.strategy_ids, hyper)
    tx = optax.sgd(0.5)
    step = make_train_step(loss_fn, tx, mesh=mesh)
    state = parallel.shard_params(create_train_state(jax.tree.map(jnp.copy, params), tx,
                                                     extras={"mu": jnp.float32(0.0)}), mesh)
    metrics = []
    for _ in range(steps):
        state, m = step(state, parallel.shard_batch(jax.tree.map(np.asarray, batch), mesh))
        metrics.append(jax.tree.map(float, m))
    return state, metrics


def test_hierarchical_step_same_on_1_and_8_devices(setup):
    world, ge, gc, params, batch, hyper = setup
    one = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    eight = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    s1, m1 = _train(world, ge, gc, params, batch, hyper, one)
    s8, m8 = _train(world, ge, gc, params, batch, hyper, eight)
    for a, b in zip(m1, m8):
        for k in ("loss", "loss_expert", "loss_cs", "mu"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                                         s1.params, s8.params))
    assert max(diffs) < 1e-5, max(diffs)
    assert m1[0]["loss_expert"] != 0.0 and m1[0]["loss_cs"] != 0.0  # both objectives are live
    # the step really moved both agents
    moved = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), s1.params, params)
    assert max(jax.tree.leaves(moved["expert"])) > 0 and max(jax.tree.leaves(moved["cs"])) > 0


def test_multiplier_is_constant_within_an_iteration_and_steps_after_it(setup):
    """The train step leaves μ alone (every update of an iteration reads the same μ); the iteration's end takes one
    dual-ascent step from the rollout's misalignment rate (the whole iteration: tests/test_gopo_by_value.py)."""
    world, ge, gc, params, batch, hyper = setup
    one = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    state, metrics = _train(world, ge, gc, params, batch, hyper, one, steps=2)
    assert float(state.extras["mu"]) == 0.0 and [float(m["mu"]) for m in metrics] == [0.0, 0.0]
    stepped = make_dual_ascent(hyper)({"mu": jnp.float32(0.0)}, batch.traj)
    expected = max(0.0, hyper.mu_lr * (metrics[0]["misalignment_rate"] - hyper.delta))
    np.testing.assert_allclose(float(stepped["mu"]), expected, rtol=1e-5, atol=1e-7)


def test_beta_zero_needs_no_reference(setup):
    world, ge, gc, params, batch, hyper = setup
    import dataclasses
    free = dataclasses.replace(hyper, beta_cs=0.0, expert_reference=False)
    assert not free.needs_cs_reference and not free.needs_expert_reference
    no_ref = GOPOBatch(traj=batch.traj, scores=batch.scores)
    loss_fn = make_gopo_loss(ge, gc, world.layout, world.vocab.strategy_ids, free)
    loss, (metrics, _) = loss_fn(params, {"mu": jnp.float32(0.0)}, no_ref, None)
    assert np.isfinite(float(loss)) and "cs_kl_ref" not in metrics
