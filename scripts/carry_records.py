"""Carries the comparison's kept runs over a change of run code that leaves what they computed unchanged, once a
retrained sample of them has come out bit-identical.

    python -m scripts.carry_records --since=COMMIT                 # check one unit per world and label, then carry
    python -m scripts.carry_records --since=COMMIT --check=world   # one unit per world: minutes, a weaker check
    python -m scripts.carry_records --since=COMMIT --dry_run       # what would be checked and carried

A kept run (docs/results/compare_runs; experiments/records.py) is stamped with the digest of the run code that
trained it, and any edit of that code, even one no run executes (an error path, a docstring, a function only a
multi-process driver calls), leaves every record stale: `scripts.regenerate_results` then retrains the comparison,
hours on this machine. This command takes the records stamped with COMMIT's digests (computed by COMMIT's own
experiments/records.py, so a change of the digest's rules is carried as well), prints the run-code files that differ
from the installed code, and retrains a sample from the records' own configs: per world and label (`--check=label`)
or per world (`--check=world`) the cheapest unit, one run or the seed group trained vmapped as it was. Only when every
sampled run ends with its record's summary (but its wall time and a seed group's checkpoint folder), final parameters
and evaluation lines (but their wall-clock `time`; a step a resumed run logged twice counts once) does it restamp all of COMMIT's records with the installed code's digests; otherwise it names the
first difference and stamps nothing: the change changed results, so retrain. What the sample cannot show (a change
on a path only unsampled runs take) is the caller's argument: write it in the commit that carries the stamps.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import pathlib
import subprocess
import tarfile
import tempfile
from collections.abc import Callable

import ml_collections
from absl import flags

import gopo_jax
from experiments import records as records_lib
from gopo_jax import command_line

FLAGS = flags.FLAGS
REPO = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = "summary.json"
_UNTIMED_EVAL = ("time",)  # the only field of an evaluation line a retrained run may change


class CarryError(ValueError):
    """The records cannot be carried: a bad argument, or a sampled run that came out different."""


@dataclasses.dataclass(frozen=True)
class Unit:
    """Records trained together: one run, or the seeds of a setting trained vmapped (`seed_parallel`)."""

    directories: tuple[pathlib.Path, ...]
    seed_parallel: bool
    cost_s: float  # the wall time the unit took to train


def digests_at(commit: str, repo: pathlib.Path = REPO) -> tuple[dict[str | None, str], dict[str, bytes]]:
    """(world -> digest as COMMIT's experiments/records.py computes it for COMMIT's gopo_jax, COMMIT's run-code
    files under the installed rules: relative path -> bytes)."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit, "gopo_jax",
                              "experiments/records.py"], capture_output=True, check=False)
    if archive.returncode:
        raise CarryError(f"--since={commit}: git archive failed: {archive.stderr.decode(errors='replace').strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        spec = importlib.util.spec_from_file_location("records_at_commit", pathlib.Path(tmp, "experiments",
                                                                                      "records.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        root = pathlib.Path(tmp, "gopo_jax")
        return module.world_digests(root), run_code(root)


def run_code(root: pathlib.Path) -> dict[str, bytes]:
    """The files of a gopo_jax tree that the installed digest covers: relative path -> bytes."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts
            and path.relative_to(root).parts[0] not in records_lib.NOT_IN_RUNS}


def changed_files(before: dict[str, bytes], after: dict[str, bytes]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def carried(records: pathlib.Path, old: dict[str | None, str]) -> list[pathlib.Path]:
    """The finished records stamped with `old`'s digest of their world."""
    return [d for d in records_lib.finished(records)
            if records_lib.stamped_digest(d) == old.get(records_lib.world_of(d), old[None])]


def units(directories: list[pathlib.Path]) -> list[Unit]:
    """The records grouped as they were trained: the seeds of one setting that trained vmapped together form one
    unit (`seed_parallel.seeds`)."""
    groups: dict[tuple, list[tuple[pathlib.Path, float]]] = {}
    for directory in directories:
        summary = json.loads((directory / SUMMARY).read_text())
        group = summary.get("seed_parallel")
        # The seeds that trained together (a sitting may have trained only some of a setting's seeds); a run alone.
        key = (("group", directory.parent, tuple(group.get("seeds", ())) if isinstance(group, dict) else ())
               if group else ("run", directory))
        groups.setdefault(key, []).append((directory, float(summary.get("wall_seconds", 0.0))))
    return [Unit(tuple(sorted(d for d, _ in members)), key[0] == "group", max(s for _, s in members))
            for key, members in groups.items()]


def sample(all_units: list[Unit], records: pathlib.Path, check: str) -> list[Unit]:
    """The cheapest unit of each world (`check="world"`) or of each world and label (`"label"`; a record lives at
    runs/<world>/<label>/seedK or tuning/<world>/<label>/<setting>/seedK)."""
    if check not in ("world", "label"):
        raise CarryError(f"--check={check}: choose world or label")
    cheapest: dict[tuple, Unit] = {}
    for unit in all_units:
        parts = unit.directories[0].relative_to(records).parts
        key = (records_lib.world_of(unit.directories[0]),) + ((parts[2],) if check == "label" else ())
        if key not in cheapest or unit.cost_s < cheapest[key].cost_s:
            cheapest[key] = unit
    return [cheapest[key] for key in sorted(cheapest, key=str)]


def _config(directory: pathlib.Path, warm_starts: pathlib.Path) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(json.loads((directory / "config.json").read_text()))
    if config.get("sft", {}).get("cache_dir"):  # the comparison's shared warm starts: compute them afresh
        config.sft.cache_dir = str(warm_starts)
    return config


def retrain(unit: Unit, records: pathlib.Path, scratch: pathlib.Path, *, train_fn: Callable,
            train_group_fn: Callable) -> list[pathlib.Path]:
    """Trains `unit` again from its records' configs under `scratch`; the new run directories, in order."""
    targets = [scratch / "runs" / d.relative_to(records) for d in unit.directories]
    configs = [_config(d, scratch / "warm_starts") for d in unit.directories]
    if unit.seed_parallel:
        train_group_fn(configs, targets)
    else:
        for config, target in zip(configs, targets):
            train_fn(config, target)
    return targets


def _without(record: dict, keys: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in keys}


def _comparable_summary(directory: pathlib.Path) -> dict:
    """A run's summary but when and where it trained: its wall time, and a seed group's checkpoint folder."""
    summary = _without(json.loads((directory / SUMMARY).read_text()), ("wall_seconds",))
    if isinstance(summary.get("seed_parallel"), dict):
        summary["seed_parallel"] = _without(summary["seed_parallel"], ("group_dir",))
    return summary


def _eval_by_step(path: pathlib.Path) -> dict:
    """step -> the distinct evaluation lines logged at it, but their wall-clock `time`. A resumed run logs some
    steps again (its reference point, identical), which a run trained in one go does not: copies count once."""
    out: dict = {}
    for line in records_lib.eval_lines(path).splitlines():
        record = _without(json.loads(line), _UNTIMED_EVAL)
        out.setdefault(record.get("step"), set()).add(json.dumps(record, sort_keys=True))
    return out


def difference(record: pathlib.Path, retrained: pathlib.Path) -> str | None:
    """What differs between a record and its retrained run (the first difference), or None."""
    kept, again = _comparable_summary(record), _comparable_summary(retrained)
    if kept.get("final_params_sha256") != again.get("final_params_sha256"):
        return (f"final parameters {str(kept.get('final_params_sha256'))[:12]} -> "
                f"{str(again.get('final_params_sha256'))[:12]}")
    for key in sorted(kept.keys() | again.keys()):
        if kept.get(key) != again.get(key):
            return f"summary.{key}: {json.dumps(kept.get(key))[:120]} -> {json.dumps(again.get(key))[:120]}"
    steps, steps_again = _eval_by_step(record / records_lib.METRICS), _eval_by_step(retrained / records_lib.METRICS)
    if steps.keys() != steps_again.keys():
        return f"evaluated at steps {sorted(steps, key=str)} -> {sorted(steps_again, key=str)}"
    for step in sorted(steps, key=str):
        if steps[step] != steps_again[step]:
            if len(steps[step]) == len(steps_again[step]) == 1:
                a, b = (json.loads(next(iter(lines))) for lines in (steps[step], steps_again[step]))
                key = next(k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k))
                return f"evaluation at step {step} ({key}): {a.get(key)} -> {b.get(key)}"
            return f"evaluation at step {step}: {len(steps[step])} distinct lines -> {len(steps_again[step])}"
    return None


