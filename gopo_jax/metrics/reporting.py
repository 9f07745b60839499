"""Host-side reporting helpers: means with bootstrap 95% confidence intervals over episodes and over seeds, and
paired comparisons of two methods on the same seeds (GOPO.md §4: a claim of "better" needs the intervals).

All intervals are bootstrap *percentile* intervals: resample the units (episodes or seeds) with replacement
`n_boot` times, take the statistic of each resample, and report its (α/2, 1−α/2) quantiles. With few units (3–5
seeds) a percentile bootstrap is known to be too narrow; the result carries `n` so a reader can judge, and
`method="t"` gives the Student-t interval instead. Fewer than two units give no interval (lo = hi = NaN).
"""

from typing import Sequence

import numpy as np
from scipy import stats


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


def _bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def mean_ci(values, *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0, method: str = "bootstrap") -> dict:
    """Mean of `values` (one number per unit) with a confidence interval: dict(mean, lo, hi, n)."""
    arr = _as_1d(values, "mean_ci")
    _check_confidence(confidence)
    mean = float(arr.mean())
    n = int(arr.size)
    if n < 2:
        return dict(mean=mean, lo=float("nan"), hi=float("nan"), n=n)
    alpha = 1.0 - confidence
    if method == "bootstrap":
        boot = arr[_bootstrap_indices(n, n_boot, seed)].mean(axis=1)
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    elif method == "t":
        half = stats.t.ppf(1 - alpha / 2, n - 1) * arr.std(ddof=1) / np.sqrt(n)
        lo, hi = mean - half, mean + half
    else:
        raise ValueError(f"mean_ci: method must be 'bootstrap' or 't', got {method!r}")
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


def paired_difference(a, b, *, confidence: float = 0.95, n_boot: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of method A against method B on the same units (seeds or episodes), index-aligned.

    Returns dict(mean_diff, lo, hi, rel_pct, rel_lo, rel_hi, n, significant): the mean of `a − b` with its bootstrap
    percentile CI, and the relative difference `100 · mean(a − b) / mean(b)` with a CI from the same resamples
    (each resample recomputes both means, so the pairing is kept). `significant` is True when the CI of the
    difference excludes 0. The relative difference is NaN when mean(b) is 0.
    """
    a_arr, b_arr = _as_1d(a, "paired_difference(a)"), _as_1d(b, "paired_difference(b)")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"paired_difference: a and b must be paired (same units, same order); got {a_arr.size} and "
            f"{b_arr.size} values"
        )
    _check_confidence(confidence)
    n = int(a_arr.size)
    diff = a_arr - b_arr
    mean_diff = float(diff.mean())
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
    alpha = 1.0 - confidence
    idx = _bootstrap_indices(n, n_boot, seed)
    boot_diff = diff[idx].mean(axis=1)
    lo, hi = np.quantile(boot_diff, [alpha / 2, 1 - alpha / 2])
    result.update(lo=float(lo), hi=float(hi), significant=bool(lo > 0 or hi < 0))
    boot_base = b_arr[idx].mean(axis=1)
    if np.all(boot_base != 0):
        rel_lo, rel_hi = np.quantile(100.0 * boot_diff / boot_base, [alpha / 2, 1 - alpha / 2])
        result.update(rel_lo=float(rel_lo), rel_hi=float(rel_hi))
    return result


def format_ci(d: dict, digits: int = 3) -> str:
    """`"0.512 ± 0.031"`: the mean (or `mean_diff`) and the half-width (hi − lo)/2 of its interval.

    The percentile interval need not be symmetric; the half-width is a display convenience, the dict keeps lo/hi.
    """
    mean = d["mean"] if "mean" in d else d["mean_diff"]
    half = (d["hi"] - d["lo"]) / 2.0
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
