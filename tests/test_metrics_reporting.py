"""Reporting helpers: means, bootstrap/t intervals and paired differences on small hand-worked cases."""

import numpy as np
import pytest

from gopo_jax.metrics.reporting import format_ci, mean_ci, mean_ci_over_seeds, paired_difference


def test_bootstrap_interval_of_two_values():
    # Resamples of [0, 1] have means 0 (prob 1/4), 0.5 (1/2), 1 (1/4): the 2.5% / 97.5% quantiles are 0 and 1.
    d = mean_ci([0.0, 1.0], n_boot=4000)
    assert d == dict(mean=0.5, lo=0.0, hi=1.0, n=2)


def test_constant_values_have_zero_width_and_single_value_has_none():
    d = mean_ci([0.3] * 5)
    np.testing.assert_allclose([d["mean"], d["lo"], d["hi"]], [0.3, 0.3, 0.3])
    single = mean_ci([0.7])
    assert single["mean"] == 0.7 and single["n"] == 1 and np.isnan(single["lo"]) and np.isnan(single["hi"])


def test_t_interval():
    # mean 2, sd 1, t_{0.975, 2} = 4.302653 → half-width 4.302653/sqrt(3) = 2.484138.
    d = mean_ci([1.0, 2.0, 3.0], method="t")
    np.testing.assert_allclose([d["lo"], d["hi"]], [2 - 2.484138, 2 + 2.484138], rtol=1e-6)


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    small, large = mean_ci(rng.normal(size=20)), mean_ci(rng.normal(size=2000))
    assert small["lo"] < small["mean"] < small["hi"]
    assert (large["hi"] - large["lo"]) < (small["hi"] - small["lo"]) / 5


def test_over_seeds_reduces_each_seed_first():
    d = mean_ci_over_seeds([[1.0, 3.0], 2.0, [4.0, 4.0, 4.0]])
    assert d["per_seed"] == [2.0, 2.0, 4.0] and d["n"] == 3
    np.testing.assert_allclose(d["mean"], 8.0 / 3.0)


def test_paired_difference():
    # A beats B by exactly 1 on every seed: the difference CI is the point 1; relative 100·1/2 = 50%.
    d = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose([d["mean_diff"], d["lo"], d["hi"], d["rel_pct"]], [1.0, 1.0, 1.0, 50.0])
    assert d["significant"] and d["n"] == 3
    # Resampled B means lie in [1, 3], so the relative CI lies in [100/3, 100].
    assert 100 / 3 - 1e-9 <= d["rel_lo"] <= 50.0 <= d["rel_hi"] <= 100 + 1e-9
    mixed = paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert mixed["mean_diff"] == 0.0 and not mixed["significant"]


def test_format_ci():
    assert format_ci(dict(mean=0.512, lo=0.481, hi=0.543, n=5)) == "0.512 ± 0.031"
    assert format_ci(dict(mean_diff=-0.25, lo=-0.5, hi=0.0)) == "-0.250 ± 0.250"


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="NaN"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="paired"):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        mean_ci([])
