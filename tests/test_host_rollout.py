"""The host-environment driver (Python turn loop around the jitted agent turn) on the real ABCD data: same layout and
the same token-in-token-out guarantee as the pure-JAX driver, and the whole pipeline runs on a host world."""
import jax
import numpy as np
import pytest
from flax import nnx

from configs.tmallbrand import get_config
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from gopo_jax.train.driver import train_run
from tests.helpers import world_and_agents


def _tiny(shared_data, **train):
    c = get_config()
    c.unlock()
    c.env.data_dir = str(shared_data / "abcd")
    c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 1, 64
    c.layout.max_turns = 6
    for k, v in train.items():
        section, key = k.split("__")
        c[section][key] = v
    c.lock()
    return c


@pytest.fixture(scope="module")
def host_world(shared_data, tmp_path_factory):
    return world_and_agents(_tiny(shared_data), tmp_path_factory.mktemp("tb"))


def test_reference_rollout_makes_progress(host_world):
    world = host_world[0]
    traj = world.make_rollout(world.reference_agents())({}, world.eval_episodes(0, 4), jax.random.key(0))
    traj.check(world.layout, world.spec.num_strategies)
    assert float(np.asarray(traj.gain).sum()) > 0
    assert np.asarray(traj.aligned)[np.asarray(traj.turn_mask)].mean() > 0.9


def test_host_rollout_logprobs_match_training_forward(host_world):
    world, ge, gc, params = host_world
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.eval_episodes(0, 4), jax.random.key(1))
    logp_all = scoring.expert_strategy_log_probs(nnx.merge(ge, params["expert"]), traj, world.layout,
                                                 world.vocab.strategy_ids)
    ea = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
    np.testing.assert_allclose(np.asarray(ea), np.asarray(traj.ea_logprob), atol=2e-4)
    cs_logp, _ = scoring.cs_token_log_probs(nnx.merge(gc, params["cs"]), traj, world.layout)
    m = np.asarray(traj.cs_mask)
    np.testing.assert_allclose(np.asarray(cs_logp)[m], np.asarray(traj.cs_logprob)[m], atol=2e-4)


@pytest.mark.slow
def test_pipeline_runs_on_a_host_world(shared_data, tmp_path):
    c = _tiny(shared_data, sft__steps=2, sft__episodes=16, sft__batch_size=8, train__steps=1, train__groups=2,
              train__group_size=4, train__minibatches=1, train__epochs=1, eval__episodes=8)
    summary = train_run(c, tmp_path)
    assert summary["env"] == "tmallbrand" and np.isfinite(summary["gopo"]["gre"]["mean"])
    assert (tmp_path / "summary.json").exists() and (tmp_path / "samples.md").exists()


def test_host_worlds_accept_no_expert(shared_data):
    """strategy = -1 (no Expert): the realised strategy counts as chosen, so a reply that realises the reference's
    strategy is aligned and fully relevant."""
    from gopo_jax.envs import multiwoz, tmallbrand

    for env in (tmallbrand.make_env(shared_data / "abcd"), multiwoz.make_env(shared_data / "multiwoz")):
        env.reset(3)
        k, reply = env.reference_turn()
        _, sig = env.step(-1, reply)
        assert sig.realised == k and sig.aligned == 1 and sig.rel == 2, (env.spec.name, sig)


def test_logged_demonstrations_become_the_warm_starts_buffer(host_world, shared_data):
    """sft.source="logged": the logged human turns in the rollout's layout, teacher-forced (nothing played)."""
    world = host_world[0]
    demos = world.env.logged_demonstrations(4, 0)
    rollout = world.demo_rollout(_tiny(shared_data, sft__source="logged"), emit_decision=True)
    traj = rollout({}, np.arange(4), jax.random.key(0))
    traj.check(world.layout, world.spec.num_strategies)
    codec = world.codec()
    for i, demo in enumerate(demos):
        turns = min(len(demo.turns), world.layout.max_turns)
        assert int(np.asarray(traj.turn_mask[i]).sum()) == turns
        assert int(np.asarray(traj.ea_mask[i]).sum()) == turns  # one Expert decision per logged turn
        for t in range(turns):
            turn = demo.turns[t]
            k = world.spec.sop.strategy_index(turn.strategy)
            assert int(traj.strategy[i, t]) == k and bool(traj.allowed[i, t, k])
            r0 = world.layout.reply_start(t)
            ids, valid = codec.reply_ids(turn.reply)
            np.testing.assert_array_equal(np.asarray(traj.tokens[i, r0:r0 + world.layout.reply_len])[valid],
                                          ids[valid])

