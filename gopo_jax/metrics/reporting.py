"""Host-side reporting helpers: means with 95% confidence intervals over episodes and over seeds, and paired
comparisons of two methods on the same seeds (GOPO.md §4: a claim of "better" needs the intervals).

Bootstrap intervals are scipy's bias-corrected and accelerated (BCa) intervals (`scipy.stats.bootstrap`,
Efron & Tibshirani 1993, ch. 14): the units (episodes or seeds) are resampled with replacement `n_boot` times, and
the quantiles of the resampled statistic are shifted for its median bias and skewness. BCa is second-order
accurate where the plain percentile interval is first-order, but no bootstrap can reach past the observed values:
with 3–5 seeds the interval of a mean lies inside [min, max] of the seed means and is optimistic. `method="t"`
gives the Student-t interval, the safer choice at a handful of seeds, and every result carries `n` so a reader
can judge. Fewer than two units give no interval (lo = hi = NaN).
"""

import warnings
from typing import Sequence

import numpy as np
from scipy import stats

# Resampled values held in memory at once (~64 MB of float64): bounds scipy's batches when thousands of episodes
# are the units, without splitting the usual few-seed case.
_MAX_RESAMPLED_VALUES = 1 << 23


def _as_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name}: contains NaN/inf at positions {np.flatnonzero(~np.isfinite(arr))[:10].tolist()}; "
            "drop undefined episodes (e.g. nTSE with a zero reference) before reporting"
        )
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def _bca(samples: tuple, statistic, *, paired: bool, confidence: float, n_boot: int, seed: int) -> tuple:
    """BCa interval (lo, hi) of `statistic` (one value or a vector of values) over the units of `samples`.

    A statistic whose bootstrap distribution is a single value (e.g. the mean of all-equal values) gets the point
    as its interval: every resample agrees, but BCa's acceleration is 0/0 there and scipy returns NaN with a
    DegenerateDataWarning. A statistic that is undefined on some resample (a ratio whose denominator resamples to
    0) gets NaN: its interval does not exist.
    """
    n = samples[0].size
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap(
            samples,
            statistic,
            n_resamples=n_boot,
            batch=max(1, _MAX_RESAMPLED_VALUES // n),
            vectorized=True,
            paired=paired,
            confidence_level=confidence,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    distribution = np.atleast_2d(result.bootstrap_distribution)
    lo = np.atleast_1d(np.asarray(result.confidence_interval.low, dtype=np.float64)).copy()
    hi = np.atleast_1d(np.asarray(result.confidence_interval.high, dtype=np.float64)).copy()
    constant = np.all(distribution == distribution[:, :1], axis=-1)
    lo[constant], hi[constant] = distribution[constant, 0], distribution[constant, 0]
    undefined = ~np.all(np.isfinite(distribution), axis=-1)
    lo[undefined], hi[undefined] = np.nan, np.nan
    return lo, hi


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def mean_ci(values, *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0, method: str = "bootstrap") -> dict:
    """Mean of `values` (one number per unit) with a confidence interval: dict(mean, lo, hi, n).

    `method="bootstrap"`: BCa bootstrap interval (deterministic given `seed`); `method="t"`: Student-t interval.
    """
    arr = _as_1d(values, "mean_ci")
    _check_confidence(confidence)
    if method not in ("bootstrap", "t"):
        raise ValueError(f"mean_ci: method must be 'bootstrap' or 't', got {method!r}")
    mean = float(arr.mean())
    n = int(arr.size)
    if n < 2:
        return dict(mean=mean, lo=float("nan"), hi=float("nan"), n=n)
    if method == "bootstrap":
        (lo,), (hi,) = _bca((arr,), _mean, paired=False, confidence=confidence, n_boot=n_boot, seed=seed)
    else:
        half = stats.t.ppf(0.5 + confidence / 2, n - 1) * arr.std(ddof=1) / np.sqrt(n)
        lo, hi = mean - half, mean + half
    return dict(mean=mean, lo=float(lo), hi=float(hi), n=n)


def mean_ci_over_seeds(per_seed_values: Sequence, **kwargs) -> dict:
    """CI over seeds: each seed is first reduced to its mean over episodes, then the seeds are the resampled units.

    `per_seed_values` is a sequence with one entry per seed, each a number or a sequence of per-episode values
    (seeds may have different episode counts). Episodes within a seed are not independent replicates of training,
    so they are not resampled. Keyword arguments go to `mean_ci`; the result adds `per_seed` (the seed means).
    """
    if len(per_seed_values) == 0:
        raise ValueError("mean_ci_over_seeds: no seeds given")
    seed_means = [
        float(_as_1d(np.atleast_1d(v), f"mean_ci_over_seeds[seed {i}]").mean()) for i, v in enumerate(per_seed_values)
    ]
    return dict(mean_ci(seed_means, **kwargs), per_seed=seed_means)


def _difference_and_relative(a, b, axis=-1):
    diff = np.mean(a - b, axis=axis)
    return np.stack([diff, 100.0 * diff / np.mean(b, axis=axis)])


def paired_difference(a, b, *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of method A against method B on the same units (seeds or episodes), index-aligned.

    Returns dict(mean_diff, lo, hi, rel_pct, rel_lo, rel_hi, n, significant): the mean of `a − b` with its paired
    BCa bootstrap CI, and the relative difference `100 · mean(a − b) / mean(b)` with a CI from the same resamples
    (scipy's `paired=True` resamples unit indices, so each resample keeps a unit's a and b together). `significant`
    is True when the CI of the difference excludes 0. The relative difference is NaN when mean(b) is 0, and its CI
    is NaN when some resample's mean(b) is 0.
    """
    a_arr, b_arr = _as_1d(a, "paired_difference(a)"), _as_1d(b, "paired_difference(b)")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired_difference: a and b must be paired (same units, same order); got {a_arr.size} and "
            f"{b_arr.size} values"
        )
    _check_confidence(confidence)
    n = int(a_arr.size)
    mean_diff = float((a_arr - b_arr).mean())
    base = float(b_arr.mean())
    rel = 100.0 * mean_diff / base if base != 0 else float("nan")
    result = dict(
        mean_diff=mean_diff,
        lo=float("nan"),
        hi=float("nan"),
        rel_pct=rel,
        rel_lo=float("nan"),
        rel_hi=float("nan"),
        n=n,
        significant=False,
    )
    if n < 2:
        return result
    (lo, rel_lo), (hi, rel_hi) = _bca(
        (a_arr, b_arr), _difference_and_relative, paired=True, confidence=confidence, n_boot=n_boot, seed=seed
    )
    result.update(
        lo=float(lo),
        hi=float(hi),
        significant=bool(lo > 0 or hi < 0),
        rel_lo=float(rel_lo),
        rel_hi=float(rel_hi),
    )
    return result


def format_ci(d: dict, digits: int = 3) -> str:
    """`"0.512 ± 0.031"`: the mean (or `mean_diff`) and the half-width (hi − lo)/2 of its interval.

    The BCa interval need not be symmetric; the half-width is a display convenience, the dict keeps lo/hi.
    """
    mean = d["mean"] if "mean" in d else d["mean_diff"]
    half = (d["hi"] - d["lo"]) / 2.0
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
