"""experiments/records.py: a comparison's finished runs kept in the repository come back into a fresh workdir only
when the code that trained them is the code installed now; the restored runs are reported, not retrained, and a
record of other code is retrained."""
import json
import pathlib
import re

import pytest

from configs import compare as compare_config
from experiments import compare as compare_lib
from experiments import records
from test_compare_geval import fake_train as fake_summary


def fake_train(config, directory):
    """A finished run's files as the real training writes them (its resolved config too), without training."""
    summary = fake_summary(config, directory)
    (directory / "config.json").write_text(config.to_json_best_effort())
    return summary


def _config():
    c = compare_config.get_config()
    c.quick, c.seeds, c.methods, c.convergence_seeds, c.environments = True, 2, "gopo,sft", 0, "synthetic_shop"
    c.tuning_seeds, c.vmap_seeds = 0, False
    return c


def _no_training(config, directory):
    raise AssertionError(f"{directory} was retrained")


def test_saved_runs_restore_into_a_fresh_workdir_and_are_not_retrained(tmp_path):
    first, kept, fresh = tmp_path / "first", tmp_path / "records", tmp_path / "fresh"
    results = compare_lib.compare(_config(), first, train_fn=fake_train)
    run = first / "runs" / "synthetic_shop" / "gopo" / "seed0"
    # runs.py stamps every run it finishes with the code that trained it.
    assert json.loads((run / records.CODE).read_text()) == {"gopo_jax": records.code_digest("synthetic_shop")}
    with (run / records.METRICS).open("a") as f:
        f.write(json.dumps({"step": 3, "train/loss": 1.0}) + "\n{torn")
    assert records.save(first, kept) == {"saved": 4, "not_kept": 0, "dropped_stale": 0}
    record = kept / "runs" / "synthetic_shop" / "gopo" / "seed0"
    assert sorted(p.name for p in record.iterdir()) == ["code.json", "config.json", "metrics.jsonl", "summary.json"]
    # Only the evaluation lines of the metrics are kept (what the tables and figures read).
    assert [json.loads(line) for line in (record / records.METRICS).read_text().splitlines()] == [
        {"step": 2, "eval/tse": 0.3}]

    assert records.restore(kept, fresh) == {"restored": 4, "stale": 0, "present": 0}
    again = compare_lib.compare(_config(), fresh, train_fn=_no_training)
    assert {r["status"] for r in again["runs"]} == {"done"}
    for label in ("gopo", "sft"):
        a, b = again["table"]["synthetic_shop"][label]["tse"], results["table"]["synthetic_shop"][label]["tse"]
        assert (a["mean"], a["n"]) == (b["mean"], b["n"]) == (pytest.approx(0.35), 2)
    assert records.restore(kept, fresh) == {"restored": 0, "stale": 0, "present": 4}


def test_a_record_of_other_code_is_retrained_and_dropped(tmp_path):
    first, kept, fresh = tmp_path / "first", tmp_path / "records", tmp_path / "fresh"
    compare_lib.compare(_config(), first, train_fn=fake_train)
    records.save(first, kept)
    stale = kept / "runs" / "synthetic_shop" / "sft" / "seed1"
    records.stamp(stale, "0" * 64)
    (kept / "runs" / "synthetic_shop" / "gopo" / "seed1" / "config.json").unlink()  # an incomplete record
    assert records.restore(kept, fresh) == {"restored": 2, "stale": 2, "present": 0}
    retrained = []

    def train(config, directory):
        retrained.append((config.method, config.seed))
        return fake_train(config, directory)

    compare_lib.compare(_config(), fresh, train_fn=train)
    assert sorted(retrained) == [("gopo", 1), ("sft", 1)]
    assert records.save(fresh, kept)["saved"] == 4
    assert json.loads((stale / records.CODE).read_text())["gopo_jax"] == records.code_digest("synthetic_shop")
    # A finished run without a stamp, or of other code, is not kept (never copied); a stale record is dropped.
    (fresh / "runs" / "synthetic_shop" / "sft" / "seed0" / records.CODE).unlink()
    records.stamp(fresh / "runs" / "synthetic_shop" / "gopo" / "seed0", "e" * 64)
    records.stamp(kept / "runs" / "synthetic_shop" / "sft" / "seed0", "f" * 64)
    records.stamp(kept / "runs" / "synthetic_shop" / "gopo" / "seed0", "f" * 64)
    assert records.save(fresh, kept) == {"saved": 2, "not_kept": 2, "dropped_stale": 2}
    assert not (kept / "runs" / "synthetic_shop" / "sft" / "seed0").exists()
    assert not (kept / "runs" / "synthetic_shop" / "gopo" / "seed0").exists()


