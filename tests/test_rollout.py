"""Rollout drivers: the record of a rollout is exactly what the training forward pass sees.

* token-in-token-out: the log-probs sampled during the rollout (EA masked softmax and CS tokens, produced with KV
  caches turn by turn) equal those of one forward pass over the assembled buffer;
* disallowed strategies are never chosen; masks and roles are consistent with the layout;
* the pure-JAX scan driver and the Python turn loop give the same trajectory for the same keys.
"""
import dataclasses

import jax
import numpy as np
from flax import nnx

from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig, python_loop_rollout


def _rollout(world, ge, gc, params, sampling, n=4, seed=0):
    agents = ModelAgents(ge, gc, world.vocab, world.layout, sampling)
    fn = world.make_rollout(agents)
    return fn(params, world.episodes(jax.random.key(seed), n), jax.random.key(seed + 1)), agents


def test_rollout_logprobs_match_training_forward(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(temperature=1.0))
    traj.check(world.layout, world.spec.num_strategies)
    expert = nnx.merge(ge, params["expert"])
    cs = nnx.merge(gc, params["cs"])
    logp_all = scoring.expert_strategy_log_probs(expert, traj, world.layout, world.vocab.strategy_ids)
    ea = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
    np.testing.assert_allclose(np.asarray(ea), np.asarray(traj.ea_logprob), atol=2e-4)
    cs_logp, _ = scoring.cs_token_log_probs(cs, traj)
    m = np.asarray(traj.cs_mask)
    assert m.sum() > 0
    np.testing.assert_allclose(np.asarray(cs_logp)[m], np.asarray(traj.cs_logprob)[m], atol=2e-4)


def test_rollout_respects_sop_and_layout(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(temperature=1.0), n=8, seed=3)
    tm = np.asarray(traj.turn_mask)
    chosen_allowed = np.take_along_axis(np.asarray(traj.allowed), np.asarray(traj.strategy)[..., None], -1)[..., 0]
    assert chosen_allowed[tm].all()
    # exactly one EA decision token per active turn, CS tokens only in reply slots, masks only on valid tokens
    assert (np.asarray(traj.ea_mask).sum(-1) == tm.sum(-1)).all()
    assert not (np.asarray(traj.ea_mask) & np.asarray(traj.cs_mask)).any()
    assert (np.asarray(traj.valid) | ~np.asarray(traj.cs_mask)).all()
    dec = np.asarray(traj.tokens)[np.asarray(traj.ea_mask)]
    assert set(dec.tolist()) <= set(world.vocab.strategy_ids)


def test_no_expert_rollout_has_no_decisions(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(use_expert=False), n=4)
    assert not np.asarray(traj.ea_mask).any()
    assert np.asarray(traj.cs_mask).any()


def test_scan_driver_equals_python_turn_loop(tiny_world):
    world, ge, gc, params = tiny_world
    sampling = SamplingConfig(temperature=1.0)
    traj, agents = _rollout(world, ge, gc, params, sampling, n=4, seed=5)
    loop = python_loop_rollout(world.env, world.layout, world.vocab, agents)
    other = loop(params, world.episodes(jax.random.key(5), 4), jax.random.key(6))
    for f in dataclasses.fields(traj):
        np.testing.assert_allclose(np.asarray(getattr(traj, f.name), np.float32),
                                   np.asarray(getattr(other, f.name), np.float32), atol=1e-5, err_msg=f.name)
