"""The comparison driver: methods × environments × seeds, each run a config override of the run config.

    gopo-compare --workdir runs/compare [--config.seeds=5]   # --config: the installed configs/compare.py
    gopo-compare --workdir runs/compare --report_only
    python -m experiments.compare --config configs/compare.py --workdir runs/compare   # the same, from a checkout

Each run trains in this process with `gopo_jax.launch.train` in `<workdir>/runs/<env>/<label>/seed<s>/`.
Resumable: a run whose summary.json exists is read, not retrained; a half-finished run resumes through its own
checkpoints; a run that raises (e.g. a baseline that is not implemented yet, a missing data folder) is recorded
as failed with its message, and the comparison goes on. Rerunning the command retries only what is not done.
A run directory written with a different resolved config is an error (the old numbers would be mislabelled).

Writes `<workdir>/results.json` (every run's status, the per-environment tables and GOPO's relative differences),
`results.md`, `figure1.png` (TSE / GRE / G-Eval per environment and method) and `figure3.png` (GOPO convergence
under the `convergence` settings). G-Eval: with a judge configured (`geval.judge`: an OpenAI-compatible endpoint
or a local Hugging Face causal LM), every finished run's held-out turns (`judge_samples.jsonl`) are judged once
(cached in the run's `geval.json`) and the score is a metric of the tables; with none it is reported as absent.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
import time
import traceback
from typing import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

import configs
from experiments.common import ConfigError, apply_overrides, flattened, load_config_file
from gopo_jax import command_line
from gopo_jax.metrics import geval as geval_lib
from gopo_jax.report import figures, tables

_log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
# A relative env.data_dir of the comparison config (../shared/data/...) is taken from the repository root of a
# checkout: the directory that holds the configs package.
DATA_ROOT = configs.CONFIGS_DIR.parent


class ComparisonError(ConfigError):
    """A comparison that cannot go on as configured; the message names the key or directory and the fix."""


def _names(text: str, key: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ComparisonError(f"compare config: `{key}` is empty; list at least one name, comma-separated")
    return names


def plan(cfg: ml_collections.ConfigDict) -> list[dict]:
    """The runs of a comparison: dicts {env, label, seed, kind, config} with the resolved run config."""
    if cfg.seeds < 1:
        raise ComparisonError("compare config: seeds must be >= 1")
    envs = _names(cfg.environments, "environments")
    runs = []

    def resolved(env: str, method_overrides: list, seed: int, where: str) -> ml_collections.ConfigDict:
        if env not in cfg.env_configs or env not in cfg.env_overrides:
            raise ComparisonError(f"compare config: environment {env!r} needs an entry in env_configs (its run "
                                  "config file) and in env_overrides (its short-training overrides); add them to "
                                  "configs/compare.py")
        run_cfg = load_config_file(cfg.env_configs[env], where=f"env_configs.{env}")
        apply_overrides(run_cfg, cfg.env_overrides[env], where=f"env_overrides.{env}")
        if cfg.quick:
            apply_overrides(run_cfg, cfg.tiny, where="compare config `tiny`")
        for overrides in method_overrides:
            apply_overrides(run_cfg, overrides, where=where)
        run_cfg.seed = seed
        if run_cfg.env.data_dir and not pathlib.Path(run_cfg.env.data_dir).is_absolute():
            run_cfg.env.data_dir = str((DATA_ROOT / run_cfg.env.data_dir).resolve())
        return run_cfg

    for env in envs:
        for label in _names(cfg.methods, "methods"):
            method_overrides = [cfg.variants[label] if label in cfg.variants else {"method": label}]
            for seed in range(cfg.seeds):
                runs.append(dict(env=env, label=label, seed=seed, kind="compare",
                                 config=resolved(env, method_overrides, seed, f"variants.{label}")))
    for setting in cfg.convergence:
        for seed in range(cfg.convergence_seeds):
            method_overrides = [{"method": "gopo"}, cfg.convergence[setting]]
            runs.append(dict(env=envs[0], label=f"conv_{setting}", seed=seed, kind="convergence",
                             config=resolved(envs[0], method_overrides, seed, f"convergence.{setting}")))
    return runs


def run_dir(workdir: pathlib.Path, run: dict) -> pathlib.Path:
    return workdir / "runs" / run["env"] / run["label"] / f"seed{run['seed']}"


# Run config keys that change neither training nor evaluation: where shared warm starts live (a moved workdir
# still resumes) and how many dialogues are written out for a judge.
_NOT_RESULTS = frozenset({"sft.cache_dir", "eval.judge_dialogues"})
# Where metrics are sent (TensorBoard, W&B) and how long a multi-process run waits for a silent peer change nothing
# a run computes: switching W&B on for a resumed comparison, or a workdir from before these sections, is the same run.
_NOT_RESULTS_PREFIXES = ("log.", "distributed.")


def check_same_config(directory: pathlib.Path, config: ml_collections.ConfigDict) -> None:
    path = directory / "config.json"
    if not path.exists():
        return
    stored = json.loads(path.read_text())
    wanted = json.loads(config.to_json_best_effort())

    a, b = flattened(stored), flattened(wanted)
    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in _NOT_RESULTS
                  and not k.startswith(_NOT_RESULTS_PREFIXES))
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
        raise ComparisonError(f"{directory} was trained with a different config ({shown}); use a fresh --workdir "
                              f"or delete {directory} to retrain it")


class _NotRun(Exception):
    """A run a report-only call leaves untrained."""


def execute(run: dict, directory: pathlib.Path, train_fn: Callable) -> dict:
    """Trains (or reads) one run; never raises for a failing run, only for a mislabelled directory."""
    record = {k: run[k] for k in ("env", "label", "seed", "kind")} | {"dir": str(directory)}
    summary_path = directory / "summary.json"
    check_same_config(directory, run["config"])
    if summary_path.exists():
        return record | {"status": "done", "resumed": "skipped (summary.json exists)"}
    start = time.time()
    try:
        summary = train_fn(run["config"], directory)
    except _NotRun:
        return record | {"status": "not run"}
    except Exception as e:  # noqa: BLE001  (one failing method must not end the comparison)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "error.txt").write_text(traceback.format_exc())
        message = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _log.error("run %s/%s/seed%d failed: %s (traceback in %s)", run["env"], run["label"], run["seed"], message,
                   directory / "error.txt")
        return record | {"status": "failed", "error": message, "wall_seconds": time.time() - start}
    if summary.get("stopped"):
        return record | {"status": "stopped", "iteration": summary.get("iteration"),
                         "wall_seconds": time.time() - start}
    (directory / "error.txt").unlink(missing_ok=True)
    return record | {"status": "done", "wall_seconds": time.time() - start}


def compare(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, train_fn: Callable | None = None,
            report_only: bool = False) -> dict:
    """Runs (or resumes) the whole comparison and writes the results files; returns the results dict.
    `report_only`: train nothing, report the runs that have finished (others are listed as "not run")."""
    if report_only:
        def train_fn(config, directory):
            raise _NotRun(f"{directory} has not finished; rerun without --report_only to train it")
    elif train_fn is None:
        from gopo_jax.launch import train as train_fn  # noqa: PLC0415  (heavy: JAX, models)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runs = plan(cfg)
    if cfg.share_warm_starts:
        for run in runs:
            run["config"].sft.cache_dir = str((workdir / "warm_starts").resolve())
    records = []
    for i, run in enumerate(runs):
        _log.info("[%d/%d] %s · %s · seed %d", i + 1, len(runs), run["env"], run["label"], run["seed"])
        record = execute(run, run_dir(workdir, run), train_fn)
        records.append(record)
        if record["status"] == "stopped":
            _log.warning("stopped by SIGTERM; rerun the same command to resume")
            break
    results = collect(cfg, workdir, runs, records)
    results["wall_seconds"] = time.time() - start
    write_results(workdir, results, cfg)
    return results


def collect(cfg, workdir: pathlib.Path, runs: list[dict], records: list[dict]) -> dict:
    done = [(run, rec) for run, rec in zip(runs, records) if rec["status"] == "done"]
    summaries = {id(run): json.loads((run_dir(workdir, run) / "summary.json").read_text()) for run, _ in done}
    compare_records = [(run["env"], run["label"], run["seed"], summaries[id(run)]) for run, _ in done
                       if run["kind"] == "compare"]
    results = {"config": cfg.to_dict(), "runs": records}
    # The key comes from the environment, never from a config that is written into results.json.
    judge = geval_lib.make_judge(cfg.geval.to_dict() | {"api_key": os.environ.get(cfg.geval.api_key_env, "")})
    metrics = tables.METRICS
    if judge.available:
        criteria = _names(cfg.geval.criteria, "geval.criteria")
        for run, _ in done:
            summary = summaries[id(run)]
            summary[summary["method"]]["geval"] = judge_run(judge, run_dir(workdir, run), criteria)
        metrics = (*metrics, "geval")
    results.update(tables.aggregate(compare_records, gopo_label=cfg.gopo_label, metrics=metrics))
    results["geval"] = ({"available": True, "judge": judge.name, "criteria": cfg.geval.criteria}
                        if judge.available else {"available": False, "reason": judge.reason})
    results["convergence"] = _convergence_curves(cfg, workdir, runs, records)
    return results


def judge_run(judge, directory: pathlib.Path, criteria: list[str]) -> dict:
    """G-Eval of a finished run's held-out turns (its judge_samples.jsonl): the mean over criteria of the
    per-criterion means, as {"mean", "per_criterion", "judge", "samples"}. Cached in the run's geval.json per judge
    and criteria, so a resumed comparison does not ask the judge again."""
    from gopo_jax.train.report import JUDGE_SAMPLES  # noqa: PLC0415
    cache = directory / "geval.json"
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("judge") == judge.name and stored.get("criteria") == criteria:
            return stored
    path = directory / JUDGE_SAMPLES
    if not path.exists():
        raise ComparisonError(f"{path} is missing: the run predates G-Eval samples; delete {directory} to retrain "
                              "it, or run the comparison with geval.judge='none'")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = [geval_lib.Sample(context=r["context"], response=r["response"], strategy=r["strategy"]) for r in rows]
    result = geval_lib.geval(judge, samples, criteria)
    per_criterion = {k: v for k, v in result.scores.items() if math.isfinite(v)}
    out = {"judge": judge.name, "criteria": criteria, "samples": len(samples), "per_criterion": per_criterion,
           "unscored": result.num_unscored,
           "mean": float(sum(per_criterion.values()) / len(per_criterion)) if per_criterion else float("nan")}
    cache.write_text(json.dumps(jsonable(out), indent=2) + "\n")
    return out


def _convergence_curves(cfg, workdir, runs, records) -> dict:
    """setting -> [{"seed", "iterations", "tse"}] for Figure 3: the comparison's GOPO runs ("default") and the
    convergence settings, on the first environment."""
    first_env = _names(cfg.environments, "environments")[0]
    curves = {}
    for run, rec in zip(runs, records):
        if rec["status"] != "done" or run["env"] != first_env:
            continue
        if run["kind"] == "compare" and run["label"] == cfg.gopo_label:
            setting = "default"
        elif run["kind"] == "convergence":
            setting = run["label"].removeprefix("conv_")
        else:
            continue
        steps, values = figures.read_curve(run_dir(workdir, run), "eval/tse", offset=run["config"].sft.steps)
        curves.setdefault(setting, []).append({"seed": run["seed"], "iterations": steps, "tse": values})
    return curves


def jsonable(x):
    """Standard JSON: non-finite numbers (an interval from one seed) become null."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(workdir: pathlib.Path, results: dict, cfg) -> None:
    (workdir / "results.json").write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    columns = (*tables.HEADLINE, "geval") if results["geval"]["available"] else tables.HEADLINE
    (workdir / "results.md").write_text(tables.markdown(results, gopo_label=cfg.gopo_label, metrics=columns))
    if results["table"]:
        geval = results["geval"]
        table = {env: {label: cis["geval"] for label, cis in by_label.items() if "geval" in cis}
                 for env, by_label in results["table"].items()} if geval["available"] else None
        figures.figure1(results["table"], workdir / "figure1.png", geval=table,
                        geval_reason=geval.get("reason", ""), highlight=cfg.gopo_label)
    if results["convergence"]:
        figures.figure3({k: [(c["iterations"], c["tse"]) for c in v] for k, v in results["convergence"].items()},
                        workdir / "figure3.png")


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.config_path("compare.py"),
                                    "comparison config (configs/compare.py); override its keys with "
                                    "--config.KEY=VALUE", lock_config=True)
    flags.DEFINE_string("workdir", None, "comparison directory; rerun the same command to resume")
    flags.DEFINE_bool("report_only", False, "train nothing: write the results of the runs that have finished "
                      "(e.g. while other processes still train parts of the comparison in the same workdir)")


def main(argv) -> None:
    del argv
    command_line.quiet_logging()
    if not FLAGS.workdir:
        command_line.fail("--workdir is required (the comparison directory; rerunning on it resumes)")
    import jax  # noqa: PLC0415  (after the flags, so --help stays quick)
    if not jax.config.jax_compilation_cache_dir:
        # The runs of a comparison compile the same rollouts and steps again and again: compile each once.
        jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(FLAGS.workdir).resolve() / "jax_cache"))
    try:
        results = compare(FLAGS.config, FLAGS.workdir, report_only=FLAGS.report_only)
    except ConfigError as e:
        command_line.fail(str(e))
    counts = dict(collections.Counter(r["status"] for r in results["runs"]))
    print(f"{FLAGS.workdir}: runs {counts}; results.md, results.json, figures written; "
          f"{results['wall_seconds']:.0f} s")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
