"""A sweep: a grid of config overrides of the run config, each setting trained for several seeds.

    python -m experiments.sweep --config configs/sweeps/gopo_hparams.py --workdir runs/sweep [--shard=0 --num_shards=2]

Runs go one after another in this process (each run itself data-parallel over the device mesh); `--num_shards`
processes with distinct `--shard` split the runs between them (e.g. one process per accelerator), and any of them,
or a last call with `--report_only`, writes the report from whatever has finished. Seeds are NOT trained in one
process with `jax.vmap` over keys: the run pipeline (`gopo_jax.train.loop.Run`) drives its phases, checkpoints and
logs from a host loop, so a purejaxrl-style `vmap(train)(keys)` would need a different, fully traced pipeline.

Resumable like the comparison: a run with summary.json is read, a half-finished run resumes from its checkpoints,
a failing run is recorded with its message. Writes `sweep.json`, `sweep.md` (mean [95% CI] over seeds per
setting) and `convergence.png` (held-out TSE against iteration per setting).
"""
from __future__ import annotations

import itertools
import json
import logging
import pathlib
import sys
import time
from typing import Any, Callable

import ml_collections

from experiments.compare import ComparisonError, apply_overrides, execute, jsonable, load_config_file, parse_overrides
from gopo_jax.report import figures, tables

_log = logging.getLogger(__name__)


def parse_grid(text: str) -> list[tuple[str, list[Any]]]:
    """"a.b=1|2;c=x|y" -> [("a.b", [1, 2]), ("c", ["x", "y"])] (values as Python literals, else strings)."""
    axes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        options = [v.strip() for v in values.split("|") if v.strip()]
        if not sep or not key.strip() or not options:
            raise ComparisonError(f"sweep grid: {part!r} is not key=v1|v2|... (e.g. 'gopo.beta_pref=0.2|1.0')")
        parsed = [parse_overrides(f"x={v}", where="sweep grid")[0][1] for v in options]
        axes.append((key.strip(), parsed))
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ComparisonError(f"sweep grid: a key appears twice in {keys}")
    return axes


def expand(cfg: ml_collections.ConfigDict) -> list[dict]:
    """Every (setting, seed) of the sweep: dicts {label, seed, overrides, config} in a stable order."""
    if cfg.seeds < 1:
        raise ComparisonError("sweep config: seeds must be >= 1")
    axes = parse_grid(cfg.grid)
    fixed = parse_overrides(cfg.fixed, where="sweep config `fixed`")
    runs = []
    for values in itertools.product(*(v for _, v in axes)) if axes else [()]:
        overrides = list(zip((k for k, _ in axes), values))
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in overrides) or "base"
        for seed in range(cfg.seeds):
            run_cfg = load_config_file(cfg.base)
            apply_overrides(run_cfg, fixed, where="sweep config `fixed`")
            apply_overrides(run_cfg, overrides, where=f"sweep grid ({label})")
            run_cfg.seed = seed
            runs.append(dict(label=label, seed=seed, overrides=overrides, config=run_cfg, env=run_cfg.env.name,
                             kind="sweep"))
    return runs


def run_dir(workdir: pathlib.Path, run: dict) -> pathlib.Path:
    return workdir / "runs" / run["label"] / f"seed{run['seed']}"


def sweep(cfg: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, shard: int = 0, num_shards: int = 1,
          report_only: bool = False, train_fn: Callable | None = None) -> dict:
    if not 0 <= shard < num_shards:
        raise ComparisonError(f"--shard={shard} must be in 0..{num_shards - 1} (--num_shards={num_shards})")
    if train_fn is None and not report_only:
        from gopo_jax.train.loop import train as train_fn  # noqa: PLC0415
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runs = expand(cfg)
    records = []
    for i, run in enumerate(runs):
        directory = run_dir(workdir, run)
        if report_only or i % num_shards != shard:
            status = "done" if (directory / "summary.json").exists() else "not run here"
            records.append({"label": run["label"], "seed": run["seed"], "dir": str(directory), "status": status})
            continue
        _log.info("[%d/%d] %s · seed %d", i + 1, len(runs), run["label"], run["seed"])
        records.append(execute(run, directory, train_fn))
        if records[-1]["status"] == "stopped":
            break
    done = [(run, rec) for run, rec in zip(runs, records) if rec["status"] == "done"]
    summaries = [(run["env"], run["label"], run["seed"], json.loads((run_dir(workdir, run) / "summary.json")
                                                                     .read_text())) for run, _ in done]
    results = {"config": cfg.to_dict(), "runs": records, "settings": {r["label"]: dict(r["overrides"])
                                                                      for r in runs}}
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


def main(argv) -> None:
    from absl import flags  # noqa: PLC0415
    del argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    FLAGS = flags.FLAGS
    if not FLAGS.workdir:
        print("error: --workdir is required (the sweep directory; rerunning on it resumes)", file=sys.stderr)
        sys.exit(2)
    try:
        results = sweep(FLAGS.config, FLAGS.workdir, shard=FLAGS.shard, num_shards=FLAGS.num_shards,
                        report_only=FLAGS.report_only)
    except ComparisonError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    counts = {}
    for r in results["runs"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"{FLAGS.workdir}: runs {counts}; sweep.md written; {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/sweeps/gopo_hparams.py", "sweep config (configs/sweeps/*.py)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "sweep directory; rerun the same command to resume")
    flags.DEFINE_integer("shard", 0, "this process's share of the runs: run i when i % num_shards == shard")
    flags.DEFINE_integer("num_shards", 1, "processes splitting the runs")
    flags.DEFINE_bool("report_only", False, "only (re)write the report from finished runs")
    app.run(main)
