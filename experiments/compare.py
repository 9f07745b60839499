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
from typing import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

import configs
from experiments import records as records_lib
from experiments import runs as runs_lib
from experiments.common import ConfigError, apply_overrides, flattened, load_config_file
from experiments.runs import jsonable
from gopo_jax import command_line
from gopo_jax.metrics import geval as geval_lib
from gopo_jax.metrics.reporting import mean_ci_over_seeds
from gopo_jax.report import figures, tables

_log = logging.getLogger(__name__)
FLAGS = flags.FLAGS
MAX_GRID = 4  # settings per method: the equal tuning budget
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


def _label_overrides(cfg, label: str) -> ml_collections.ConfigDict | dict:
    """A label's run-config overrides: its `variants` entry, or `method=<label>`."""
    return cfg.variants[label] if label in cfg.variants else {"method": label}


def tuned_by(cfg, label: str) -> str | None:
    """The grid (configs/tuning.py) whose selected setting `label` runs with: its own, else its method's (an
    ablation runs with the tuned setting of the method it ablates); None when nothing is tuned."""
    if label in cfg.grids:
        return label
    method = flattened(_label_overrides(cfg, label)).get("method", label)
    return method if method in cfg.grids else None


class _Resolver:
    """Resolved run configs: the environment's run config + its short-training overrides (+ `tiny` when quick) +
    the given overrides + `seed`."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, env: str, method_overrides: list, seed: int, where: str) -> ml_collections.ConfigDict:
        cfg = self.cfg
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


def env_labels(cfg, env: str) -> list[str]:
    """The labels compared on `env`: those of `methods` that its `env_methods` entry lists (so narrowing `methods`
    narrows every environment), else all of `methods`."""
    labels = _names(cfg.methods, "methods")
    if env not in cfg.env_methods:
        return labels
    mine = _names(cfg.env_methods[env], f"env_methods.{env}")
    if not (kept := [label for label in labels if label in mine]):
        raise ComparisonError(f"compare config: env_methods.{env} ({mine}) shares no label with `methods` "
                              f"({labels}), so {env} would compare nothing; list some of `methods` there")
    return kept


def _check_counts(cfg) -> None:
    if cfg.seeds < 1 or any(n < 1 for n in cfg.env_seeds.values()):
        raise ComparisonError("compare config: seeds and every env_seeds entry must be >= 1")
    if cfg.tuning_seeds < 0:
        raise ComparisonError("compare config: tuning_seeds must be >= 0 (0: no tuning, every method runs its "
                              "grid's first setting)")
    for label, grid in cfg.grids.items():
        if not 1 <= len(grid) <= MAX_GRID:
            raise ComparisonError(f"compare config: grids.{label} has {len(grid)} settings; the equal tuning budget "
                                  f"is 1 to {MAX_GRID} settings per method (configs/tuning.py)")


def _tuned_labels(cfg) -> list[str]:
    """The grids the comparison's labels need, in the order the labels first need them."""
    needed = [tuned_by(cfg, label) for label in _names(cfg.methods, "methods")]
    if cfg.convergence_seeds > 0:
        needed.append(tuned_by(cfg, cfg.gopo_label))
    return list(dict.fromkeys(g for g in needed if g is not None))


def tuned_environments(cfg) -> list[str]:
    """The environments whose grids are tuned: those of `tuning_environments` that are compared, led by its first
    one, compared or not, when a compared environment outside it needs a selection to borrow (`select`); every
    compared environment when it is empty."""
    compared = _names(cfg.environments, "environments")
    if not cfg.tuning_environments.strip():
        return compared
    tuned = _names(cfg.tuning_environments, "tuning_environments")
    unknown = [e for e in tuned if e not in cfg.env_configs]
    if unknown:
        raise ComparisonError(f"compare config: tuning_environments names {unknown}, which have no entry in "
                              "env_configs; name configured environments, or leave it empty to tune every compared "
                              "one")
    lender = [tuned[0]] if any(e not in tuned for e in compared) else []
    return list(dict.fromkeys(lender + [e for e in tuned if e in compared]))


def tuning_plan(cfg: ml_collections.ConfigDict) -> list[dict]:
    """The tuning runs: every setting of every grid the comparison needs, `tuning_seeds` seeds each, evaluated on
    the validation customers of each tuned environment. Dicts {env, label, setting, seed, kind="tune", config}."""
    _check_counts(cfg)
    resolved = _Resolver(cfg)
    runs = []
    for env in tuned_environments(cfg):
        for label in _tuned_labels(cfg):
            for setting, setting_overrides in cfg.grids[label].items():
                for seed in range(cfg.tuning_seeds):
                    runs.append(dict(env=env, label=label, setting=setting, seed=seed, kind="tune", config=resolved(
                        env, [_label_overrides(cfg, label), setting_overrides, {"eval.split": "validation"}], seed,
                        f"grids.{label}.{setting}")))
    return runs


