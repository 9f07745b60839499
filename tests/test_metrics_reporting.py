"""Reporting helpers: BCa/t intervals checked against scipy and the textbook BCa formula, pairing, determinism,
degenerate inputs."""

import warnings

import numpy as np
import pytest
from scipy import special, stats

from gopo_jax.metrics.reporting import format_ci, mean_ci, mean_ci_over_seeds, paired_difference


def _textbook_bca(values: np.ndarray, boot_means: np.ndarray, confidence: float) -> tuple[float, float]:
    """Efron & Tibshirani (1993) eq. 14.9–14.15 for the mean, from a given bootstrap distribution."""
    theta = values.mean()
    # Bias correction: normal quantile of the share of resamples below the estimate (ties count half).
    z0 = special.ndtri((np.sum(boot_means < theta) + 0.5 * np.sum(boot_means == theta)) / boot_means.size)
    jackknife = (values.sum() - values) / (values.size - 1)
    dev = jackknife.mean() - jackknife
    acceleration = np.sum(dev**3) / (6.0 * np.sum(dev**2) ** 1.5)
    z = special.ndtri([(1 - confidence) / 2, (1 + confidence) / 2])
    levels = special.ndtr(z0 + (z0 + z) / (1 - acceleration * (z0 + z)))
    return tuple(np.quantile(boot_means, levels))


def test_bootstrap_is_scipy_bca_and_the_textbook_formula():
    values = np.random.default_rng(7).exponential(size=15)  # skewed: BCa and percentile differ
    d = mean_ci(values, n_boot=5000, seed=11, confidence=0.9)
    direct = stats.bootstrap(
        (values,), np.mean, n_resamples=5000, confidence_level=0.9, method="BCa", rng=np.random.default_rng(11)
    )
    np.testing.assert_allclose([d["lo"], d["hi"]], direct.confidence_interval, rtol=1e-12)
    np.testing.assert_allclose(
        [d["lo"], d["hi"]], _textbook_bca(values, direct.bootstrap_distribution, 0.9), rtol=1e-10
    )
    percentile = np.quantile(direct.bootstrap_distribution, [0.05, 0.95])
    assert d["lo"] > percentile[0] and d["hi"] > percentile[1]  # right skew shifts the BCa interval up
    assert d["mean"] == pytest.approx(values.mean()) and d["n"] == 15


def test_bootstrap_interval_of_two_values():
    # Resampled means of [0, 1] are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4: a 95% interval spans [0, 1].
    assert mean_ci([0.0, 1.0]) == dict(mean=0.5, lo=0.0, hi=1.0, n=2)


def test_bootstrap_agrees_with_t_on_a_large_normal_sample():
    values = np.random.default_rng(3).normal(size=2000)
    boot, t = mean_ci(values), mean_ci(values, method="t")
    np.testing.assert_allclose([boot["lo"], boot["hi"]], [t["lo"], t["hi"]], atol=0.1 * (t["hi"] - t["lo"]))


def test_deterministic_given_seed():
    values = np.random.default_rng(5).normal(size=8)
    assert mean_ci(values, seed=4) == mean_ci(values, seed=4)
    assert mean_ci(values, seed=4) != mean_ci(values, seed=5)
    a, b = values, values + np.random.default_rng(6).normal(size=8)
    assert paired_difference(a, b, seed=4) == paired_difference(a, b, seed=4)


def test_constant_values_have_the_point_as_interval_and_single_value_has_none():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the degenerate case is handled, not warned about
        d = mean_ci([0.3] * 5)
    assert (d["lo"], d["hi"]) == (d["mean"], d["mean"]) and d["mean"] == pytest.approx(0.3)
    single = mean_ci([0.7])
    assert single["mean"] == 0.7 and single["n"] == 1 and np.isnan(single["lo"]) and np.isnan(single["hi"])
    assert np.isnan(mean_ci([0.7], method="t")["lo"])


def test_t_interval():
    # mean 2, sd 1, t_{0.975, 2} = 4.302653 → half-width 4.302653/sqrt(3) = 2.484138.
    d = mean_ci([1.0, 2.0, 3.0], method="t")
    np.testing.assert_allclose([d["lo"], d["hi"]], [2 - 2.484138, 2 + 2.484138], rtol=1e-6)


def test_over_seeds_reduces_each_seed_first():
    d = mean_ci_over_seeds([[1.0, 3.0], 2.0, [4.0, 4.0, 4.0]], n_boot=2000)
    assert d["per_seed"] == [2.0, 2.0, 4.0] and d["n"] == 3
    np.testing.assert_allclose(d["mean"], 8.0 / 3.0)
    assert d == dict(mean_ci([2.0, 2.0, 4.0], n_boot=2000), per_seed=[2.0, 2.0, 4.0])


def test_paired_difference_resamples_units_together():
    rng = np.random.default_rng(9)
    b = rng.normal(10.0, 3.0, size=12)  # large spread between units ...
    a = b + rng.normal(0.5, 0.2, size=12)  # ... small, consistent gain of A on each unit
    d = paired_difference(a, b, n_boot=4000, seed=2)
    # Resampling unit indices makes the difference interval the interval of the per-unit differences.
    same = mean_ci(a - b, n_boot=4000, seed=2)
    np.testing.assert_allclose([d["mean_diff"], d["lo"], d["hi"]], [same["mean"], same["lo"], same["hi"]])
    direct = stats.bootstrap(
        (a, b),
        lambda x, y, axis: 100 * np.mean(x - y, axis=axis) / np.mean(y, axis=axis),
        paired=True,
        n_resamples=4000,
        rng=np.random.default_rng(2),
    )
    np.testing.assert_allclose([d["rel_lo"], d["rel_hi"]], direct.confidence_interval, rtol=1e-12)
    assert d["rel_lo"] < d["rel_pct"] < d["rel_hi"] and d["significant"]
    # Resampling A and B independently ignores the pairing: its interval is many times wider and includes 0.
    unpaired = stats.bootstrap(
        (a, b), lambda x, y, axis: np.mean(x, axis=axis) - np.mean(y, axis=axis), n_resamples=4000, rng=2
    ).confidence_interval
    assert unpaired.low < 0 < unpaired.high and unpaired.high - unpaired.low > 5 * (d["hi"] - d["lo"])


def test_paired_difference_degenerate_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # A beats B by exactly 1 on every seed: the difference CI is the point 1; relative 100·1/2 = 50%.
        d = paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose([d["mean_diff"], d["lo"], d["hi"], d["rel_pct"]], [1.0, 1.0, 1.0, 50.0])
    assert d["significant"] and d["n"] == 3
    # Resampled B means lie in [1, 3], so the relative CI lies in [100/3, 100].
    assert 100 / 3 - 1e-9 <= d["rel_lo"] <= 50.0 <= d["rel_hi"] <= 100 + 1e-9
    mixed = paired_difference([1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert mixed["mean_diff"] == 0.0 and mixed["lo"] < 0 < mixed["hi"] and not mixed["significant"]
    # Some resamples of B average to 0: the relative difference has no interval (and no value when mean(b) = 0).
    zero_base = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert zero_base["rel_pct"] == pytest.approx(500.0)
    assert np.isnan(zero_base["rel_lo"]) and np.isnan(zero_base["rel_hi"])
    assert np.isnan(paired_difference([1.0, 2.0], [-1.0, 1.0])["rel_pct"])
    one = paired_difference([1.0], [0.5])
    assert one["mean_diff"] == 0.5 and np.isnan(one["lo"]) and not one["significant"]


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
    with pytest.raises(ValueError, match="method must be"):
        mean_ci([1.0, 2.0], method="percentile")
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)
