"""Sweep grid expansion, override errors, and the sweep report from (stand-in) finished runs."""

import ml_collections
import pytest

from experiments import sweep as sweep_lib
from experiments.compare import ComparisonError
from tests.helpers import fake_train


def config(grid="gopo.beta_pref=0.2|1.0;train.group_size=2|4", seeds=2, fixed="train.steps=3"):
    c = ml_collections.ConfigDict(dict(base="configs/mgshop.py", fixed=fixed, grid=grid, seeds=seeds))
    return c


def test_grid_expansion():
    runs = sweep_lib.expand(config())
    assert len(runs) == 2 * 2 * 2
    labels = sorted({r["label"] for r in runs})
    assert labels == ["beta_pref=0.2,group_size=2", "beta_pref=0.2,group_size=4", "beta_pref=1.0,group_size=2",
                      "beta_pref=1.0,group_size=4"]
    r = next(r for r in runs if r["label"] == "beta_pref=1.0,group_size=4" and r["seed"] == 1)
    assert (r["config"].gopo.beta_pref, r["config"].train.group_size, r["config"].seed) == (1.0, 4, 1)
    assert r["config"].train.steps == 3  # fixed overrides apply to every run


def test_grid_errors_name_the_problem():
    with pytest.raises(ComparisonError, match="no key 'gopo.betta'"):
        sweep_lib.expand(config(grid="gopo.betta=1|2"))
    with pytest.raises(ComparisonError, match="not key=v1"):
        sweep_lib.parse_grid("gopo.beta_pref")
    with pytest.raises(ComparisonError, match="appears twice"):
        sweep_lib.parse_grid("seed=1|2;seed=3")
    assert sweep_lib.parse_grid("a.b=1|x|False") == [("a.b", [1, "x", False])]


def test_sweep_report_and_sharding(tmp_path):
    cfg = config(grid="gopo.beta_pref=1.0|3.0")
    calls = []

    def train(c, d):
        calls.append(c.seed)
        return fake_train(c, d)

    half = sweep_lib.sweep(cfg, tmp_path, shard=0, num_shards=2, train_fn=train)
    assert [r["status"] for r in half["runs"]] == ["done", "not run here", "done", "not run here"]
    full = sweep_lib.sweep(cfg, tmp_path, shard=1, num_shards=2, train_fn=train)
    assert calls == [0, 0, 1, 1]
    assert all(r["status"] == "done" for r in full["runs"])
    row = full["table"]["synthetic_shop"]["beta_pref=3.0"]["tse"]
    assert row["mean"] == pytest.approx((0.30 + 0.31) / 2) and row["per_seed"] == pytest.approx([0.30, 0.31])
    assert (tmp_path / "sweep.md").read_text().startswith("# Sweep results")
    assert (tmp_path / "convergence.png").stat().st_size > 0