def select(cfg, tune_runs: list[dict], records: list[dict], workdir: pathlib.Path) -> dict:
    """{env: {label: {"setting", "complete", "metric", "scores": {setting: ci}, "grid": {setting: overrides}}}}:
    per grid, the setting with the best mean validation `selection_metric` over its tuning seeds (the first listed
    wins ties). Without tuning (tuning_seeds 0) the first setting is taken, complete. A grid with an unfinished run
    is incomplete: the runs it tunes wait for it. An environment outside `tuning_environments` takes the selection
    of the first tuned one (its entry says `tuned_on`)."""
    selection: dict = {}
    tuned = tuned_environments(cfg)
    for env in tuned:
        for label in _tuned_labels(cfg):
            grid = cfg.grids[label]
            entry = {"metric": cfg.selection_metric, "grid": {k: flattened(v) for k, v in grid.items()},
                     "tuning_seeds": cfg.tuning_seeds, "scores": {}}
            mine = [(run, rec) for run, rec in zip(tune_runs, records) if (run["env"], run["label"]) == (env, label)]
            if cfg.tuning_seeds == 0:
                selection.setdefault(env, {})[label] = entry | {"setting": next(iter(grid)), "complete": True}
                continue
            complete = all(rec["status"] == "done" for _, rec in mine)
            for setting in grid:
                values = [tables.run_value(json.loads((run_dir(workdir, run) / "summary.json").read_text()),
                                           cfg.selection_metric)
                          for run, rec in mine if run["setting"] == setting and rec["status"] == "done"]
                if values:
                    entry["scores"][setting] = mean_ci_over_seeds(values)
            best = (max(entry["scores"], key=lambda k: (entry["scores"][k]["mean"], -list(grid).index(k)))
                    if complete else None)
            selection.setdefault(env, {})[label] = entry | {"setting": best, "complete": complete}
    for env in _names(cfg.environments, "environments"):
        if env not in tuned:
            selection[env] = {label: entry | {"tuned_on": tuned[0]}
                              for label, entry in selection.get(tuned[0], {}).items()}
    return selection


def plan(cfg: ml_collections.ConfigDict, selection: dict | None = None) -> list[dict]:
    """The runs of the comparison proper, on the TEST customers: dicts {env, label, setting, seed, kind, config}
    with the resolved run config. A label that is tuned runs its grid's selected setting (`selection`, from
    `select`); with `selection` None each runs its grid's first setting. Labels whose grid is not fully tuned yet
    are left out (rerun the comparison once the tuning runs have finished)."""
    _check_counts(cfg)
    envs = _names(cfg.environments, "environments")
    resolved = _Resolver(cfg)
    test = {"eval.split": "test"}

    def setting_of(env: str, label: str) -> tuple[str | None, list] | None:
        grid_label = tuned_by(cfg, label)
        if grid_label is None:
            return None, []
        chosen = (selection[env][grid_label] if selection is not None
                  else {"setting": next(iter(cfg.grids[grid_label])), "complete": True})
        if not chosen["complete"]:
            return None
        return chosen["setting"], [cfg.grids[grid_label][chosen["setting"]]]

    runs = []
    for env in envs:
        for label in env_labels(cfg, env):
            chosen = setting_of(env, label)
            if chosen is None:
                continue
            setting, setting_overrides = chosen
            for seed in range(cfg.env_seeds.get(env, cfg.seeds)):
                runs.append(dict(env=env, label=label, setting=setting, seed=seed, kind="compare", config=resolved(
                    env, [_label_overrides(cfg, label), *setting_overrides, test], seed, f"variants.{label}")))
    gopo = setting_of(envs[0], cfg.gopo_label) if cfg.convergence_seeds > 0 else None
    for name in cfg.convergence if gopo is not None else ():
        setting, setting_overrides = gopo
        for seed in range(cfg.convergence_seeds):
            runs.append(dict(env=envs[0], label=f"conv_{name}", setting=setting, seed=seed, kind="convergence",
                             config=resolved(envs[0], [_label_overrides(cfg, cfg.gopo_label), *setting_overrides,
                                                       cfg.convergence[name], test], seed, f"convergence.{name}")))
    return runs


def run_dir(workdir: pathlib.Path, run: dict) -> pathlib.Path:
    if run["kind"] == "tune":
        return workdir / "tuning" / run["env"] / run["label"] / run["setting"] / f"seed{run['seed']}"
    return workdir / "runs" / run["env"] / run["label"] / f"seed{run['seed']}"


