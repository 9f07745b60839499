"""One meaning per reported column (gopo_jax/train/report.py, gopo_jax/metrics/episode.py): ESNDCG of the realised
strategy for every method, alignment only with an Expert, one nTSE for run summaries and scripted-policy reports."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.dialogue.rollout import AgentVocab, ScriptedAgents, jax_env_layout, make_rollout
from gopo_jax.envs import policies
from gopo_jax.envs import synthetic_shop as ss
from gopo_jax.metrics.episode import EpisodeMetricSettings, host_episode_metrics
from gopo_jax.metrics.esndcg import esndcg
from gopo_jax.train import report

EPISODES = 8


@dataclasses.dataclass(frozen=True)
class RandomReply:
    """Replies that realise a random allowed strategy; `expert=True` also names the reference's choice as chosen,
    so a share of turns is misaligned (chosen ≠ realised), `expert=False` names nothing (strategy -1: no Expert)."""

    env: object
    expert: bool

    def __call__(self, state, inp, key):
        _, reply, valid = policies.JaxRandom(self.env)(state, inp, key)
        chosen = self.env.reference_strategy(state) if self.expert else jnp.int32(-1)
        return chosen, reply, valid


@pytest.fixture(scope="module")
def rollouts():
    env = ss.make_env()
    vocab = AgentVocab.from_tokenizer(env.tokenizer, env.spec.sop, chat_format=env.chat_format)
    layout = jax_env_layout(env, vocab)
    keys = jax.random.split(jax.random.PRNGKey(0), EPISODES)
    settings = EpisodeMetricSettings(max_relevance=float(env.spec.max_relevance), t_max=env.spec.max_turns)
    out = {}
    for expert in (True, False):
        agents = ScriptedAgents(RandomReply(env, expert), vocab, emit_decision=expert)
        traj = jax.device_get(make_rollout(env, layout, vocab, agents)({}, keys, jax.random.PRNGKey(1)))
        out[expert] = (traj, host_episode_metrics(traj, settings), settings)
    return out


def _realised_esndcg(traj, settings):
    return np.array([esndcg(jnp.asarray(r), jnp.asarray(m), p=settings.esndcg_p, max_rel=settings.max_relevance)
                     for r, m in zip(traj.rel_realised, traj.turn_mask)])


def test_esndcg_scores_the_realised_strategy_for_every_method(rollouts):
    for expert, (traj, per, settings) in rollouts.items():
        live = traj.turn_mask
        # rel_realised is the grade of k̂_t: the chosen strategy's grade where the reply carried it out, 0 where the
        # realisation check recognised nothing or the SOP forbids what it recognised.
        same = live & (traj.realised == traj.strategy)
        np.testing.assert_array_equal(traj.rel_realised[same], traj.rel[same])
        assert (traj.rel_realised[live & (traj.sop_valid == 0)] == 0).all()
        np.testing.assert_allclose(per["esndcg"], _realised_esndcg(traj, settings), rtol=1e-6)
        if not expert:  # the world takes the realised strategy as chosen: the two scores coincide
            np.testing.assert_allclose(per["esndcg_chosen"], per["esndcg"], rtol=1e-6)
    traj, per, _ = rollouts[True]
    assert (traj.realised != traj.strategy)[traj.turn_mask].any()  # the misaligned turns make the two differ
    assert not np.allclose(per["esndcg_chosen"], per["esndcg"])


def test_alignment_is_undefined_without_an_expert(rollouts):
    _, no_expert, _ = rollouts[False]
    _, expert, _ = rollouts[True]
    block = report.summary_block(no_expert, expert, use_expert=False)
    assert block["alignment"] is None and block["esndcg_chosen"] is None
    assert block["recognised"]["mean"] == pytest.approx(1.0)  # scripted replies are always recognised
    assert "alignment" not in report.eval_record(no_expert, expert, use_expert=False)
    assert "alignment" not in report.curve_names(use_expert=False, trains=True)
    with_expert = report.summary_block(expert, expert, use_expert=True)
    assert 0.0 < with_expert["alignment"]["mean"] < 1.0 and with_expert["recognised"]["mean"] == pytest.approx(1.0)


def test_the_two_ntse_callers_agree_on_the_same_arrays():
    rng = np.random.default_rng(0)
    tse, reference_tse = rng.uniform(0.0, 0.5, 32), rng.uniform(0.0, 0.5, 32)
    from_report = report.run_ntse({"tse": tse}, {"tse": reference_tse})
    from_policies = policies.ntse_ci(tse, reference_tse)
    assert from_report == pytest.approx(tse.mean() / reference_tse.mean(), rel=1e-6)
    assert from_policies["mean"] == from_report
    assert from_policies["lo"] <= from_report <= from_policies["hi"]
