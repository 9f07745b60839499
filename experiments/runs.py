"""How the experiment drivers (the comparison, sweeps) execute their runs: one run, or the seeds of one setting
vmapped in one process, resumable, sharded between processes, never stopped by one failing run.

A run is a dict {env, label, seed, kind, config} (its resolved run config); a driver gives each its directory. A run
whose directory holds summary.json is read, not retrained (a run trained here is stamped with the code that trained
it, `experiments.records`); a half-finished run resumes from its own checkpoints (a
seed group from `<setting dir>/seeds<...>/checkpoints`); a run that raises is recorded as failed with its message
(every seed of a failing group) and the driver goes on. A directory written with a different resolved config is an
error: its numbers would be mislabelled.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import socket
import time
import traceback
from typing import Callable

import ml_collections

from experiments import records as records_lib
from experiments.common import ConfigError, flattened

_log = logging.getLogger(__name__)

# Run config keys that change neither training nor evaluation: where shared warm starts live (a moved workdir
# still resumes) and how many dialogues are written out for a judge.
_NOT_RESULTS = frozenset({"sft.cache_dir", "eval.judge_dialogues"})
# Where metrics are sent (TensorBoard, W&B) and how long a multi-process run waits for a silent peer change nothing
# a run computes: switching W&B on for a resumed comparison, or a workdir from before these sections, is the same run.
_NOT_RESULTS_PREFIXES = ("log.", "distributed.")
# A data-backed world's folder is resolved to an absolute path from the checkout (`experiments.compare`), so where a
# checkout lives must not make its kept runs (`experiments.records`) "a different config": the dataset is the
# folder's name under the shared data root, and that is what is compared.
_BY_FOLDER_NAME = frozenset({"env.data_dir"})


def _comparable(key: str, value):
    return pathlib.PurePath(value).name if key in _BY_FOLDER_NAME and isinstance(value, str) and value else value


def check_same_config(directory: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    path = directory / "config.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    wanted = json.loads(config.to_json_best_effort())

    a, b = flattened(stored), flattened(wanted)
    diff = sorted(k for k in a.keys() | b.keys() if _comparable(k, a.get(k)) != _comparable(k, b.get(k))
                  and k not in _NOT_RESULTS
                  and not k.startswith(_NOT_RESULTS_PREFIXES))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ConfigError(f"{directory} was trained with a different config ({shown}); use a fresh --workdir "
                          f"or delete {directory} to retrain it")


class NotRun(Exception):
    """A run a report-only call leaves untrained."""


def _record(run: dict, directory: pathlib.Path) -> dict:
    return {k: run[k] for k in ("env", "label", "seed", "kind")} | {"dir": str(directory)}


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def execute(run: dict, directory: pathlib.Path, train_fn: Callable) -> dict:
    """Trains (or reads) one run with `train_fn(config, workdir) -> summary`; never raises for a failing run, only
    for a mislabelled directory."""
    record = _record(run, directory)
    check_same_config(directory, run["config"])
    if (directory / "summary.json").exists():
        return record | {"status": "done", "resumed": "skipped (summary.json exists)"}
    start = time.time()
    try:
        summary = train_fn(run["config"], directory)
    except NotRun:
        return record | {"status": "not run"}
    except Exception as e:  # noqa: BLE001  (one failing method must not end the comparison)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(traceback.format_exc())
        _log.error("run %s/%s/seed%d failed: %s (traceback in %s)", run["env"], run["label"], run["seed"],
                   _first_line(e), directory / "error.txt")
        return record | {"status": "failed", "error": _first_line(e), "wall_seconds": time.time() - start}
    if summary.get("stopped"):
        return record | {"status": "stopped", "iteration": summary.get("iteration"),
                         "wall_seconds": time.time() - start}
    (directory / "error.txt").unlink(missing_ok=True)
    records_lib.stamp(directory)
    return record | {"status": "done", "wall_seconds": time.time() - start}


def execute_group(runs: list[dict], directories: list[pathlib.Path], train_group_fn: Callable) -> list[dict]:
    """The seeds of one setting trained together: `train_group_fn(configs, workdirs) -> summaries` on those without
    summary.json. One record per seed, as `execute` writes them; never raises for a failing group."""
    for run, directory in zip(runs, directories):
        check_same_config(directory, run["config"])
    records = [_record(run, d) for run, d in zip(runs, directories)]
    todo = [j for j, d in enumerate(directories) if not (d / "summary.json").exists()]
    for j in sorted(set(range(len(runs))) - set(todo)):
        records[j] |= {"status": "done", "resumed": "skipped (summary.json exists)"}
    if not todo:
        return records
    start = time.time()
    try:
        summaries = train_group_fn([runs[j]["config"] for j in todo], [directories[j] for j in todo])
    except Exception as e:  # noqa: BLE001  (one failing setting must not end the sweep)
        text = traceback.format_exc()
        for j in todo:
            directories[j].mkdir(parents=True, exist_ok=True)
            (directories[j] / "error.txt").write_text(text)
            records[j] |= {"status": "failed", "error": _first_line(e), "wall_seconds": time.time() - start}
        _log.error("seed group %s (seeds %s) failed: %s (traceback in each seed's error.txt)", runs[0]["label"],
                   [runs[j]["seed"] for j in todo], _first_line(e))
        return records
    wall = time.time() - start
    for j, summary in zip(todo, summaries):
        if summary.get("stopped"):
            records[j] |= {"status": "stopped", "iteration": summary.get("iteration"), "wall_seconds": wall}
        else:
            (directories[j] / "error.txt").unlink(missing_ok=True)
            records_lib.stamp(directories[j])
            records[j] |= {"status": "done", "wall_seconds": wall, "seed_parallel": True}
    return records


def _vmappable(run: dict) -> bool:
    """Whether the seeds of `run`'s setting can train vmapped; logs the way they go."""
    from gopo_jax.train.driver import check_supported  # noqa: PLC0415  (heavy: JAX)
    try:
        check_supported(run["config"])
    except ValueError as e:
        _log.info("%s/%s: seeds one after another (%s)", run["env"], run["label"], e)
        return False
    _log.info("%s/%s: seeds trained together, vmapped in one process (gopo_jax.train.driver)", run["env"],
              run["label"])
    return True