def compare(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, train_fn: Callable | None = None,
            train_group_fn: Callable | None = None, report_only: bool = False, shard: int = 0,
            num_shards: int = 1, claim: bool = False) -> dict:
    """Runs (or resumes) the tuning and the comparison and writes the results files; returns the results dict.
    `report_only`: train nothing, report the runs that have finished (others are listed as "not run").
    `shard`/`num_shards`: this process trains unit i of each stage when i % num_shards == shard (a unit is a run,
    or with `vmap_seeds` a setting's seeds); `claim`: this process takes each unfinished unit no other live process
    has claimed (`runs.run_all`); any process, or a last `report_only` call, writes the report."""
    if train_fn is None and not report_only:
        from gopo_jax.launch import train as train_fn  # noqa: PLC0415  (heavy: JAX, models)
    if train_group_fn is None and cfg.vmap_seeds and not report_only:
        from gopo_jax.train.driver import train_seeds as train_group_fn  # noqa: PLC0415
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def execute_all(runs: list[dict], *, train: bool) -> list[dict]:
        if cfg.share_warm_starts:
            for run in runs:
                # One folder per code: a warm start is named by its config alone (warm_start_key), so a change of
                # the code that keeps the config (a world's re-split data) must not find the old code's warm start.
                code = records_lib.code_digest(run["config"].env.name)[:16]
                run["config"].sft.cache_dir = str((workdir / "warm_starts" / code).resolve())
        return runs_lib.run_all(runs, lambda run: run_dir(workdir, run), train_fn=train_fn,
                                train_group_fn=train_group_fn, vmap_seeds=cfg.vmap_seeds, shard=shard,
                                num_shards=num_shards, claim=claim, report_only=not train)

    tune_runs = tuning_plan(cfg)
    tune_records = execute_all(tune_runs, train=not report_only)
    selection = select(cfg, tune_runs, tune_records, workdir)
    runs = plan(cfg, selection)
    # A SIGTERM that stopped the tuning stops the comparison too: the report is written, nothing more is trained.
    stopped = any(record["status"] == "stopped" for record in tune_records)
    records = execute_all(runs, train=not (report_only or stopped))
    results = collect(cfg, workdir, runs, records)
    results["tuning"] = {"runs": tune_records, "selection": selection}
    results["training_seconds"] = {"comparison": training_seconds(workdir, runs, records),
                                   "tuning": training_seconds(workdir, tune_runs, tune_records)}
    results["wall_seconds"] = time.time() - start
    write_results(workdir, results, cfg)
    return results


def training_seconds(workdir: pathlib.Path, runs: list[dict], records: list[dict]) -> dict[str, float]:
    """{env: seconds}: the wall time the finished runs took to train, from their summaries (so kept runs of earlier
    sittings count), the seeds of one vmapped group once: the time a comparison costs, whoever trained it."""
    groups: dict[tuple, float] = {}
    for run, record in zip(runs, records):
        if record["status"] != "done":
            continue
        summary = json.loads((run_dir(workdir, run) / "summary.json").read_text())
        wall = float(summary.get("wall_seconds", 0.0))
        group = (run["env"], run["label"], run.get("setting"), run["kind"],
                 "group" if summary.get("seed_parallel") else run["seed"])
        groups[group] = max(groups.get(group, 0.0), wall)
    out: dict[str, float] = {}
    for (env, *_), wall in groups.items():
        out[env] = out.get(env, 0.0) + wall
    return out


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


def write_results(workdir: pathlib.Path, results: dict, cfg) -> None:
    (workdir / "results.json").write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    columns = (*tables.HEADLINE, "geval") if results["geval"]["available"] else tables.HEADLINE
    (workdir / "results.md").write_text(tables.markdown(results, gopo_label=cfg.gopo_label, metrics=columns)
                                        + tables.tuning_markdown(results["tuning"]))
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
    flags.DEFINE_integer("shard", 0, "this process's share of each stage's units: unit i when i % num_shards == shard")
    flags.DEFINE_integer("num_shards", 1, "processes splitting the comparison (each with its own --shard)")
    flags.DEFINE_bool("claim", False, "share the units with the other processes of this machine that run the same "
                      "command with --claim: each takes the next unfinished unit nobody has claimed")


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
        results = compare(FLAGS.config, FLAGS.workdir, report_only=FLAGS.report_only, shard=FLAGS.shard,
                          num_shards=FLAGS.num_shards, claim=FLAGS.claim)
    except ConfigError as e:
        command_line.fail(str(e))
    counts = dict(collections.Counter(r["status"] for r in results["runs"]))
    print(f"{FLAGS.workdir}: runs {counts}; results.md, results.json, figures written; "
          f"{results['wall_seconds']:.0f} s")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
