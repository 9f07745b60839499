"""scripts/carry_records.py: the kept runs are carried over a change of run code when their retrained sample comes
out identical, and not when it comes out different; a commit's digests are those of its own records.py rules."""
import json
import pathlib
import shutil
import subprocess

import pytest

from experiments import records
from scripts import carry_records

WORLD = "synthetic_shop"
OLD = dict.fromkeys([None, *records.WORLD_FILES], "0" * 64)  # the digests of some earlier run code


def _record(root: pathlib.Path, relative: str, *, seconds: float, seed_parallel: bool = False,
            world: str = WORLD, params: str = "a" * 64) -> pathlib.Path:
    directory = root / relative
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"env": {"name": world}, "seed": int(relative[-1])}))
    group = {"seed_parallel": {"seeds": [0, 1], "group_dir": str(directory.parent)}} if seed_parallel else {}
    (directory / "summary.json").write_text(json.dumps({"env": world, "wall_seconds": seconds,
                                                        "final_params_sha256": params, **group}))
    (directory / records.METRICS).write_text(json.dumps({"step": 1, "eval/tse": 0.25, "time": 1.0}) + "\n")
    records.stamp(directory, OLD[world])
    return directory


def _copying_trainer(records_root: pathlib.Path, scratch: pathlib.Path, edit=lambda summary: summary):
    """Stand-ins for the trainers: each 'retrained' run is its record again (its summary passed through `edit`),
    with a new wall time, group folder and evaluation times, as a real rerun has; the calls are logged."""
    calls = []

    def one(config, target):
        source = records_root / pathlib.Path(target).relative_to(scratch / "runs")
        pathlib.Path(target).mkdir(parents=True)
        summary = edit(json.loads((source / "summary.json").read_text()) | {"wall_seconds": 99.0})
        if "seed_parallel" in summary:  # a group trains its checkpoints in a folder of the scratch directory
            summary["seed_parallel"] = summary["seed_parallel"] | {"group_dir": str(pathlib.Path(target).parent)}
        (pathlib.Path(target) / "summary.json").write_text(json.dumps(summary))
        line = json.loads((source / records.METRICS).read_text()) | {"time": 2.0}
        (pathlib.Path(target) / records.METRICS).write_text(json.dumps(line) + "\n")

    def train(config, target):
        calls.append(("run", pathlib.Path(target).name))
        one(config, target)

    def train_group(configs, targets):
        calls.append(("group", [pathlib.Path(t).name for t in targets]))
        for config, target in zip(configs, targets):
            one(config, target)

    return train, train_group, calls


@pytest.fixture
def kept(tmp_path):
    root = tmp_path / "records"
    _record(root, "runs/synthetic_shop/gopo/seed0", seconds=50, seed_parallel=True)
    _record(root, "runs/synthetic_shop/gopo/seed1", seconds=60, seed_parallel=True)
    _record(root, "runs/synthetic_shop/sft/seed0", seconds=20, seed_parallel=True)
    _record(root, "runs/synthetic_shop/sft/seed1", seconds=30, seed_parallel=True)
    _record(root, "tuning/synthetic_shop/gopo/beta_2/seed0", seconds=40, seed_parallel=True)
    _record(root, "tuning/synthetic_shop/gopo/beta_2/seed1", seconds=45, seed_parallel=True)
    _record(root, "runs/multiwoz/dpo/seed0", seconds=9, world="multiwoz")
    _record(root, "runs/multiwoz/dpo/seed1", seconds=7, world="multiwoz")
    _record(root, "runs/multiwoz/sft/seed0", seconds=3, world="multiwoz")
    other = _record(root, "runs/tmallbrand/sft/seed0", seconds=1, world="tmallbrand")
    records.stamp(other, "1" * 64)  # trained by yet other code: neither checked nor carried
    return root


def test_the_sample_is_the_cheapest_unit_per_world_or_per_world_and_label(kept):
    units = carry_records.units(carry_records.carried(kept, OLD))
    assert len(units) == 6  # three vmapped seed groups, three single runs; not the other code's record

    def named(sample):
        return [(u.directories[0].parent.relative_to(kept).as_posix(), len(u.directories), u.cost_s)
                for u in sample]

    assert named(carry_records.sample(units, kept, "world")) == [("runs/multiwoz/sft", 1, 3.0),
                                                                 ("runs/synthetic_shop/sft", 2, 30.0)]
    assert named(carry_records.sample(units, kept, "label")) == [
        ("runs/multiwoz/dpo", 1, 7.0), ("runs/multiwoz/sft", 1, 3.0), ("tuning/synthetic_shop/gopo/beta_2", 2, 45.0),
        ("runs/synthetic_shop/sft", 2, 30.0)]
    with pytest.raises(carry_records.CarryError, match="--check=seed: choose world or label"):
        carry_records.sample(units, kept, "seed")


def test_seeds_of_one_setting_trained_in_two_sittings_are_two_units(tmp_path):
    first = [_record(tmp_path, f"runs/synthetic_shop/sft/seed{k}", seconds=10, seed_parallel=True) for k in (0, 1)]
    later = _record(tmp_path, "runs/synthetic_shop/sft/seed2", seconds=5, seed_parallel=True)
    summary = json.loads((later / "summary.json").read_text())
    summary["seed_parallel"]["seeds"] = [2]
    (later / "summary.json").write_text(json.dumps(summary))
    units = carry_records.units(carry_records.carried(tmp_path, OLD))
    assert sorted(u.directories for u in units) == [tuple(first), (later,)]


