"""GOPO objectives: hand-computed values, jitted and un-jitted."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.algorithms import gopo
from gopo_jax.dialogue.sop import masked_strategy_log_softmax


class ObjectivesTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_preference_loss_hand_value(self):
        fn = self.variant(lambda l, r, m, s: gopo.expert_preference_loss(l, r, m, s, beta_pref=1.0))
        logp = jnp.array([[0.5, 0.5], [0.0, -5.0]])
        ref = jnp.zeros_like(logp)
        mask = jnp.array([[True, True], [True, False]])  # ℓ = [1, 0]
        loss, m = fn(logp, ref, mask, jnp.array([1.0, 0.0]))
        np.testing.assert_allclose(loss, math.log1p(math.exp(-1.0)), rtol=1e-6)
        assert float(m["has_pairs"]) == 1.0 and float(m["preference_accuracy"]) == 1.0

    @chex.variants(with_jit=True, without_jit=True)
    def test_preference_loss_weights_pairs_by_score_gap(self):
        fn = self.variant(lambda l, s: gopo.expert_preference_loss(l, None, jnp.ones((3, 1), bool), s, beta_pref=2.0))
        ell = jnp.array([[0.3], [0.1], [-0.2]])
        scores = jnp.array([3.0, 1.0, 0.0])
        loss, _ = fn(ell, scores)
        sp = lambda x: math.log1p(math.exp(-2.0 * x))
        expected = (2 * sp(0.2) + 3 * sp(0.5) + 1 * sp(0.3)) / 6
        np.testing.assert_allclose(loss, expected, rtol=1e-6)

    def test_preference_loss_without_pairs_is_zero(self):
        loss, m = gopo.expert_preference_loss(jnp.ones((2, 3)), None, jnp.ones((2, 3), bool), jnp.array([1.0, 1.0]),
                                              beta_pref=1.0)
        assert float(loss) == 0.0 and float(m["has_pairs"]) == 0.0

    def test_preference_gradient_prefers_better_trajectory(self):
        scores = jnp.array([1.0, 0.0])
        grad = jax.grad(lambda l: gopo.expert_preference_loss(l, None, jnp.ones((2, 1), bool), scores,
                                                              beta_pref=1.0)[0])(jnp.zeros((2, 1)))
        assert grad[0, 0] < 0 < grad[1, 0]

    @chex.variants(with_jit=True, without_jit=True)
    def test_clipped_surrogate(self):
        fn = self.variant(lambda lp, old, a, m: gopo.clipped_surrogate(lp, old, a, m, clip_eps=0.2))
        lp = jnp.log(jnp.array([1.5, 1.5, 0.5, 1.0]))
        loss, clipped, _ = fn(lp, jnp.zeros(4), jnp.array([1.0, -1.0, 1.0, 7.0]), jnp.array([True, True, True, False]))
        np.testing.assert_allclose(loss, [-1.2, 1.5, -0.5, 0.0], rtol=1e-6)
        np.testing.assert_array_equal(clipped, [True, True, True, False])

    @chex.variants(with_jit=True, without_jit=True)
    def test_cs_turn_rewards(self):
        fn = self.variant(lambda a, v, q, s, mu: gopo.cs_turn_rewards(a, v, q, s, mu, lambda_s=0.5))
        r = fn(jnp.array([[1.0, 0.0, 1.0]]), jnp.array([[1.0, 1.0, 0.0]]), jnp.array([[0.2, 0.9, 0.9]]),
               jnp.array([2.0]), jnp.array(0.3))
        np.testing.assert_allclose(r, [[0.2 + 1.0, -0.3, 0.0]], rtol=1e-6)

    def test_normalise_over_valid(self):
        out = gopo.normalise_over_valid(jnp.array([1.0, 3.0, 100.0]), jnp.array([True, True, False]))
        np.testing.assert_allclose(out, [-1.0, 1.0, 0.0], atol=1e-5)
        np.testing.assert_array_equal(gopo.normalise_over_valid(jnp.ones(3), jnp.ones(3, bool)), 0.0)

    def test_k3_kl_and_aggregation(self):
        np.testing.assert_allclose(gopo.k3_kl(jnp.array([-1.0]), jnp.array([-1.0])), [0.0])
        kl = gopo.k3_kl(jnp.array([-1.0]), jnp.array([-2.0]))
        np.testing.assert_allclose(kl, [math.exp(-1) + 1 - 1], rtol=1e-6)
        v = jnp.array([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
        m = jnp.array([[True, True, True], [True, False, False]])
        np.testing.assert_allclose(gopo.aggregate_tokens(v, m, "token-mean"), 7 / 4)
        np.testing.assert_allclose(gopo.aggregate_tokens(v, m, "seq-mean-token-mean"), 2.5)
        with pytest.raises(ValueError, match="aggregation"):
            gopo.aggregate_tokens(v, m, "sum")

    def test_strategy_kl_exact(self):
        allowed = jnp.array([True, True, False])
        lp = masked_strategy_log_softmax(jnp.array([0.0, 0.0, 9.0]), allowed)
        ref = masked_strategy_log_softmax(jnp.array([0.0, math.log(3.0), 0.0]), allowed)
        expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
        np.testing.assert_allclose(gopo.strategy_kl(lp, ref, allowed), expected, rtol=1e-5)
        np.testing.assert_allclose(gopo.strategy_entropy(lp, allowed), math.log(2.0), rtol=1e-6)

    def test_dual_ascent(self):
        assert float(gopo.update_multiplier(jnp.array(0.0), jnp.array(0.01), lr=1.0, target=0.05)) == 0.0
        np.testing.assert_allclose(gopo.update_multiplier(jnp.array(0.1), jnp.array(0.25), lr=0.5, target=0.05), 0.2)

    def test_turn_to_token(self):
        out = gopo.turn_to_token(jnp.array([5.0, 7.0]), jnp.array([-1, 0, 0, 1]))
        np.testing.assert_allclose(out, [0.0, 5.0, 5.0, 7.0])

    def test_registry(self):
        assert gopo.get_expert_loss("preference") is gopo.expert_preference_loss
        with pytest.raises(ValueError, match="expert_loss"):
            gopo.get_expert_loss("nope")