def carry(records: pathlib.Path, old: dict[str | None, str], scratch: pathlib.Path, *, check: str = "label",
          dry_run: bool = False, train_fn: Callable | None = None, train_group_fn: Callable | None = None,
          log: Callable[[str], None] = print) -> dict:
    """Checks a sample of the records stamped with `old` (see the module docstring) and restamps them all with the
    installed code's digests. {"carried", "checked", "sample"}; raises CarryError at the first difference."""
    if train_fn is None:
        from gopo_jax.launch import train as train_fn  # noqa: PLC0415  (heavy: JAX, models)
    if train_group_fn is None:
        from gopo_jax.train.driver import train_seeds as train_group_fn  # noqa: PLC0415
    directories = carried(records, old)
    if not directories:
        raise CarryError(f"no record under {records} carries those digests: nothing to carry")
    chosen = sample(units(directories), records, check)
    log(f"{len(directories)} records carry them; retraining {len(chosen)} unit(s) of {check} "
        f"({sum(u.cost_s for u in chosen):.0f} s of training when they were kept):")
    for unit in chosen:
        log(f"  {unit.directories[0].parent.relative_to(records)} "
            f"({'seeds vmapped' if unit.seed_parallel else unit.directories[0].name}, {unit.cost_s:.0f} s)")
    if dry_run:
        return {"carried": 0, "checked": 0, "sample": len(chosen)}
    checked = 0
    for unit in chosen:
        for record, again in zip(unit.directories, retrain(unit, records, scratch, train_fn=train_fn,
                                                           train_group_fn=train_group_fn)):
            different = difference(record, again)
            if different:
                raise CarryError(f"{record.relative_to(records)} came out different when retrained: {different}; "
                                 "nothing was restamped: this change changes results, so retrain the comparison "
                                 "(scripts.regenerate_results)")
            checked += 1
    for directory in directories:
        records_lib.stamp(directory)
    log(f"restamped {len(directories)} records with the installed code's digests ({checked} retrained runs "
        "identical)")
    return {"carried": len(directories), "checked": checked, "sample": len(chosen)}


def define_flags() -> None:
    flags.DEFINE_string("since", None, "the commit whose run code the records were stamped with")
    flags.DEFINE_enum("check", "label", ["label", "world"], "retrain the cheapest unit per world and label, or per "
                      "world")
    flags.DEFINE_string("records", "docs/results/compare_runs", "the kept runs, relative to the repository root")
    flags.DEFINE_bool("dry_run", False, "print what would be checked and carried; train and stamp nothing")


def main(argv) -> None:
    del argv
    command_line.quiet_logging()
    if not FLAGS.since:
        command_line.fail("--since=COMMIT is required: the commit whose run code the records were stamped with")
    try:
        old, old_files = digests_at(FLAGS.since)
        changed = changed_files(old_files, run_code(pathlib.Path(gopo_jax.__file__).parent))
        print(f"run-code files changed since {FLAGS.since}: {', '.join(changed) or 'none'}")
        with tempfile.TemporaryDirectory(prefix="carry_records_") as scratch:
            carry(REPO / FLAGS.records, old, pathlib.Path(scratch), check=FLAGS.check, dry_run=FLAGS.dry_run)
    except CarryError as e:
        command_line.fail(str(e))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
