"""Results tables of a comparison: seeds -> mean ± 95% CI per metric, and GOPO's relative difference per method.

Input is one record per finished run: `(environment, method label, seed, summary)` with `summary` the run's
`summary.json` (gopo_jax.train.driver). A run's number for a metric is its mean over evaluation episodes; the seeds
are the units of the interval (`mean_ci_over_seeds`), as GOPO.md §4 asks. The relative difference of GOPO against
method M is `paired_difference(GOPO, M)` over the seeds both finished (same seed = same evaluation customers), i.e.
`100 · mean(GOPO − M) / mean(M)` with a bootstrap interval from the same resamples — the form in which the paper
reports "+7.7% TSE over PPO".
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from gopo_jax.metrics.reporting import mean_ci_over_seeds, paired_difference

# Metrics of a run summary block; `ntse` is a plain number there, the others are mean_ci dicts, or null for a metric
# the method does not have (alignment without an Expert: gopo_jax.train.report.EXPERT_ONLY), shown as "—".
# Each means the same for every method (docs/metrics.md, "One meaning per column").
METRICS = ("tse", "ntse", "gre", "esndcg", "alignment", "recognised", "sop_validity", "outcome", "turns")
HEADLINE = ("tse", "gre", "ntse", "esndcg", "alignment", "recognised", "sop_validity", "outcome")
UNDEFINED = "—"
# Relative differences are reported for the paper's metrics (every metric's paired difference marks its cells).
RELATIVE = ("tse", "gre")
# A run's change from its own SFT start (the warm start it began from, evaluated on the same customers).
FROM_SFT = ("tse", "gre", "esndcg")
# Metrics that can be zero or negative (GRE is a mean of R_B, which penalties push below 0): a percentage of such a
# baseline is meaningless (it flips sign and explodes near 0), so the tables show their absolute paired difference.
SIGNED = ("gre",)


def run_value(summary: Mapping[str, Any], metric: str) -> float:
    """A finished run's episode-mean of `metric`, read from its own method block (`summary["method"]`); NaN when
    the block has none."""
    block = summary[summary["method"]]
    value = block.get(metric)
    if value is None:  # a metric the method does not have (alignment without an Expert), or an older summary's
        return float("nan")
    return float(value["mean"] if isinstance(value, Mapping) else value)


def _finite(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _undefined() -> dict:
    """The cell of a metric a method does not have (alignment without an Expert)."""
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0, "undefined": True}


def aggregate(records: Iterable[tuple[str, str, int, Mapping[str, Any]]], *, gopo_label: str = "gopo",
              metrics: Sequence[str] = METRICS, n_boot: int = 10000) -> dict:
    """-> {"table": {env: {label: {metric: ci}}}, "relative": {env: {label: {metric: diff}}},
    "from_sft": {env: {label: {metric: diff}}}, "reference": {env: {metric: ci}}, "seeds": {env: {label: [seeds]}}}.

    `ci` is `mean_ci_over_seeds(...)` (mean, lo, hi, n, per_seed), or an `undefined` cell when the method has no
    such metric (NaN in every seed's summary: alignment without an Expert). `relative[env][label][m]` is
    `paired_difference(GOPO, label)` for every metric both have (its `significant` marks the table's cells);
    `from_sft[env][label][m]` is `paired_difference(final, SFT start)` of each run, paired by seed.
    A label with one seed gets lo = hi = NaN (no interval from one unit).
    """
    by = {}
    for env, label, seed, summary in records:
        by.setdefault(env, {}).setdefault(label, {})[int(seed)] = summary
    table, relative, from_sft, reference, seeds = {}, {}, {}, {}, {}

    def values(runs, order, metric):
        out = [run_value(runs[s], metric) for s in order]
        return None if all(math.isnan(v) for v in out) else out

    for env, labels in by.items():
        table[env], relative[env], from_sft[env], seeds[env] = {}, {}, {}, {}
        for label, runs in labels.items():
            order = sorted(runs)
            seeds[env][label] = order
            row = {}
            for m in metrics:
                v = values(runs, order, m)
                row[m] = _undefined() if v is None else mean_ci_over_seeds(v, n_boot=n_boot)
            table[env][label] = row
            from_sft[env][label] = {
                m: paired_difference([run_value(runs[s], m) for s in order],
                                     [float(runs[s]["sft"][m]["mean"]) for s in order], n_boot=n_boot)
                for m in FROM_SFT if all(m in runs[s].get("sft", {}) for s in order)}
        # The environment's reference policy is evaluated on the same customers in every run of a seed.
        any_runs = next(iter(labels.values()))
        order = sorted(any_runs)
        reference[env] = {m: mean_ci_over_seeds([float(any_runs[s]["reference"][m]["mean"]) for s in order],
                                                n_boot=n_boot) for m in ("tse", "gre")}
        gopo = labels.get(gopo_label)
        if gopo is None:
            continue
        for label, runs in labels.items():
            if label == gopo_label:
                continue
            common = sorted(set(gopo) & set(runs))
            if not common:
                continue
            pairs = {m: (values(gopo, common, m), values(runs, common, m)) for m in metrics}
            relative[env][label] = {m: paired_difference(a, b, n_boot=n_boot)
                                    for m, (a, b) in pairs.items() if a is not None and b is not None}
    return {"table": table, "relative": relative, "from_sft": from_sft, "reference": reference, "seeds": seeds}


def _ci_cell(ci: Mapping[str, Any], digits: int = 3, diff: Mapping[str, Any] | None = None) -> str:
    """`mean [lo, hi]`, with ` *` when `diff` (GOPO's paired difference from this cell) is significant."""
    if ci.get("undefined"):
        return "—"
    mark = " *" if diff is not None and diff.get("significant") else ""
    lo, hi = _finite(ci.get("lo")), _finite(ci.get("hi"))
    if lo is None or hi is None:
        return f"{ci['mean']:.{digits}f} (n={ci.get('n', 1)}){mark}"
    return f"{ci['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]{mark}"


def _diff_cell(d: Mapping[str, Any]) -> str:
    diff, lo, hi = _finite(d.get("mean_diff")), _finite(d.get("lo")), _finite(d.get("hi"))
    mark = " *" if d.get("significant") else ""
    if lo is None or hi is None:
        return f"{diff:+.3f} (n={d.get('n')})"
    return f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark}"


def _rel_cell(d: Mapping[str, Any]) -> str:
    rel, lo, hi = _finite(d.get("rel_pct")), _finite(d.get("rel_lo")), _finite(d.get("rel_hi"))
    if rel is None:
        return "n/a (zero baseline)"
    if lo is None or hi is None:
        return f"{rel:+.1f}% (n={d.get('n')})"
    # The mark belongs to the interval shown: the ratio's BCa interval can include 0 where the difference's (the main
    # table's mark) does not, and a star beside an interval that includes 0 reads as a contradiction.
    mark = " *" if lo > 0 or hi < 0 else ""
    return f"{rel:+.1f}% [{lo:+.1f}, {hi:+.1f}]{mark}"


def markdown(results: Mapping[str, Any], *, gopo_label: str = "gopo", metrics: Sequence[str] = HEADLINE) -> str:
    """results.md: one table per environment (mean [95% CI] over seeds), GOPO's relative differences, failures."""
    lines = ["# Comparison results", ""]
    lines.append("Each cell: mean over seeds of the per-seed evaluation means, with a 95% BCa bootstrap "
                 "interval over seeds in brackets (few seeds make these intervals optimistic; `n` = seeds).")
    lines.append("Relative difference: 100·mean(GOPO − M)/mean(M), paired by seed, with its 95% interval; `*` "
                 "marks a relative difference whose interval excludes 0. In the main table, `*` after a method's cell "
                 "marks a paired difference from GOPO on that metric whose 95% BCa interval excludes 0 (with few seeds "
                 "the two intervals can disagree); `—`: the method has no such metric (alignment without an Expert).")
    for env, labels in results.get("table", {}).items():
        lines += ["", f"## {env}", "", "| method | seeds | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]
        ref = results.get("reference", {}).get(env, {})
        if ref:
            lines.append("| reference policy | " + str(ref["tse"].get("n")) + " | " + " | ".join(
                _ci_cell(ref[m]) if m in ref else "" for m in metrics) + " |")
        rel = results.get("relative", {}).get(env, {})
        for label, row in labels.items():
            n = results.get("seeds", {}).get(env, {}).get(label, [])
            diffs = rel.get(label, {})
            lines.append(f"| {label} | {len(n)} | " + " | ".join(_ci_cell(row[m], diff=diffs.get(m))
                                                                 for m in metrics) + " |")
        if rel:
            keys = [k for k in RELATIVE if all(k in d for d in rel.values())]
            lines += ["", f"GOPO ({gopo_label}) relative to each method:", "",
                      "| vs method | " + " | ".join(f"Δ{k} (absolute)" if k in SIGNED else f"Δ{k} %" for k in keys)
                      + " |", "|---|" + "---|" * len(keys)]
            for label, diffs in rel.items():
                lines.append(f"| {label} | " + " | ".join(
                    _diff_cell(diffs[k]) if k in SIGNED else _rel_cell(diffs[k]) for k in keys) + " |")
        start = results.get("from_sft", {}).get(env, {})
        if start:
            keys = [k for k in FROM_SFT if all(k in d for d in start.values())]
            lines += ["", "Change from each run's own SFT start (final − SFT, paired by seed, same customers):", "",
                      "| method | " + " | ".join(f"Δ{k}" for k in keys) + " |", "|---|" + "---|" * len(keys)]
            for label, diffs in start.items():
                lines.append(f"| {label} | " + " | ".join(_diff_cell(diffs[k]) for k in keys) + " |")
    failed = [r for r in results.get("runs", []) if r.get("status") == "failed"]
    if failed:
        lines += ["", "## Failed runs", "", "| environment | method | seed | error |", "|---|---|---|---|"]
        for r in failed:
            error = str(r.get("error", "")).replace("|", "\\|").replace("\n", " ")[:300]
            lines.append(f"| {r['env']} | {r['label']} | {r['seed']} | {error} |")
    pending = [r for r in results.get("runs", []) if r.get("status") == "not run"]
    if pending:
        by_label: dict[tuple[str, str], list] = {}
        for r in pending:
            by_label.setdefault((r["env"], r["label"]), []).append(r["seed"])
        lines += ["", f"Not trained (yet): {len(pending)} runs, rerun the comparison to train them: " + "; ".join(
            f"{env}/{label} seeds {seeds}" for (env, label), seeds in by_label.items()) + "."]
    geval = results.get("geval")
    if geval is not None and not geval.get("available"):
        lines += ["", f"G-Eval: not reported ({geval.get('reason', 'no judge configured')})."]
    elif geval is not None:
        lines += ["", f"G-Eval (`geval` column): judge {geval['judge']}; per run, the mean over the criteria "
                      f"{geval['criteria']} of the judge's probability-weighted 1-5 scores of its held-out turns."]
    if results.get("training_seconds"):
        lines += ["", "Training time of the finished runs (their summed wall time, the seeds of a vmapped group "
                      "once; processes sharing cores stretch each run): " + "; ".join(
                          f"{stage} " + ", ".join(f"{env} {s / 3600:.2f} h" for env, s in by_env.items())
                          for stage, by_env in results["training_seconds"].items() if by_env) + "."]
    if "wall_seconds" in results:
        lines += ["", f"Wall time of this invocation: {results['wall_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def tuning_markdown(tuning: Mapping[str, Any]) -> str:
    """The equal tuning budget: each grid's settings, their validation scores (mean [95% CI] over the tuning seeds)
    and the setting selected, per environment."""
    lines = ["", "## Tuning (validation customers)", ""]
    selection = tuning.get("selection", {})
    if not selection:
        return "\n".join(lines + ["No method was tuned.", ""])
    if all(entry["tuning_seeds"] == 0 for by_label in selection.values() for entry in by_label.values()):
        grids = "; ".join(f"{label}: {', '.join(entry['grid'])}" for label, entry in next(iter(selection.values()))
                          .items())
        return "\n".join(lines + ["Not tuned (`tuning_seeds = 0`): every method ran its grid's first setting, its "
                                   f"defaults. The grids (configs/tuning.py): {grids}.", ""])
    for env, by_label in selection.items():
        for label, entry in by_label.items():
            if entry.get("tuned_on", env) != env:
                lines += [f"### {env} · {label}: the setting selected on {entry['tuned_on']} "
                          f"({entry.get('setting') or 'not selected yet'}; not tuned here)", ""]
                continue
            lines += [f"### {env} · {label} (by validation {entry['metric']}, {entry['tuning_seeds']} seeds)", "",
                      "| setting | overrides | validation score | selected |", "|---|---|---|---|"]
            for setting, overrides in entry["grid"].items():
                shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(the method's defaults)"
                score = entry["scores"].get(setting)
                cell = _ci_cell(score) if score is not None else "not finished"
                chosen = "**selected**" if setting == entry.get("setting") else ""
                lines.append(f"| {setting} | {shown} | {cell} | {chosen} |")
            if not entry.get("complete"):
                lines.append("")
                lines.append("Tuning not finished: the runs this grid tunes wait for it.")
            lines.append("")
    return "\n".join(lines) + "\n"
