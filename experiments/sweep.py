"""A sweep: a grid of config overrides of the run config, each setting trained for several seeds.

    python -m experiments.sweep --config configs/sweeps/gopo_hparams.py --workdir runs/sweep [--shard=0 --num_shards=2]

With `vmap_seeds = True` in the sweep config, the seeds of a setting on a pure-JAX world (the embedded synthetic
shop) train together in one process, every phase a `jax.vmap` over the seeds of the same pure phase functions
(purejaxrl style; `gopo_jax.train.driver.train_seeds`); seed s of such a group is the run
`python -m experiments.mgshop` trains with `seed=s`, up to float reduction order. Settings on host worlds, the
prompted model, and sweeps without the switch run their seeds one after another (each run itself data-parallel
over the device mesh); a log line says which way each setting goes.

`--num_shards` processes with distinct `--shard` split the work between them (e.g. one process per accelerator):
run i goes to shard i % num_shards, or with `vmap_seeds` setting i (all its seeds) does. Any of them, or a last
call with `--report_only`, writes the report from whatever has finished.

Resumable like the comparison: a run with summary.json is read, a half-finished run resumes from its checkpoints
(a seed group from `runs/<setting>/seeds<...>/checkpoints`), a failing run is recorded with its message (every seed
of a failing group). Writes `sweep.json`, `sweep.md` (mean [95% CI] over seeds per setting) and `convergence.png`
(held-out TSE against iteration per setting).
"""
from __future__ import annotations

import collections
import itertools
import json
import logging
import pathlib
import time
from typing import Any, Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

import configs
from experiments.common import ConfigError, apply_overrides, flattened, load_config_file
from experiments import runs as runs_lib
from experiments.runs import jsonable
from gopo_jax import command_line
from gopo_jax.report import figures, tables

_log = logging.getLogger(__name__)
FLAGS = flags.FLAGS


def grid_axes(grid: ml_collections.ConfigDict) -> list[tuple[str, tuple[Any, ...]]]:
    """{"gopo": {"beta_pref": (0.2, 1.0)}, ...} -> [("gopo.beta_pref", (0.2, 1.0)), ...] in the order written."""
    axes = list(flattened(grid).items())
    for key, values in axes:
        if not isinstance(values, (tuple, list)) or not values:
            raise ConfigError(f"sweep grid: {key}={values!r} is not a tuple of the values it takes, e.g. "
                              f"overrides({{{key!r}: (0.2, 1.0)}}) in the sweep config")
    return [(key, tuple(values)) for key, values in axes]


def expand(cfg: ml_collections.ConfigDict) -> list[dict]:
    """Every (setting, seed) of the sweep: dicts {label, seed, overrides, config} in a stable order."""
    if cfg.seeds < 1:
        raise ConfigError("sweep config: seeds must be >= 1")
    axes = grid_axes(cfg.grid)
    runs = []
    for values in itertools.product(*(v for _, v in axes)):
        overrides = dict(zip((k for k, _ in axes), values))
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"
        for seed in range(cfg.seeds):
            run_cfg = load_config_file(cfg.base, where="sweep config `base`")
            apply_overrides(run_cfg, cfg.fixed, where="sweep config `fixed`")
            apply_overrides(run_cfg, overrides, where=f"sweep grid ({label})")
            run_cfg.seed = seed
            runs.append(dict(label=label, seed=seed, overrides=overrides, config=run_cfg, env=run_cfg.env.name,
                             kind="sweep"))
    return runs


def run_dir(workdir: pathlib.Path, run: dict) -> pathlib.Path:
    return workdir / "runs" / run["label"] / f"seed{run['seed']}"


def sweep(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, shard: int = 0, num_shards: int = 1,
          report_only: bool = False, train_fn: Callable | None = None,
          train_group_fn: Callable | None = None) -> dict:
    """`train_fn(config, workdir)` trains one run (default `gopo_jax.launch.train`); `train_group_fn(configs,
    workdirs)` the seeds of a setting together when `cfg.vmap_seeds` (default
    `gopo_jax.train.driver.train_seeds`)."""
    vmap_seeds = bool(cfg.get("vmap_seeds", False))
    if train_fn is None and not report_only:
        from gopo_jax.launch import train as train_fn  # noqa: PLC0415
    if train_group_fn is None and vmap_seeds and not report_only:
        from gopo_jax.train.driver import train_seeds as train_group_fn  # noqa: PLC0415
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runs = expand(cfg)
    records = runs_lib.run_all(runs, lambda run: run_dir(workdir, run), train_fn=train_fn,
                               train_group_fn=train_group_fn, vmap_seeds=vmap_seeds, shard=shard,
                               num_shards=num_shards, report_only=report_only)
    done = [(run, rec) for run, rec in zip(runs, records) if rec["status"] == "done"]
    summaries = [(run["env"], run["label"], run["seed"], json.loads((run_dir(workdir, run) / "summary.json")
                                                                     .read_text())) for run, _ in done]
    results = {"config": cfg.to_dict(), "runs": records, "settings": {r["label"]: r["overrides"] for r in runs}}
    results.update(tables.aggregate(summaries, gopo_label=""))
    curves = {}
    for run, _ in done:
        curve = figures.read_curve(run_dir(workdir, run), "eval/tse", offset=run["config"].sft.steps)
        curves.setdefault(run["label"], []).append(curve)
    results["wall_seconds"] = time.time() - start
    (workdir / "sweep.json").write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    (workdir / "sweep.md").write_text(tables.markdown(results, gopo_label="").replace("# Comparison results",
                                                                                       "# Sweep results", 1))
    if curves:
        figures.figure3(curves, workdir / "convergence.png", title="GOPO convergence per sweep setting")
    return results


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.config_path("sweeps/gopo_hparams.py"),
                                    "sweep config (configs/sweeps/*.py); override its keys with --config.KEY=VALUE",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "sweep directory; rerun the same command to resume")
    flags.DEFINE_integer("shard", 0, "this process's share of the runs: run i when i % num_shards == shard")
    flags.DEFINE_integer("num_shards", 1, "processes splitting the runs")
    flags.DEFINE_bool("report_only", False, "only (re)write the report from finished runs")


def main(argv) -> None:
    del argv
    command_line.quiet_logging()
    if not FLAGS.workdir:
        command_line.fail("--workdir is required (the sweep directory; rerunning on it resumes)")
    try:
        results = sweep(FLAGS.config, FLAGS.workdir, shard=FLAGS.shard, num_shards=FLAGS.num_shards,
                        report_only=FLAGS.report_only)
    except ConfigError as e:
        command_line.fail(str(e))
    counts = dict(collections.Counter(r["status"] for r in results["runs"]))
    print(f"{FLAGS.workdir}: runs {counts}; sweep.md written; {results['wall_seconds']:.0f} s")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
