"""experiments/runs.py with `claim`: processes of one machine share the units of a stage through claim files; a
unit claimed by a live process is left to it, one whose process died is taken over, and every claim is released."""
import os
import socket
import subprocess
import sys

import ml_collections
import pytest

from experiments import runs as runs_lib
from experiments.common import ConfigError


def _runs(n):
    return [dict(env="shop", label="m", seed=s, kind="compare", config=ml_collections.ConfigDict({"seed": s}))
            for s in range(n)]


def _train(trained):
    def train(config, directory):
        trained.append(config.seed)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "summary.json").write_text("{}")
        return {}
    return train


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it now (pids are not reused this fast)


def test_claims_leave_live_units_and_take_over_dead_ones(tmp_path):
    runs, trained = _runs(4), []
    run_dir = lambda run: tmp_path / f"seed{run['seed']}" / "run"  # noqa: E731
    host = socket.gethostname()
    claims = {s: runs_lib._claim_file(run_dir, [runs[s]]) for s in range(4)}
    for s, owner in ((0, f"{host} {os.getppid()}"), (1, f"{host} {_dead_pid()}"), (2, f"elsewhere {os.getpid()}")):
        claims[s].parent.mkdir(parents=True)
        claims[s].write_text(owner + "\n")
    records = runs_lib.run_all(runs, run_dir, train_fn=_train(trained), claim=True)
    assert trained == [1, 3]  # 0: a live process of this host has it; 2: another host's; 1: its process is gone
    assert [r["status"] for r in records] == ["not run", "done", "not run", "done"]
    assert not claims[1].exists() and not claims[3].exists() and claims[0].exists() and claims[2].exists()
    # Finished units are not claimed again; released ones are trained by the next process that comes.
    claims[0].unlink()
    claims[2].unlink()
    runs_lib.run_all(runs, run_dir, train_fn=_train(trained), claim=True)
    assert trained == [1, 3, 0, 2] and not any(c.exists() for c in claims.values())


def test_a_failing_unit_releases_its_claim(tmp_path):
    runs = _runs(1)
    run_dir = lambda run: tmp_path / "run"  # noqa: E731

    def boom(config, directory):
        raise RuntimeError("diverged")

    records = runs_lib.run_all(runs, run_dir, train_fn=boom, claim=True)
    assert records[0]["status"] == "failed" and not list(tmp_path.glob(".claim-*"))


def test_claim_and_static_shards_do_not_mix(tmp_path):
    with pytest.raises(ConfigError, match="leave --num_shards at 1"):
        runs_lib.run_all(_runs(2), lambda run: tmp_path, train_fn=None, claim=True, num_shards=2)


def test_seeds_that_cannot_train_vmapped_are_claimed_one_by_one(tmp_path, monkeypatch):
    """A host world's seeds train one after another: each is its own unit, so two processes share a setting's
    seeds, and a process that stops keeps every seed it finished."""
    runs, trained = _runs(3), []
    run_dir = lambda run: tmp_path / f"seed{run['seed']}" / "run"  # noqa: E731
    monkeypatch.setattr(runs_lib, "_vmappable", lambda run: False)
    host = socket.gethostname()
    taken = runs_lib._claim_file(run_dir, [runs[1]])
    taken.parent.mkdir(parents=True)
    taken.write_text(f"{host} {os.getppid()}\n")  # a live process of this machine trains seed 1
    records = runs_lib.run_all(runs, run_dir, train_fn=_train(trained), vmap_seeds=True, claim=True)
    assert trained == [0, 2] and [r["status"] for r in records] == ["done", "not run", "done"]


def test_a_moved_data_folder_is_the_same_config(tmp_path):
    """A kept run of a data-backed world names its dataset by an absolute path of the checkout that trained it;
    another checkout (CI, a colleague's) must read it as the same run, and another dataset must not."""
    config = ml_collections.ConfigDict({"env": {"data_dir": "/work/shared/data/multiwoz"}, "seed": 0})
    (tmp_path / "config.json").write_text(config.to_json_best_effort())
    moved = ml_collections.ConfigDict({"env": {"data_dir": "/tmp/ci/../shared/data/multiwoz"}, "seed": 0})
    runs_lib.check_same_config(tmp_path, moved)
    other = ml_collections.ConfigDict({"env": {"data_dir": "/work/shared/data/abcd"}, "seed": 0})
    with pytest.raises(ConfigError, match="env.data_dir: '/work/shared/data/multiwoz' -> '/work/shared/data/abcd'"):
        runs_lib.check_same_config(tmp_path, other)