def _same_setting(a: dict, b: dict) -> bool:
    return (a["env"], a["label"], a["kind"], a.get("setting")) == (b["env"], b["label"], b["kind"], b.get("setting"))


def _claim_file(run_dir: Callable[[dict], pathlib.Path], unit: list[dict]) -> pathlib.Path:
    seeds = "-".join(str(run["seed"]) for run in unit)
    return run_dir(unit[0]).parent / f".claim-seed{seeds}"


def _take(claim: pathlib.Path) -> bool:
    """Claims a unit for this process: creates `claim` exclusively with this host and pid. A claim left by a
    process of this host that is gone is taken over; a live one (or one of another host) is not."""
    claim.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                host, pid = claim.read_text().split()
                if host != socket.gethostname():
                    return False
                os.kill(int(pid), 0)
                return False  # its process is alive
            except ProcessLookupError:
                claim.unlink(missing_ok=True)  # its process died: the unit resumes from its checkpoints here
            except (OSError, ValueError):
                return False  # being written this instant, or unreadable: leave it
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def run_all(runs: list[dict], run_dir: Callable[[dict], pathlib.Path], *, train_fn: Callable | None,
            train_group_fn: Callable | None = None, vmap_seeds: bool = False, shard: int = 0, num_shards: int = 1,
            claim: bool = False, report_only: bool = False) -> list[dict]:
    """One record per run, in order. Units of work are one run each, or with `vmap_seeds` the consecutive runs of
    one setting (all its seeds, trained together where the world is pure JAX; one unit per seed where it is not).
    Unit i is this process's when i % num_shards == shard, or with `claim` when it is unfinished and this process
    claims it first (a claim file beside its runs, `_take`): any number of processes of one machine then share the
    units as each becomes free, however unequal their costs. Runs of others, of a report-only call, or after a
    SIGTERM stop are recorded "done" when their summary exists, else "not run"."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"--shard={shard} must be in 0..{num_shards - 1} (--num_shards={num_shards})")
    if claim and num_shards != 1:
        raise ConfigError("--claim shares the units between processes by itself: leave --num_shards at 1")
    records_lib.code_digest()  # the code this process trains with, before any run (stamped on each it finishes)
    units: list[list[int]] = []
    for i, run in enumerate(runs):
        if vmap_seeds and units and _same_setting(runs[units[-1][0]], run):
            units[-1].append(i)
        else:
            units.append([i])
    if not report_only:
        # Seeds that cannot train vmapped (host worlds) are a unit each: processes then share them seed by seed,
        # and a sitting that ends keeps every seed it finished.
        units = [piece for unit in units
                 for piece in ([unit] if len(unit) == 1 or _vmappable(runs[unit[0]]) else [[i] for i in unit])]
    records: list[dict | None] = [None] * len(runs)
    stopped = False
    for u, unit in enumerate(units):
        if stopped or report_only or u % num_shards != shard:
            continue
        claimed = None
        if claim:
            if all((run_dir(runs[i]) / "summary.json").exists() for i in unit):
                continue
            claimed = _claim_file(run_dir, [runs[i] for i in unit])
            if not _take(claimed):
                continue
        try:
            stopped = _train_unit(runs, unit, records, run_dir, train_fn=train_fn, train_group_fn=train_group_fn)
        finally:
            if claimed is not None:
                claimed.unlink(missing_ok=True)
        if stopped:
            _log.warning("stopped by SIGTERM; rerun the same command to resume")
    for i, run in enumerate(runs):
        if records[i] is None:
            directory = run_dir(run)
            done = (directory / "summary.json").exists()
            if done:
                check_same_config(directory, run["config"])
            records[i] = _record(run, directory) | {"status": "done" if done else "not run"}
    return records


def _train_unit(runs: list[dict], unit: list[int], records: list, run_dir: Callable[[dict], pathlib.Path], *,
                train_fn: Callable | None, train_group_fn: Callable | None) -> bool:
    """Trains one unit into `records`; whether a SIGTERM stopped it."""
    first = runs[unit[0]]
    if len(unit) > 1:  # a unit of several runs is a vmappable setting's seeds (`run_all`)
        _log.info("[%d-%d/%d] %s · %s · seeds %s", unit[0] + 1, unit[-1] + 1, len(runs), first["env"],
                  first["label"], [runs[i]["seed"] for i in unit])
        for i, record in zip(unit, execute_group([runs[i] for i in unit], [run_dir(runs[i]) for i in unit],
                                                 train_group_fn)):
            records[i] = record
    else:
        for i in unit:
            _log.info("[%d/%d] %s · %s · seed %d", i + 1, len(runs), runs[i]["env"], runs[i]["label"],
                      runs[i]["seed"])
            records[i] = execute(runs[i], run_dir(runs[i]), train_fn)
            if records[i]["status"] == "stopped":
                break
    return any(records[i] is not None and records[i]["status"] == "stopped" for i in unit)


def jsonable(x):
    """Standard JSON: non-finite numbers (an interval from one seed) become null."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x
