"""Tests for gopo_jax/report/tables.py beyond the two-method case of test_compare.py: which seeds pair up, the
reference row, one-seed and zero-baseline cells, and the failed / pending / G-Eval notes of results.md."""
import math

import pytest

from gopo_jax.report import tables


def summary(method, **values):
    """A run's summary.json with the given episode means (every other metric 0) for `method` and the reference."""
    block = {m: {"mean": values.get(m, 0.0)} for m in tables.METRICS if m != "ntse"}
    block["ntse"] = values.get("ntse", 0.0)  # a plain number in real summaries
    return {"method": method, method: block, "reference": {"tse": {"mean": 0.5}, "gre": {"mean": 2.0}}}


def test_run_value_reads_the_runs_own_block():
    s = summary("ppo", tse=0.25, ntse=0.5)
    assert tables.run_value(s, "tse") == 0.25 and tables.run_value(s, "ntse") == 0.5


def test_aggregate_pairs_only_common_seeds():
    records = [("shop", "gopo", 0, summary("gopo", tse=0.4, gre=1.0)),
               ("shop", "gopo", 1, summary("gopo", tse=0.6, gre=3.0)),
               ("shop", "gopo", 2, summary("gopo", tse=0.8, gre=5.0)),
               ("shop", "ppo", 2, summary("ppo", tse=0.4, gre=1.0)),
               ("shop", "ppo", 1, summary("ppo", tse=0.3, gre=1.0)),
               ("mwoz", "sft", 0, summary("sft", tse=0.1))]
    out = tables.aggregate(records, n_boot=100)
    assert out["seeds"] == {"shop": {"gopo": [0, 1, 2], "ppo": [1, 2]}, "mwoz": {"sft": [0]}}
    assert out["table"]["shop"]["ppo"]["tse"]["per_seed"] == pytest.approx([0.3, 0.4])  # seed order, not input order
    rel = out["relative"]["shop"]["ppo"]
    assert set(tables.RELATIVE) <= set(rel)  # every metric both have (its significance marks the main table)
    assert rel["tse"]["n"] == 2 and rel["tse"]["mean_diff"] == pytest.approx(0.35)  # seeds 1, 2: (0.3 + 0.4) / 2
    assert rel["gre"]["rel_pct"] == pytest.approx(300.0)  # (4 - 1) / 1
    assert out["reference"]["shop"]["tse"]["mean"] == pytest.approx(0.5)
    # An environment without GOPO has no relative block; one seed has no interval.
    assert out["relative"]["mwoz"] == {}
    single = out["table"]["mwoz"]["sft"]["tse"]
    assert single["mean"] == pytest.approx(0.1) and math.isnan(single["lo"]) and math.isnan(single["hi"])


def test_markdown_cells_and_notes():
    records = [("shop", "gopo", s, summary("gopo", tse=0.5, gre=1.0)) for s in (0, 1)]
    records += [("shop", "ppo", s, summary("ppo", tse=0.0, gre=1.0)) for s in (0, 1)]
    records += [("shop", "sft", 0, summary("sft", tse=0.25, gre=0.0))]
    out = tables.aggregate(records, n_boot=100)
    md = tables.markdown(out | {
        "runs": [{"env": "shop", "label": "dpo", "seed": 0, "status": "failed", "error": "a|b\nc"},
                 {"env": "shop", "label": "dpo", "seed": 1, "status": "not run"},
                 {"env": "shop", "label": "dpo", "seed": 2, "status": "not run"}],
        "geval": {"available": False, "reason": "no API key"}, "wall_seconds": 61.6,
        "training_seconds": {"comparison": {"shop": 5400.0, "mg_shopdial": 900.0}, "tuning": {}}},
        metrics=("tse", "gre"))
    lines = md.splitlines()
    assert "| method | seeds | tse | gre |" in lines
    assert "| reference policy | 2 | 0.500 [0.500, 0.500] | 2.000 [2.000, 2.000] |" in lines
    assert "| sft | 1 | 0.250 (n=1) | 0.000 (n=1) |" in lines
    assert "| ppo | n/a (zero baseline) | +0.000 [+0.000, +0.000] |" in lines  # TSE of ppo is 0: no percentage
    assert "| sft | +100.0% (n=1) | +1.000 (n=1) |" in lines
    assert "| shop | dpo | 0 | a\\|b c |" in lines  # the error cannot break the table
    assert "Not trained (yet): 2 runs, rerun the comparison to train them: shop/dpo seeds [1, 2]." in lines
    assert "G-Eval: not reported (no API key)." in lines
    assert lines[-3] == ("Training time of the finished runs (their summed wall time, the seeds of a vmapped group "
                         "once; processes sharing cores stretch each run): comparison shop 1.50 h, mg_shopdial "
                         "0.25 h.")
    assert lines[-1] == "Wall time of this invocation: 62 s."


def test_a_relative_cells_mark_is_its_own_intervals():
    """The star beside a relative difference says its shown interval excludes 0, even where the absolute difference's
    interval (the main table's mark) disagrees, as BCa on 3 seeds can."""
    base = {"rel_pct": 11.7, "n": 3}
    assert tables._rel_cell(base | {"rel_lo": -1.0, "rel_hi": 27.5, "significant": True}) == "+11.7% [-1.0, +27.5]"
    assert tables._rel_cell(base | {"rel_lo": 2.0, "rel_hi": 27.5, "significant": False}) == "+11.7% [+2.0, +27.5] *"
    assert tables._rel_cell(base | {"rel_lo": -30.0, "rel_hi": -2.0}) == "+11.7% [-30.0, -2.0] *"
