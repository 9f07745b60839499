"""ESNDCG closed form, Monte-Carlo estimator and ranked-list variant against values worked by hand."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.metrics.esndcg import esndcg, esndcg_monte_carlo, esndcg_ranked

F = functools.partial(jnp.asarray, dtype=jnp.float32)
B = functools.partial(jnp.asarray, dtype=bool)
A = 1.0 / math.log2(3)  # w_2

# rel = [2, 0, 1], R = 2, p = 0.5: gains [3, 0, 1], ideal 3 per turn, w = [1, A, 1/2].
# NDCG@1 = 1, NDCG@2 = 3/(3(1+A)), NDCG@3 = 3.5/(3(1.5+A)); P(L) = [1/2, 1/4, 1/4].
WORKED = 0.5 * 1.0 + 0.25 / (1.0 + A) + 0.25 * 3.5 / (3.0 * (1.5 + A))


class EsndcgTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_worked_example(self):
        got = self.variant(functools.partial(esndcg, p=0.5, max_rel=2.0))(F([2, 0, 1]), B([1, 1, 1]))
        np.testing.assert_allclose(got, WORKED, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_patience_uses_valid_turns_not_padded_length(self):
        # Same three valid turns with a hole and right padding: P(T) must sit on the 3rd valid turn.
        got = self.variant(functools.partial(esndcg, p=0.5, max_rel=2.0))(F([2, 2, 0, 1, 2]), B([1, 0, 1, 1, 0]))
        np.testing.assert_allclose(got, WORKED, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_edge_cases(self):
        fn = self.variant(functools.partial(esndcg, p=0.8, max_rel=2.0))
        np.testing.assert_allclose(fn(F([1.0]), B([1])), 1.0 / 3.0, rtol=1e-6)  # length 1: NDCG@1
        np.testing.assert_allclose(fn(F([1.0, 2.0]), B([0, 0])), 0.0)  # all masked
        np.testing.assert_allclose(fn(F([2.0, 2.0, 2.0, 2.0]), B([1, 1, 1, 0])), 1.0, rtol=1e-6)  # maximal relevance
        np.testing.assert_allclose(fn(F([0.0, 0.0]), B([1, 1])), 0.0)  # SOP violations everywhere

    @chex.variants(with_jit=True, without_jit=True)
    def test_extreme_patience(self):
        rel, mask = F([2, 0, 1]), B([1, 1, 1])
        # p = 0 stops after turn 1 (NDCG@1); p = 1 reads to the end (NDCG@T).
        np.testing.assert_allclose(
            self.variant(functools.partial(esndcg, p=0.0, max_rel=2.0))(rel, mask), 1.0, rtol=1e-6
        )
        np.testing.assert_allclose(
            self.variant(functools.partial(esndcg, p=1.0, max_rel=2.0))(rel, mask), 3.5 / (3.0 * (1.5 + A)), rtol=1e-6
        )

    def test_rejects_nonpositive_max_rel(self):
        with pytest.raises(ValueError, match="max_rel"):
            esndcg(F([1.0]), B([1]), max_rel=0.0)


class EsndcgMonteCarloTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_converges_to_closed_form(self):
        rel = F([3, 1, 0, 2, 3, 0, 1, 2, 2, 9])
        mask = B([1, 1, 0, 1, 1, 1, 1, 1, 1, 0])
        kwargs = dict(p=0.8, max_rel=3.0)
        closed = esndcg(rel, mask, **kwargs)
        mc = self.variant(functools.partial(esndcg_monte_carlo, num_samples=100_000, **kwargs))(
            jax.random.key(0), rel, mask
        )
        assert abs(float(mc) - float(closed)) < 0.005, (float(mc), float(closed))

    @chex.variants(with_jit=True, without_jit=True)
    def test_worked_example_and_edges(self):
        mc = self.variant(functools.partial(esndcg_monte_carlo, p=0.5, max_rel=2.0, num_samples=100_000))
        assert abs(float(mc(jax.random.key(1), F([2, 0, 1]), B([1, 1, 1]))) - WORKED) < 0.005
        np.testing.assert_allclose(mc(jax.random.key(1), F([2, 0, 1]), B([0, 0, 0])), 0.0)


class EsndcgRankedTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_single_item_lists_equal_esndcg(self):
        got = self.variant(functools.partial(esndcg_ranked, p=0.5, p_down=0.7, max_rel=2.0))(
            F([[2], [0], [1]]), B([1, 1, 1])
        )
        np.testing.assert_allclose(got, WORKED, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_two_item_list(self):
        # One turn, list relevances [2, 0], R = 2, p_down = 0.5: rank 2 is read with prob 1/2 at discount A.
        # expected gain 3, expected ideal 3(1 + A/2).
        fn = self.variant(functools.partial(esndcg_ranked, p=0.8, p_down=0.5, max_rel=2.0))
        np.testing.assert_allclose(fn(F([[2, 0]]), B([1])), 1.0 / (1.0 + 0.5 * A), rtol=1e-6)
        # Relevant item second: gain 3·A/2 against the same ideal.
        np.testing.assert_allclose(fn(F([[0, 2]]), B([1])), 0.5 * A / (1.0 + 0.5 * A), rtol=1e-6)

    def test_item_mask_stops_the_scan(self):
        got = esndcg_ranked(F([[2, 0]]), B([1]), p=0.8, p_down=0.5, max_rel=2.0, item_mask=B([[1, 0]]))
        np.testing.assert_allclose(got, 1.0, rtol=1e-6)
