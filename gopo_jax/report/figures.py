"""The comparison's figures as PNG files (matplotlib's Agg canvas; no display needed).

* Figure 1 analogue: per environment, TSE, GRE and (when a real judge produced it) G-Eval of every method as bars
  with 95%-interval whiskers over seeds.
* Figure 3 analogue: GOPO's convergence, held-out `eval/tse` against GOPO iteration, one line per parameter
  setting (mean over that setting's seeds, the seeds themselves drawn faintly), read from each run's metrics.jsonl.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np


def read_curve(run_dir: str | os.PathLike, key: str = "eval/tse", *, offset: int = 0) -> tuple[list[int], list[float]]:
    """(steps - offset, values) of `key` in run_dir/metrics.jsonl; a step logged twice (a resumed run) keeps its
    last value. `offset` turns the run's global step (SFT steps first) into the GOPO iteration."""
    points = {}
    with open(os.path.join(os.fspath(run_dir), "metrics.jsonl")) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
            if isinstance(record, dict) and record.get(key) is not None and isinstance(record.get("step"), int):
                points[record["step"] - offset] = float(record[key])
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _canvas(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415  (slow import, only when drawing)
    from matplotlib.figure import Figure  # noqa: PLC0415
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _half_widths(cis: Sequence[Mapping]) -> np.ndarray:
    """Asymmetric whiskers [2, n] from (mean, lo, hi); 0 where a single seed gives no interval."""
    lo = [c["mean"] - c["lo"] if math.isfinite(c.get("lo", math.nan)) else 0.0 for c in cis]
    hi = [c["hi"] - c["mean"] if math.isfinite(c.get("hi", math.nan)) else 0.0 for c in cis]
    return np.maximum(np.array([lo, hi]), 0.0)


def _save(fig, path: str | os.PathLike) -> str:
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    return os.fspath(path)


def figure1(table: Mapping[str, Mapping[str, Mapping[str, Mapping]]], path: str | os.PathLike, **kwargs) -> str:
    """Draws `draw_figure1(table, **kwargs)` into the PNG `path`; returns the path."""
    return _save(draw_figure1(table, **kwargs), path)


def draw_figure1(table: Mapping[str, Mapping[str, Mapping[str, Mapping]]], *,
                 geval: Mapping[str, Mapping[str, Mapping]] | None = None, geval_reason: str = "",
                 highlight: str = "gopo"):
    """`table[env][method][metric]` = mean_ci dict. One row of panels per environment: TSE, GRE, G-Eval.
    `geval[env][method]` (a mean_ci dict of the G-Eval score) draws the third panel; without it the panel says
    why G-Eval is absent instead of showing a number. The `highlight` method's bars are red. Returns the Figure."""
    envs = list(table)
    fig = _canvas(13.0, 3.6 * max(1, len(envs)))
    panels = (("tse", "TSE"), ("gre", "GRE"), ("geval", "G-Eval"))
    for row, env in enumerate(envs):
        methods = list(table[env])
        for col, (metric, title) in enumerate(panels):
            ax = fig.add_subplot(len(envs), len(panels), row * len(panels) + col + 1)
            if metric == "geval":
                cis = [geval[env][m] for m in methods if m in geval.get(env, {})] if geval else []
                if not cis:
                    ax.text(0.5, 0.5, "G-Eval not available\n" + (geval_reason or "no judge configured"),
                            ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
                    ax.set_axis_off()
                    ax.set_title(f"{env}: {title}")
                    continue
                names = [m for m in methods if m in geval[env]]
            else:
                names = methods
                cis = [table[env][m][metric] for m in names]
            x = np.arange(len(names))
            ax.bar(x, [c["mean"] for c in cis], yerr=_half_widths(cis), capsize=3,
                   color=["tab:red" if n == highlight else "tab:blue" for n in names])
            ax.set_xticks(x, names, rotation=40, ha="right", fontsize=8)
            ax.set_title(f"{env}: {title}")
            ax.axhline(0.0, color="black", linewidth=0.5)
    return fig


def figure3(curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]], path: str | os.PathLike,
            **kwargs) -> str:
    """Draws `draw_figure3(curves, **kwargs)` into the PNG `path`; returns the path."""
    return _save(draw_figure3(curves, **kwargs), path)


def draw_figure3(curves: Mapping[str, Sequence[tuple[Sequence[int], Sequence[float]]]], *,
                 ylabel: str = "held-out TSE", title: str = "GOPO convergence"):
    """`curves[setting]` = one (iterations, values) series per seed. The mean is taken over the seeds at the
    iterations all of them logged. Returns the Figure."""
    fig = _canvas(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    colours = [f"C{i}" for i in range(10)]
    for i, (setting, series) in enumerate(curves.items()):
        series = [s for s in series if len(s[0])]
        if not series:
            continue
        colour = colours[i % len(colours)]
        for steps, values in series:
            ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        common = sorted(set.intersection(*(set(s[0]) for s in series)))
        mean = [np.mean([dict(zip(*s))[t] for s in series]) for t in common]
        ax.plot(common, mean, color=colour, marker="o", markersize=3, label=f"{setting} (n={len(series)})")
    ax.set_xlabel("GOPO iteration (0 = after SFT)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig
