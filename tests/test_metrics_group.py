"""Group statistics of the objectives against values worked by hand."""

import functools
import math

import chex
import jax.numpy as jnp
import numpy as np

from gopo_jax.metrics.group import group_normalise, pairwise_preference_weights, zero_variance

F = functools.partial(jnp.asarray, dtype=jnp.float32)


class GroupTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_group_normalise(self):
        # mean 2, population std sqrt(2/3).
        std = math.sqrt(2.0 / 3.0)
        got = self.variant(functools.partial(group_normalise, eps=1e-6))(F([1.0, 2.0, 3.0]))
        np.testing.assert_allclose(got, [-1 / (std + 1e-6), 0.0, 1 / (std + 1e-6)], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_zero_variance_groups_give_zeros(self):
        fn = self.variant(group_normalise)
        np.testing.assert_array_equal(fn(F([0.1, 0.1, 0.1])), [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(fn(F([0.7])), [0.0])  # a group of one
        assert bool(self.variant(zero_variance)(F([0.3, 0.3])))
        assert not bool(self.variant(zero_variance)(F([0.3, 0.31])))

    @chex.variants(with_jit=True, without_jit=True)
    def test_pairwise_preference_weights(self):
        scores = F([1.0, 3.0, 2.0])
        expected = [[0, 0, 0], [2, 0, 1], [1, 0, 0]]
        np.testing.assert_allclose(self.variant(pairwise_preference_weights)(scores), expected, rtol=1e-6)
        with_margin = self.variant(functools.partial(pairwise_preference_weights, margin=1.5))(scores)
        np.testing.assert_allclose(with_margin, [[0, 0, 0], [2, 0, 0], [0, 0, 0]], rtol=1e-6)
        np.testing.assert_array_equal(self.variant(pairwise_preference_weights)(F([0.5, 0.5])), np.zeros((2, 2)))
