"""R_B and GRE against values worked by hand."""

import functools

import chex
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gopo_jax.metrics.business import BusinessWeights, business_reward, gre

F = functools.partial(jnp.asarray, dtype=jnp.float32)
B = functools.partial(jnp.asarray, dtype=bool)


class BusinessRewardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_default_weights(self):
        # 1·1 + 0.5·0.8 + 0.5·0 − 1·(1/4) − 0.1·4/10 = 1.11; the padded 5th slot (v=0) must not count.
        fn = self.variant(functools.partial(business_reward, t_max=10))
        got = fn(F(1.0), F(0.8), F(0.0), F([1, 0, 1, 1, 0]), B([1, 1, 1, 1, 0]))
        np.testing.assert_allclose(got, 1.11, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_weights_are_traced_not_static(self):
        weights = BusinessWeights(w_o=2.0, w_sat=0.0, w_fcr=1.0, w_sop=3.0, w_len=1.0)
        fn = self.variant(functools.partial(business_reward, t_max=4))
        # 2·0 + 0 + 1·1 − 3·(2/2) − 1·2/4 = −2.5
        got = fn(F(0.0), F(0.9), F(1.0), F([0, 0]), B([1, 1]), weights=weights)
        np.testing.assert_allclose(got, -2.5, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_edge_cases(self):
        fn = self.variant(functools.partial(business_reward, t_max=5))
        # Length 1, SOP-valid: 1 + 0.5 + 0.5 − 0 − 0.1/5.
        np.testing.assert_allclose(fn(F(1.0), F(1.0), F(1.0), F([1.0]), B([1])), 1.98, rtol=1e-6)
        # All masked: no SOP or length penalty, only the episode-level terms.
        np.testing.assert_allclose(fn(F(1.0), F(0.0), F(0.0), F([0.0, 0.0]), B([0, 0])), 1.0, rtol=1e-6)

    def test_from_config(self):
        cfg = ml_collections.ConfigDict({"w_o": 2, "w_len": 0.0})
        assert BusinessWeights.from_config(cfg) == BusinessWeights(w_o=2.0, w_len=0.0)
        with pytest.raises(ValueError, match="w_sopp"):
            BusinessWeights.from_config({"w_sopp": 1.0})

    def test_rejects_bad_t_max(self):
        with pytest.raises(ValueError, match="t_max"):
            business_reward(F(1.0), F(1.0), F(1.0), F([1.0]), B([1]), t_max=0)


class GreTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_mean(self):
        np.testing.assert_allclose(self.variant(gre)(F([1.0, 2.0, 4.5])), 2.5, rtol=1e-6)
        np.testing.assert_allclose(self.variant(gre)(F([1.0, 2.0, 100.0]), B([1, 1, 0])), 1.5, rtol=1e-6)