def test_the_digest_changes_with_run_code_only(tmp_path):
    """Any byte or name of the run code changes the digest; the consumers in NOT_IN_RUNS and caches do not."""
    root = tmp_path / "pkg"
    (root / "train").mkdir(parents=True)
    (root / "report").mkdir()
    (root / "train" / "step.py").write_text("x = 1\n")
    (root / "report" / "tables.py").write_text("t = 1\n")
    before = records.tree_digest(root)
    (root / "report" / "tables.py").write_text("t = 2\n")
    (root / "plan.py").write_text("p = 1\n")
    (root / "train" / "__pycache__").mkdir()
    (root / "train" / "__pycache__" / "step.pyc").write_bytes(b"\0")
    assert records.tree_digest(root) == before
    (root / "train" / "step.py").write_text("x = 2\n")
    changed = records.tree_digest(root)
    assert changed != before
    (root / "train" / "step.py").rename(root / "train" / "other.py")
    assert records.tree_digest(root) not in (before, changed)
    assert records.code_digest() is records.code_digest()  # taken once per process


def test_a_world_digest_leaves_out_only_the_other_worlds_own_files(tmp_path):
    """Editing one world's own file changes that world's digest and the whole code's, and no other world's; a shared
    file changes every digest."""
    root = tmp_path / "pkg"
    for files in records.WORLD_FILES.values():
        for name in files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(f"{name}\n")
    (root / "envs" / "customers.py").write_text("shared = 1\n")
    before = records.world_digests(root)
    assert len(set(before.values())) == len(records.WORLD_FILES) + 1
    (root / "envs" / "mgshop_data.py").write_text("_SPLIT_EVERY = 2\n")
    after = records.world_digests(root)
    assert {w for w in before if before[w] != after[w]} == {None, "mg_shopdial"}
    (root / "envs" / "customers.py").write_text("shared = 2\n")
    assert not set(records.world_digests(root).values()) & set(after.values())


def test_a_run_is_stamped_and_checked_with_its_worlds_digest(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"env": {"name": "multiwoz"}}))
    records.stamp(run)
    assert records.stamped_digest(run) == records.code_digest("multiwoz") != records.code_digest("tmallbrand")
    # Unreadable, or a world the table does not name: the whole run code.
    for text in ("{", json.dumps({"env": {"name": "a_new_world"}})):
        (run / "config.json").write_text(text)
        assert records.run_digest(run) == records.code_digest(None)


def test_a_worlds_own_files_are_executed_by_its_runs_only():
    """What makes WORLD_FILES safe to leave out of another world's digest: every module that imports a world's own
    module is one of that world's files, or the registry inside that world's builder; no other file names its SOP
    file; and every world of the registry has an entry."""
    import inspect

    from gopo_jax.envs import registry
    from test_layering import REPO_ROOT, import_edges

    assert set(records.WORLD_FILES) == set(registry.names())
    package = REPO_ROOT / "gopo_jax"
    edges = import_edges(REPO_ROOT)
    sources = {p.relative_to(package).as_posix(): p.read_text() for p in package.rglob("*.py")}
    for world, files in records.WORLD_FILES.items():
        own = {"gopo_jax." + f.removesuffix(".py").replace("/", ".") for f in files if f.endswith(".py")}
        assert all((package / f).is_file() for f in files), world
        lines, first = inspect.getsourcelines(registry.WORLDS[world].build)
        builder = range(first, first + len(lines))
        for edge in edges:
            if edge.target in own and edge.source not in own:
                assert edge.source == "gopo_jax.envs.registry" and edge.line in builder, edge
        sop_names = [pathlib.PurePath(f).name for f in files if f.endswith(".json")]
        for relative, text in sources.items():
            if relative not in files and relative.split("/")[0] not in records.NOT_IN_RUNS:
                assert not any(re.search(rf"(?<!\w){re.escape(name)}", text) for name in sop_names), (
                    relative, sop_names)


@pytest.mark.parametrize("text", ["", "{", "[]", '{"gopo_jax": 3}'])
def test_a_damaged_stamp_reads_as_other_code(tmp_path, text):
    (tmp_path / records.CODE).write_text(text)
    assert records.stamped_digest(tmp_path) in (None, 3)
    assert records.stamped_digest(tmp_path) != records.code_digest()


def test_no_run_code_imports_what_the_digest_leaves_out():
    """The digest may leave out NOT_IN_RUNS only because no module a run executes imports them: everything
    reachable from `gopo_jax.launch` (the entry point from a config to a run, registry strings included)."""
    from test_layering import REPO_ROOT, graph_of, import_edges, module_files

    modules = module_files(REPO_ROOT)
    graph = graph_of(import_edges(REPO_ROOT), modules)
    reached, todo = set(), ["gopo_jax.launch", "gopo_jax.train.driver"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    parts = {p.removesuffix(".py") for p in records.NOT_IN_RUNS}
    left_out = {m for m in modules if m.split(".")[1:2] and m.split(".")[1] in parts}
    assert {"gopo_jax.report.tables", "gopo_jax.serve.api", "gopo_jax.distributed", "gopo_jax.peer_watch"} <= left_out
    assert "gopo_jax.envs.synthetic_shop" in reached and "gopo_jax.algorithms.gopo" in reached
    assert not reached & left_out, sorted(reached & left_out)
