"""TSE / nTSE against values worked by hand, jitted and un-jitted."""

import functools
import math

import chex
import jax.numpy as jnp
import numpy as np

from gopo_jax.metrics.tse import ntse, tse

F = functools.partial(jnp.asarray, dtype=jnp.float32)
B = functools.partial(jnp.asarray, dtype=bool)


class TseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_three_turns(self):
        # S = [1, 0.9, 0.45], w = [1, 1/log2(3), 1/2].
        expected = 0.5 * 1.0 + 0.9 * 0.3 / math.log2(3) + 0.45 * 0.2 / 2.0
        got = self.variant(tse)(F([0.5, 0.3, 0.2]), F([0.9, 0.5, 1.0]), B([1, 1, 1]))
        np.testing.assert_allclose(got, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_turns_are_ignored_wherever_they_are(self):
        # Garbage in masked slots (a hole and right padding) must not change the value of the three valid turns.
        expected = 0.5 * 1.0 + 0.9 * 0.3 / math.log2(3) + 0.45 * 0.2 / 2.0
        got = self.variant(tse)(F([0.5, 0.9, 0.3, 0.2, 0.7]), F([0.9, 0.0, 0.5, 1.0, 0.0]), B([1, 0, 1, 1, 0]))
        np.testing.assert_allclose(got, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_edge_cases(self):
        fn = self.variant(tse)
        np.testing.assert_allclose(fn(F([0.4]), F([0.0]), B([1])), 0.4, rtol=1e-6)  # length 1: c of last turn unused
        np.testing.assert_allclose(fn(F([0.4, 0.6]), F([1.0, 1.0]), B([0, 0])), 0.0)  # all masked
        # Zero continuation after turn 1: its own gain counts, everything later is lost.
        np.testing.assert_allclose(fn(F([0.2, 0.8]), F([0.0, 1.0]), B([1, 1])), 0.2, rtol=1e-6)
        # All progress on turn 1 with full engagement is the maximum, 1.
        np.testing.assert_allclose(fn(F([1.0, 0.0]), F([1.0, 1.0]), B([1, 1])), 1.0, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_ntse_is_a_ratio_of_means(self):
        fn = self.variant(ntse)
        # Customer 2 is one the reference barely serves: a mean of per-dialogue ratios would be (0.5 + 20) / 2.
        np.testing.assert_allclose(fn(F([0.2, 0.2]), F([0.4, 0.01])), 0.4 / 0.41, rtol=1e-6)
        assert np.isnan(fn(F([0.5, 0.1]), F([0.0, 0.0])))  # a reference with no engaged progress: undefined

    def test_ntse_needs_the_same_customers(self):
        with self.assertRaises(AssertionError):
            ntse(F([0.2, 0.2]), F([0.4]))

    def test_rejects_wrong_dtype(self):
        with self.assertRaises(AssertionError):
            tse(F([0.5]), F([1.0]), F([1.0]))  # float mask
