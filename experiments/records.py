"""Finished runs kept in the repository, so that a comparison longer than one sitting accumulates across sittings.

A run's numbers are a function of its resolved config (its config.json, which `runs.check_same_config` compares with
the config a driver asks for) and of the code that trained it. `runs.py` stamps every run it finishes with the
digest of the installed `gopo_jax` package's run code that a run of its world can execute (`code.json`;
`code_digest`): another world's own files (WORLD_FILES) are left out, so that re-splitting one world's data retrains
that world's runs only. `save` copies each finished run's config.json,
summary.json, code.json and the evaluation lines of its metrics.jsonl (what the tables and figures read) into a
records folder; `restore` copies back only the records whose digest equals the digest of the code installed now. A
record trained by other code is stale: it is left out, and its run is trained again. Deleting the records folder
retrains everything.

Checkpoints, TensorBoard files and samples are not kept (megabytes per run). A restored run therefore cannot be
resumed or judged by G-Eval; `experiments.compare.judge_run` says so and names the directory to delete.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import shutil

import gopo_jax

CODE = "code.json"
KEPT = ("config.json", "summary.json", CODE)
METRICS = "metrics.jsonl"
_EVAL_PREFIX = "eval/"


# The parts of gopo_jax that only consume finished runs (layer 4 and the memory planner in tests/test_layering.py),
# and a driver's joining of a multi-process job (distributed.py and its peer watch): nothing that trains or evaluates
# a run imports them (tested), so editing a table, the server or the multi-host start-up keeps the records.
NOT_IN_RUNS = ("report", "serve", "export.py", "chat.py", "inspect_run.py", "plan.py", "distributed.py",
               "peer_watch.py")
# The files of gopo_jax (relative to the package) that only one world's runs execute: the registry imports a world's
# module inside that world's builder only, nothing else imports it, and no other module names its SOP file (all three
# tested), so a run of another world never executes or reads them. Every world of the registry has an entry (tested).
WORLD_FILES = {
    "synthetic_shop": ("envs/synthetic_shop.py", "envs/sops/shop.json"),
    "mg_shopdial": ("envs/mgshop.py", "envs/mgshop_data.py", "envs/mgshop_stats.py", "envs/sops/mgshop.json"),
    "multiwoz": ("envs/multiwoz.py", "envs/sops/multiwoz.json"),
    "tmallbrand": ("envs/tmallbrand.py",),
}


def tree_digest(root: pathlib.Path, leave_out: frozenset[str] = frozenset()) -> str:
    """sha256 over every file under `root` but NOT_IN_RUNS, caches and the paths in `leave_out` (relative to root):
    relative path and bytes, in path order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        relative = path.relative_to(root)
        if relative.parts[0] not in NOT_IN_RUNS and relative.as_posix() not in leave_out:
            h.update(relative.as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def world_digests(root: pathlib.Path) -> dict[str | None, str]:
    """world -> `tree_digest` of root without the other worlds' WORLD_FILES; None -> the whole run code."""
    def others(world):
        return frozenset(f for w, files in WORLD_FILES.items() if w != world for f in files)
    return {None: tree_digest(root)} | {world: tree_digest(root, others(world)) for world in WORLD_FILES}


@functools.cache
def _installed_digests() -> dict[str | None, str]:
    return world_digests(pathlib.Path(gopo_jax.__file__).parent)


def code_digest(world: str | None = None) -> str:
    """The digest of the installed gopo_jax code a run of `world` (its env.name) can execute; None, or a world
    WORLD_FILES does not name, gives the whole run code. Taken for every world at the first call of the process (the
    code a driver imported, not what an edit during its runs leaves on disk)."""
    digests = _installed_digests()
    return digests.get(world, digests[None])


def world_of(directory: pathlib.Path) -> str | None:
    """The env.name in a run directory's config.json (None when it cannot be read)."""
    try:
        return json.loads((directory / "config.json").read_text())["env"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_digest(directory: pathlib.Path) -> str:
    """The digest of the installed code that a run written to `directory` (its config.json) executes."""
    return code_digest(world_of(directory))


def stamp(directory: pathlib.Path, digest: str | None = None) -> None:
    """Writes `<directory>/code.json`: the code that produced the run's summary.json (default: `run_digest`)."""
    (directory / CODE).write_text(json.dumps({"gopo_jax": digest or run_digest(directory)}) + "\n")


def stamped_digest(directory: pathlib.Path) -> str | None:
    try:
        return json.loads((directory / CODE).read_text()).get("gopo_jax")
    except (OSError, ValueError, AttributeError):
        return None


def finished(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p.parent for p in root.rglob("summary.json")) if root.is_dir() else []


def eval_lines(path: pathlib.Path) -> str:
    """The lines of a metrics.jsonl that carry an `eval/` metric (a torn or foreign line is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and any(str(k).startswith(_EVAL_PREFIX) for k in record):
            kept.append(json.dumps(record))
    return "".join(f"{line}\n" for line in kept)


def save(workdir: pathlib.Path, records: pathlib.Path) -> dict[str, int]:
    """Copies every finished run of `workdir` trained by the installed code into `records` (same relative path) and
    drops the records of other code. {"saved", "not_kept" (finished runs of other code, or without code.json),
    "dropped_stale"}."""
    counts = {"saved": 0, "not_kept": 0, "dropped_stale": 0}
    for directory in finished(workdir):
        if stamped_digest(directory) != run_digest(directory):
            counts["not_kept"] += 1
            continue
        target = records / directory.relative_to(workdir)
        target.mkdir(parents=True, exist_ok=True)
        for name in KEPT:
            shutil.copyfile(directory / name, target / name)
        if (directory / METRICS).exists():
            (target / METRICS).write_text(eval_lines(directory / METRICS))
        counts["saved"] += 1
    for record in finished(records):
        if stamped_digest(record) != run_digest(record):
            shutil.rmtree(record)
            counts["dropped_stale"] += 1
    return counts


def restore(records: pathlib.Path, workdir: pathlib.Path) -> dict[str, int]:
    """Copies into `workdir` every record of the installed code whose run directory has no summary.json yet.
    {"restored", "stale" (records of other code, left out), "present" (already finished in workdir)}."""
    counts = {"restored": 0, "stale": 0, "present": 0}
    for record in finished(records):
        if any(not (record / name).is_file() for name in KEPT) or stamped_digest(record) != run_digest(record):
            counts["stale"] += 1
            continue
        target = workdir / record.relative_to(records)
        if (target / "summary.json").exists():
            counts["present"] += 1
            continue
        target.mkdir(parents=True, exist_ok=True)
        for name in (*KEPT, METRICS):
            if (record / name).exists():
                shutil.copyfile(record / name, target / name)
        counts["restored"] += 1
    return counts
