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

    @chex.variants(with_jit=True, without_jit=True)
    def test_rpo_adds_the_chosen_per_token_nll(self):
        fn = self.variant(lambda l, r, s, n: dpo.dpo_group_loss(l, r, s, beta=1.0, num_tokens=n, rpo_alpha=0.5))
        logp = jnp.array([-4.0, -2.0, -3.0])
        # R_B = [2, 1, 1]: pairs (0,1), (0,2); (1,2) is a tie and makes no pair. Chosen: dialogue 0 (8 tokens) twice.
        loss, aux = fn(logp, jnp.zeros(3), jnp.array([2.0, 1.0, 1.0]), jnp.array([8.0, 2.0, 3.0]))
        dpo_part = (_softplus(2.0) + _softplus(1.0)) / 2
        np.testing.assert_allclose(loss, dpo_part + 0.5 * 4.0 / 8.0, rtol=1e-6)
        np.testing.assert_allclose(aux["chosen_nll"], 0.5, rtol=1e-6)
        assert float(aux["num_pairs"]) == 2.0

    def test_rpo_gradient_raises_the_chosen_beyond_dpo(self):
        def grad(alpha):
            return jax.grad(lambda l: dpo.dpo_group_loss(l, jnp.zeros(2), jnp.array([1.0, 0.0]), beta=1.0,
                                                         num_tokens=jnp.array([4.0, 4.0]), rpo_alpha=alpha)[0])(
                jnp.zeros(2))
        np.testing.assert_allclose(grad(1.0) - grad(0.0), [-0.25, 0.0], atol=1e-7)

    def test_rpo_without_token_counts_is_an_error(self):
        with self.assertRaisesRegex(ValueError, "num_tokens"):
            dpo.dpo_group_loss(jnp.zeros(2), jnp.zeros(2), jnp.array([1.0, 0.0]), beta=1.0, rpo_alpha=1.0)

    def test_zero_variance_groups_carry_no_loss_in_the_batch_mean(self):
        """A group of ties has no pair and no loss; `make_dpo_loss` averages over the groups with pairs only."""
        logp = jnp.array([[0.5, -0.5], [3.0, -3.0]])
        rewards = jnp.array([[1.0, 0.0], [0.7, 0.7]])
        per_group, aux = jax.vmap(lambda l, s: dpo.dpo_group_loss(l, jnp.zeros(2), s, beta=1.0))(logp, rewards)
        np.testing.assert_array_equal(aux["has_pairs"], [1.0, 0.0])
        np.testing.assert_allclose(per_group, [_softplus(-1.0), 0.0], rtol=1e-6)
