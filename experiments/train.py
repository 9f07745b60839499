"""Train (or evaluate) one run: a run config, its overrides and a run directory.

    gopo-train --workdir runs/mgshop                                  # configs/mgshop.py: the embedded shop
    gopo-train --config configs/multiwoz.py --workdir runs/multiwoz   # another world (relative to this directory)
    gopo-train --workdir runs/mgshop --config.train.steps=100 --config.gopo.expert_loss=clipped_pg

`--config` defaults to the installed configs/mgshop.py; ml_collections' config flags apply the overrides to the
locked config, so a typo (`--config.train.stpes=5`) is an error instead of a silently new key. The run directory
receives the resolved config, metrics.jsonl, TensorBoard events, checkpoints, the tokenizer, summary.json and
plots; rerunning the same command on it resumes from the newest checkpoint. `python -m experiments.mgshop`,
`experiments.multiwoz` and `experiments.tmallbrand` are this command with their world's config as the default.
"""
from __future__ import annotations

import functools

from absl import flags
from ml_collections import config_flags

import configs
from gopo_jax import command_line
from gopo_jax.inspect_run import headline

FLAGS = flags.FLAGS


def define_flags(default_config: str = "mgshop.py") -> None:
    """`default_config`: the installed configs/ file `--config` defaults to."""
    config_flags.DEFINE_config_file("config", configs.config_path(default_config),
                                    "run config (a configs/*.py file); override its keys with --config.KEY=VALUE",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "run directory (config, metrics, checkpoints, summary); rerun to resume")


def main(argv) -> None:
    del argv
    from gopo_jax.dialogue.sop import SOPError  # noqa: PLC0415  (JAX: after the flags, so --help stays quick)
    from gopo_jax import distributed  # noqa: PLC0415
    from gopo_jax.launch import train  # noqa: PLC0415
    from gopo_jax.train.checkpoint import CheckpointError  # noqa: PLC0415

    command_line.quiet_logging()
    if not FLAGS.workdir:
        command_line.fail("--workdir is required (the run directory; rerunning on it resumes)")
    try:
        # A multi-process job (JAX_COORDINATOR_ADDRESS/..., SLURM, MPI, TPU pods) joins here, before any JAX use;
        # a peer that stops answering for distributed.peer_timeout_s then ends this process with one line.
        distributed.maybe_initialize_distributed(peer_timeout_s=FLAGS.config.distributed.peer_timeout_s)
        summary = train(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, SOPError, CheckpointError) as e:
        command_line.fail(str(e))
    print(headline(summary))


def cli(default_config: str = "mgshop.py") -> None:
    command_line.run(functools.partial(define_flags, default_config), main)


if __name__ == "__main__":
    cli()
