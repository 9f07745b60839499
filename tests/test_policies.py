"""Tests for gopo_jax/envs/policies.py (scripted policies over both env kinds) and registry.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.dialogue import env_protocol
from gopo_jax.dialogue.sop import UNRECOGNISED, sop_from_dict
from gopo_jax.envs import policies, registry
from gopo_jax.envs import synthetic_shop as ss


class TwoMoveWorld:
    """A tiny HostEnv: "grab" gains 0.5 once but halves engagement; "steady" gains 0.2 and keeps it; 3 turns."""

    def __init__(self):
        sop = sop_from_dict({"name": "two", "strategies": ["grab", "steady", "never"], "initial": "s",
                             "stages": [{"name": "s", "allowed": ["grab", "steady"]}]})
        self.spec = env_protocol.EnvSpec(name="two_move", sop=sop, max_turns=3, max_relevance=3)

    def reset(self, seed):
        self.t, self.grabbed, self.progress = 0, False, 0.0
        return self._obs("hi")

    def _obs(self, text):
        return env_protocol.HostObs(context="ctx", customer=text, stage=0, allowed=self.spec.sop.allowed[0].copy(),
                            done=self.t >= self.spec.max_turns)

    def realise(self, reply):
        return {"grab it": 0, "steady now": 1}.get(reply, UNRECOGNISED)

    def step(self, strategy, reply):
        k = self.realise(reply)
        gain, cont = {0: (0.0 if self.grabbed else 0.5, 0.5), 1: (0.2, 1.0)}.get(k, (0.0, 0.5))
        self.grabbed |= k == 0
        self.progress += gain
        self.t += 1
        sig = env_protocol.TurnSignals(gain=gain, cont=cont, rel=3.0 if k == 1 else 1.0,
                                       rel_realised=3.0 if k == 1 else 1.0, quality=1.0, realised=k,
                               aligned=float(k == strategy), sop_valid=1.0, done=self.t >= self.spec.max_turns)
        return self._obs("ok"), sig

    def outcome(self):
        return env_protocol.EpisodeOutcome(outcome=float(self.progress >= 0.6), satisfaction=1.0, fcr=0.0)

    def reference_turn(self):
        return 1, "steady now"

    def scripted_reply(self, strategy):
        return ["grab it", "steady now", "never"][strategy]

    def demonstrations(self, num_episodes, seed):
        return []

    def corpus(self):
        return ["grab it", "steady now"]


@pytest.fixture(scope="module")
def shop():
    return ss.make_env()


def test_lexicographic_best_hand_computed():
    gain = np.array([0.1, 0.3, 0.3, 0.3, 0.9])
    cont = np.array([1.0, 0.9, 0.95, 0.95, 1.0])
    rel = np.array([3.0, 3.0, 1.0, 2.0, 3.0])
    ok = np.array([True, True, True, True, False])  # the best-gain candidate is not allowed
    assert policies._lexicographic_best(gain, cont, rel, ok) == 3  # gain tie -> cont tie -> rel
    assert int(jax.jit(policies._lexicographic_best)(*map(jnp.asarray, (gain, cont, rel, ok)))) == 3
    # tiny float noise in gains is a tie
    assert policies._lexicographic_best(np.array([0.3, 0.3 + 1e-9]), np.array([1.0, 0.5]), np.zeros(2),
                                        np.ones(2, bool)) == 0


def test_host_policies_on_a_toy_world():
    env = TwoMoveWorld()
    obs = env.reset(0)
    rng = np.random.default_rng(0)
    assert policies.host_greedy(env, obs, rng) == (0, "grab it")
    assert env.t == 0 and not env.grabbed  # the lookahead ran on copies
    assert {policies.host_random(env, obs, rng)[0] for _ in range(30)} == {0, 1}  # never the disallowed one
    assert policies.host_reference(env, obs, rng) == (1, "steady now")


def test_evaluate_policy_on_a_host_env_hand_computed():
    env = TwoMoveWorld()
    w = [1.0, 1 / math.log2(3), 0.5]
    ref_tse = 0.2 * sum(w)
    greedy_tse = 0.5 * w[0] + 0.2 * 0.5 * w[1] + 0.2 * 0.5 * w[2]  # grab, then steady twice at survival 0.5
    ref = policies.evaluate_policy(env, "reference", 4, seed=0, transcripts=1)
    greedy = policies.evaluate_policy(env, "greedy", 4, seed=0)
    assert ref["tse"]["mean"] == pytest.approx(ref_tse, rel=1e-5)
    assert greedy["tse"]["mean"] == pytest.approx(greedy_tse, rel=1e-5)
    assert greedy["ntse"]["mean"] == pytest.approx(greedy_tse / ref_tse, rel=1e-5)
    assert ref["esndcg"]["mean"] == pytest.approx(1.0)
    # R_B = w_o·o − w_len·T/T_max + w_sat·sat (fcr 0, no violations): the reference sells (0.6 ≥ 0.6)
    assert ref["gre"]["mean"] == pytest.approx(1.0 + 0.5 - 0.1, rel=1e-5)
    assert [t["strategy"] for t in ref["transcripts"][0]["turns"]] == ["steady"] * 3


def test_jax_greedy_maximises_the_immediate_gain(shop):
    greedy = policies.JaxGreedy(shop)
    state, _, _, obs = shop.reset(jax.random.PRNGKey(5))
    for t in range(4):
        key = jax.random.PRNGKey(100 + t)
        strategy, reply, valid = jax.jit(greedy)(state, obs, key)
        gains = []
        for k in range(shop.spec.num_strategies):
            r, v = shop.scripted_reply(state, jnp.int32(k), key)
            gains.append(float(shop.step(state, jnp.int32(k), r, v)[2].gain) if obs.allowed[k] else -1.0)
        assert bool(obs.allowed[strategy])
        assert gains[int(strategy)] == pytest.approx(max(gains))
        state, obs, _ = shop.step(state, strategy, reply, valid)


def test_jax_random_stays_inside_the_sop(shop):
    out = jax.device_get(policies.rollout_scripted(shop, jax.random.split(jax.random.PRNGKey(0), 32),
                                             policies.jax_policy(shop, "random")))
    live = out["turn_mask"]
    chosen_allowed = np.take_along_axis(out["allowed"], out["strategy"][..., None], -1)[..., 0]
    assert chosen_allowed[live].all() and (out["sop_valid"][live] == 1).all()
    assert len(np.unique(out["strategy"][live])) >= 5
    # The per-turn arrays are cut from the training driver's Trajectory: the stage read back from each agent header
    # gives the SOP row the policy was offered, and each reaction is the next turn's customer utterance.
    masks = np.asarray(shop.spec.sop.allowed)[out["stage"]]
    np.testing.assert_array_equal(masks[live], out["allowed"][live])
    np.testing.assert_array_equal(out["reaction"][:, :-1], out["customer"][:, 1:])
    assert not out["reaction_valid"][:, -1].any()


def test_evaluate_policy_reports_intervals(shop):
    result = policies.evaluate_policy(shop, "random", 16, seed=0, transcripts=2)
    for key in ("tse", "ntse", "esndcg", "gre"):
        d = result[key]
        assert d["lo"] <= d["mean"] <= d["hi"] and d["n"] >= 2
    assert result["per_episode"]["tse"].shape == (16,)
    assert len(result["transcripts"]) == 2 and result["transcripts"][0]["turns"]


def test_bad_names_are_clear_errors(shop):
    with pytest.raises(ValueError, match="unknown policy"):
        policies.evaluate_policy(shop, "oracle", 4)
    with pytest.raises(ValueError, match="unknown env.name 'nowhere'"):
        registry.make_env("nowhere")
    with pytest.raises(ValueError, match="at least 2"):
        policies.evaluate_policy(TwoMoveWorld(), "reference", 1)


def test_registry_names_kinds_and_the_renamed_world():
    assert registry.names() == ["synthetic_shop", "mg_shopdial", "multiwoz", "tmallbrand"]
    assert [registry.is_pure_jax(n) for n in registry.names()] == [True, False, False, False]
    with pytest.raises(ValueError, match="'mgshop' was renamed to 'mg_shopdial'"):
        registry.entry("mgshop")
