"""The shared command line of every experiment: `--config configs/<name>.py [--config.a.b=v ...] --workdir DIR`.

ml_collections' config flags apply the overrides to a locked ConfigDict, so a typo (`--config.train.stpes=5`)
is an error instead of a silently new key. Errors meant for people (bad config values, missing data, checkpoint
mismatches) are printed as one line and exit with status 2, without a traceback.
"""
from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from gopo_jax.dialogue.sop import SOPError
from gopo_jax.train.checkpoint import CheckpointError

FLAGS = flags.FLAGS
_PEOPLE_ERRORS = (ValueError, FileNotFoundError, SOPError, CheckpointError)


def define_flags(default_config: str) -> None:
    config_flags.DEFINE_config_file("config", default_config, "experiment config (a configs/*.py file)",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (config, metrics, checkpoints, summary); rerun to resume")


def run_main(train_fn) -> None:
    """`train_fn(config, workdir) -> summary`; prints the summary's headline and exits 0."""

    def main(argv):
        del argv
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        # orbax reports every save and restore at INFO through absl; keep the console for the progress line.
        logging.getLogger("absl").setLevel(logging.WARNING)
        if not FLAGS.workdir:
            print("error: --workdir is required (the run directory; rerunning on it resumes)", file=sys.stderr)
            sys.exit(2)
        try:
            summary = train_fn(FLAGS.config, FLAGS.workdir)
        except _PEOPLE_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        print(headline(summary))

    app.run(main)


def headline(summary: dict) -> str:
    if summary.get("stopped"):
        return f"stopped at iteration {summary['iteration']} (checkpoint saved; rerun the command to resume)"
    lines = [f"{summary['env']} · {summary['method']} · {summary['eval_episodes']} held-out episodes "
             f"· {summary['wall_seconds']:.0f} s"]
    for name in ("reference", "sft", summary["method"]):
        block = summary.get(name)
        if block:
            lines.append(f"  {name:>9}: " + "  ".join(
                f"{k} {block[k]['mean']:.3f} [{block[k]['lo']:.3f}, {block[k]['hi']:.3f}]"
                for k in ("tse", "gre", "esndcg", "alignment")))
    return "\n".join(lines)
