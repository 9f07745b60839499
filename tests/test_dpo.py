"""DPO baseline loss: hand-computed values on one group."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.algorithms import dpo


def _softplus(x):
    return math.log1p(math.exp(x))


class DPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_single_pair(self):
        fn = self.variant(lambda l, r, s: dpo.dpo_group_loss(l, r, s, beta=0.5))
        # Implicit rewards 0.5 * [0.5, -0.5]; dialogue 0 has the higher R_B: gap 0.5, loss softplus(-0.5).
        loss, aux = fn(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.5]), jnp.array([1.0, 0.0]))
        np.testing.assert_allclose(loss, _softplus(-0.5), rtol=1e-6)
        assert float(aux["accuracy"]) == 1.0 and float(aux["num_pairs"]) == 1.0
        np.testing.assert_allclose(aux["margin"], 0.5, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_ordered_pairs_equal_weight_and_margin(self):
        fn = self.variant(lambda l, r, s: dpo.dpo_group_loss(l, r, s, beta=1.0, margin=0.5))
        logp = jnp.array([0.3, 0.1, -0.2])
        # R_B = [2, 1, 1.2]: pairs (0,1), (0,2); (2,1) is within the margin; (1,2) is not ordered.
        loss, aux = fn(logp, jnp.zeros(3), jnp.array([2.0, 1.0, 1.2]))
        np.testing.assert_allclose(loss, (_softplus(-0.2) + _softplus(-0.5)) / 2, rtol=1e-6)
        assert float(aux["num_pairs"]) == 2.0

    def test_group_without_pairs_is_zero(self):
        loss, aux = dpo.dpo_group_loss(jnp.array([1.0, -1.0]), jnp.zeros(2), jnp.array([0.3, 0.3]), beta=1.0)
        assert float(loss) == 0.0 and float(aux["has_pairs"]) == 0.0

    def test_gradient_raises_chosen_lowers_rejected(self):
        g = jax.grad(lambda l: dpo.dpo_group_loss(l, jnp.zeros(2), jnp.array([1.0, 0.0]), beta=1.0)[0])(jnp.zeros(2))
        assert g[0] < 0 < g[1]

    def test_sequence_log_prob(self):
        out = dpo.sequence_log_prob(jnp.array([[-1.0, -2.0, -4.0]]), jnp.array([[True, False, True]]))
        np.testing.assert_allclose(out, [-5.0])