def test_identical_retrained_runs_carry_every_record_of_the_old_code(kept, tmp_path):
    train, train_group, calls = _copying_trainer(kept, tmp_path / "scratch")
    out = carry_records.carry(kept, OLD, tmp_path / "scratch", check="world", train_fn=train,
                              train_group_fn=train_group, log=lambda line: None)
    assert out == {"carried": 9, "checked": 3, "sample": 2}
    assert calls == [("run", "seed0"), ("group", ["seed0", "seed1"])]  # multiwoz sft alone, the shop's SFT seeds
    stamps = {d.relative_to(kept).as_posix(): records.stamped_digest(d) for d in records.finished(kept)}
    assert stamps.pop("runs/tmallbrand/sft/seed0") == "1" * 64
    assert all(digest == records.code_digest(path.split("/")[1]) for path, digest in stamps.items())
    with pytest.raises(carry_records.CarryError, match="nothing to carry"):
        carry_records.carry(kept, OLD, tmp_path / "again", train_fn=train, train_group_fn=train_group)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s | {"final_params_sha256": "b" * 64}, "final parameters aaaaaaaaaaaa -> bbbbbbbbbbbb"),
    (lambda s: s | {"sft": {"tse": 0.5}}, 'summary.sft: null -> {"tse": 0.5}'),
])
def test_a_run_that_comes_out_different_stamps_nothing(kept, tmp_path, edit, message):
    train, train_group, _ = _copying_trainer(kept, tmp_path / "scratch", edit)
    before = {d: records.stamped_digest(d) for d in records.finished(kept)}
    with pytest.raises(carry_records.CarryError, match=f"came out different when retrained: {message}"):
        carry_records.carry(kept, OLD, tmp_path / "scratch", check="world", train_fn=train,
                            train_group_fn=train_group, log=lambda line: None)
    assert {d: records.stamped_digest(d) for d in records.finished(kept)} == before


def test_an_evaluation_line_that_differs_is_named(tmp_path):
    record, again = tmp_path / "kept", tmp_path / "again"
    for directory, tse in ((record, 0.25), (again, 0.5)):
        directory.mkdir()
        (directory / "summary.json").write_text(json.dumps({"final_params_sha256": "a", "wall_seconds": 1.0}))
        (directory / records.METRICS).write_text(json.dumps({"step": 3, "eval/tse": tse, "time": tse}) + "\n"
                                                 + json.dumps({"step": 3, "train/loss": 1.0}) + "\n")
    assert carry_records.difference(record, again) == "evaluation at step 3 (eval/tse): 0.25 -> 0.5"
    # A resumed run logs its reference point again (identical but for the time): it is the same evaluation.
    lines = [{"step": 0, "eval/tse": 0.1, "time": 1.0}, {"step": 3, "eval/tse": 0.25, "time": 2.0},
             {"step": 0, "eval/tse": 0.1, "time": 3.0}]
    (record / records.METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines))
    (again / records.METRICS).write_text("".join(json.dumps(x | {"time": 9.0}) + "\n" for x in lines[:2]))
    assert carry_records.difference(record, again) is None
    (again / records.METRICS).write_text("".join(json.dumps(x) + "\n" for x in lines[1:2]))
    assert carry_records.difference(record, again) == "evaluated at steps [0, 3] -> [3]"


def test_a_commits_digests_follow_its_own_rules(tmp_path):
    """COMMIT's digests come from COMMIT's records.py: here a commit whose rules leave out one more file."""
    repo = tmp_path / "repo"
    package = pathlib.Path(records.__file__).parents[1] / "gopo_jax"
    shutil.copytree(package, repo / "gopo_jax", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "experiments").mkdir()
    installed_rules = pathlib.Path(records.__file__).read_text()
    rules = installed_rules.replace('"peer_watch.py")', '"peer_watch.py", "sampling.py")')
    assert rules != installed_rules
    (repo / "experiments" / "records.py").write_text(rules)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "c"], check=True)
    digests, files = carry_records.digests_at("HEAD", repo)
    root = repo / "gopo_jax"
    assert digests[None] == records.tree_digest(root, frozenset({"sampling.py"})) != records.tree_digest(root)
    others = frozenset(f for world, own in records.WORLD_FILES.items() if world != "multiwoz" for f in own)
    assert digests["multiwoz"] == records.tree_digest(root, others | {"sampling.py"})
    assert carry_records.changed_files(files, carry_records.run_code(package)) == []  # sampling.py is still covered
    with pytest.raises(carry_records.CarryError, match="--since=nowhere: git archive failed"):
        carry_records.digests_at("nowhere", repo)


@pytest.mark.slow
def test_a_real_run_retrained_from_its_record_comes_out_identical(tmp_path):
    """What the command rests on: a kept run trained again from its record's config.json alone (its shared warm
    start computed afresh) ends with the same parameters, summary and evaluation lines."""
    from gopo_jax.train.driver import train_run
    from tests.helpers import tiny_method_config

    config = tiny_method_config("sft")
    with config.unlocked():
        config.sft.cache_dir = str(tmp_path / "warm_starts")  # as the comparison shares them
    relative = "runs/synthetic_shop/sft/seed0"
    train_run(config, tmp_path / "work" / relative)
    records.stamp(tmp_path / "work" / relative)
    assert records.save(tmp_path / "work", tmp_path / "records")["saved"] == 1
    records.stamp(tmp_path / "records" / relative, OLD[WORLD])
    lines = []
    out = carry_records.carry(tmp_path / "records", OLD, tmp_path / "scratch", check="world", log=lines.append)
    assert out == {"carried": 1, "checked": 1, "sample": 1}, lines
    assert records.stamped_digest(tmp_path / "records" / relative) == records.code_digest(WORLD)
    assert records.restore(tmp_path / "records", tmp_path / "fresh")["restored"] == 1
