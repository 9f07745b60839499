"""Sweep grid expansion, override errors, and the sweep report from (stand-in) finished runs."""

import ml_collections
import pytest

from configs import overrides
from configs.sweeps import ablations, gopo_hparams
from experiments import sweep as sweep_lib
from experiments.common import ConfigError
from tests.helpers import fake_train


def config(grid=None, seeds=2, fixed=None):
    grid = {"gopo.beta_pref": (0.2, 1.0), "train.group_size": (2, 4)} if grid is None else grid
    return ml_collections.ConfigDict(dict(base="configs/mgshop.py", fixed=overrides(fixed or {"train.steps": 3}),
                                          grid=overrides(grid), seeds=seeds))


def test_grid_expansion():
    runs = sweep_lib.expand(config())
    assert len(runs) == 2 * 2 * 2
    labels = sorted({r["label"] for r in runs})
    assert labels == ["beta_pref=0.2,group_size=2", "beta_pref=0.2,group_size=4", "beta_pref=1.0,group_size=2",
                      "beta_pref=1.0,group_size=4"]
    r = next(r for r in runs if r["label"] == "beta_pref=1.0,group_size=4" and r["seed"] == 1)
    assert (r["config"].gopo.beta_pref, r["config"].train.group_size, r["config"].seed) == (1.0, 4, 1)
    assert r["config"].train.steps == 3  # fixed overrides apply to every run


def test_grid_keeps_the_order_written():
    runs = sweep_lib.expand(config(grid={"train.group_size": (2,), "gopo.use_expert": (True, False)}, seeds=1))
    assert [r["label"] for r in runs] == ["group_size=2,use_expert=True", "group_size=2,use_expert=False"]


def test_grid_errors_name_the_problem():
    with pytest.raises(ConfigError, match="no key 'gopo.betta'"):
        sweep_lib.expand(config(grid={"gopo.betta": (1.0, 2.0)}))
    with pytest.raises(ConfigError, match="sweep config `fixed`: the run config has no key 'train.stepz'"):
        sweep_lib.expand(config(fixed={"train.stepz": 3}))
    with pytest.raises(ConfigError, match="train.group_size='x' has the wrong type"):
        sweep_lib.expand(config(grid={"train.group_size": (2, "x")}))
    with pytest.raises(ConfigError, match="gopo.beta_pref=0.2 is not a tuple of the values"):
        sweep_lib.grid_axes(overrides({"gopo.beta_pref": 0.2}))


@pytest.mark.parametrize("sweep_config", [ablations, gopo_hparams])
def test_shipped_sweeps_expand(sweep_config):
    cfg = sweep_config.get_config()
    runs = sweep_lib.expand(cfg)
    settings = {r["label"] for r in runs}
    assert len(runs) == len(settings) * cfg.seeds and all(r["config"].method == "gopo" for r in runs)


def test_sweep_report_and_sharding(tmp_path):
    cfg = config(grid={"gopo.beta_pref": (1.0, 3.0)})
    calls = []

    def train(c, d):
        calls.append(c.seed)
        return fake_train(c, d)

    half = sweep_lib.sweep(cfg, tmp_path, shard=0, num_shards=2, train_fn=train)
    assert [r["status"] for r in half["runs"]] == ["done", "not run", "done", "not run"]
    full = sweep_lib.sweep(cfg, tmp_path, shard=1, num_shards=2, train_fn=train)
    assert calls == [0, 0, 1, 1]
    assert all(r["status"] == "done" for r in full["runs"])
    row = full["table"]["synthetic_shop"]["beta_pref=3.0"]["tse"]
    assert row["mean"] == pytest.approx((0.30 + 0.31) / 2) and row["per_seed"] == pytest.approx([0.30, 0.31])
    assert (tmp_path / "sweep.md").read_text().startswith("# Sweep results")
    assert (tmp_path / "convergence.png").stat().st_size > 0
