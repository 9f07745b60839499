"""Tests for gopo_jax/report/figures.py: what the Figure 1 and Figure 3 analogues draw (panels, bars, whiskers,
lines, labels, values), read back through matplotlib's object API, and the curves read from metrics.jsonl."""
import json
import math

import numpy as np
import pytest
from matplotlib.colors import to_rgba

from gopo_jax.report import figures


def ci(mean, lo=None, hi=None):
    return {"mean": mean, "lo": math.nan if lo is None else lo, "hi": math.nan if hi is None else hi, "n": 3}


TABLE = {
    "shop": {"gopo": {"tse": ci(0.6, 0.5, 0.8), "gre": ci(-0.2, -0.3, -0.1)},
             "ppo": {"tse": ci(0.4), "gre": ci(0.1, 0.0, 0.3)}},
    "multiwoz": {"gopo": {"tse": ci(0.3, 0.2, 0.4), "gre": ci(1.0, 0.5, 1.5)},
                 "sft": {"tse": ci(0.2, 0.1, 0.3), "gre": ci(0.5, 0.4, 0.6)}},
}


def bars(ax):
    return [(p.get_height(), p.get_facecolor()) for p in ax.patches]


def whiskers(ax):
    """[(low end, high end)] of each bar's error bar, from the LineCollection errorbar draws."""
    (collection,) = ax.collections
    return [tuple(sorted(seg[:, 1])) for seg in collection.get_segments()]


def test_figure1_one_row_of_three_panels_per_environment():
    fig = figures.draw_figure1(TABLE, geval_reason="judge not configured")
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["shop: TSE", "shop: GRE", "shop: G-Eval",
                                               "multiwoz: TSE", "multiwoz: GRE", "multiwoz: G-Eval"]
    tse, gre, geval = axes[:3]
    assert [t.get_text() for t in tse.get_xticklabels()] == ["gopo", "ppo"]
    red, blue = to_rgba("tab:red"), to_rgba("tab:blue")
    assert bars(tse) == [(pytest.approx(0.6), red), (pytest.approx(0.4), blue)]
    assert bars(gre) == [(pytest.approx(-0.2), red), (pytest.approx(0.1), blue)]
    # 95% intervals as whiskers; a method with one seed (NaN bounds) gets none rather than a NaN bar.
    np.testing.assert_allclose(whiskers(tse), [(0.5, 0.8), (0.4, 0.4)])
    np.testing.assert_allclose(whiskers(gre), [(-0.3, -0.1), (0.0, 0.3)])
    # Without judge scores the G-Eval panel says why instead of drawing a number.
    assert not geval.axison and not geval.patches
    assert [t.get_text() for t in geval.texts] == ["G-Eval not available\njudge not configured"]
    assert [t.get_text() for t in axes[3].get_xticklabels()] == ["gopo", "sft"]


def test_figure1_draws_geval_for_the_methods_the_judge_scored():
    geval = {"shop": {"ppo": ci(3.5, 3.0, 4.0)}}
    fig = figures.draw_figure1({"shop": TABLE["shop"]}, geval=geval, highlight="ppo")
    assert len(fig.axes) == 3
    tse, _, panel = fig.axes
    assert [c for _, c in bars(tse)] == [to_rgba("tab:blue"), to_rgba("tab:red")]  # highlight follows the label
    assert [t.get_text() for t in panel.get_xticklabels()] == ["ppo"]
    assert bars(panel) == [(pytest.approx(3.5), to_rgba("tab:red"))]
    np.testing.assert_allclose(whiskers(panel), [(3.0, 4.0)])


def test_figure3_mean_over_seeds_at_common_iterations():
    curves = {"beta=0.1": [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.3, 0.4])],
              "beta=1": [([0, 1, 2], [0.5, 0.5, 0.6])],
              "empty": [([], [])]}
    fig = figures.draw_figure3(curves, title="convergence", ylabel="TSE")
    (ax,) = fig.axes
    assert (ax.get_title(), ax.get_ylabel()) == ("convergence", "TSE")
    assert ax.get_xlabel().startswith("GOPO iteration")
    faint = [line for line in ax.lines if line.get_alpha() == 0.25]
    means = [line for line in ax.lines if line.get_alpha() is None]
    assert len(faint) == 3  # one per seed that logged anything
    assert [line.get_label() for line in means] == ["beta=0.1 (n=2)", "beta=1 (n=1)"]
    np.testing.assert_array_equal(means[0].get_xdata(), [0, 1])
    np.testing.assert_allclose(means[0].get_ydata(), [0.2, 0.3])
    np.testing.assert_allclose(means[1].get_ydata(), [0.5, 0.5, 0.6])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["beta=0.1 (n=2)", "beta=1 (n=1)"]


def test_figure_files_are_pngs(tmp_path):
    path = figures.figure1(TABLE, tmp_path / "f1.png")
    assert path == str(tmp_path / "f1.png")
    assert (tmp_path / "f1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figures.figure3({"a": [([0, 1], [0.1, 0.2])]}, tmp_path / "f3.png", title="t")
    assert (tmp_path / "f3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_curve_keeps_the_last_value_of_a_step_and_skips_a_torn_line(tmp_path):
    records = [{"step": 5, "eval/tse": 0.1}, {"step": 6, "train/loss": 1.0}, {"step": 7, "eval/tse": 0.2},
               {"step": 7, "eval/tse": 0.25}, {"step": "x", "eval/tse": 9.0}, {"step": 8, "eval/tse": None}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "ev')
    assert figures.read_curve(tmp_path) == ([5, 7], [0.1, 0.25])
    assert figures.read_curve(tmp_path, offset=5) == ([0, 2], [0.1, 0.25])
    assert figures.read_curve(tmp_path, "train/loss") == ([6], [1.0])
