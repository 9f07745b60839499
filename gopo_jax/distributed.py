"""Joining a multi-process (`jax.distributed`) job, and leaving it with one clear line when a peer is lost.

A driver calls `maybe_initialize_distributed` first thing in `main` (experiments/train.py does), before any other
JAX use; everything after it (`gopo_jax.parallel`: the mesh over all `jax.devices()`, each process feeding its
rows) is the same code a single process runs. Nothing a run executes imports this module (tests/test_records.py),
so the records' code digest leaves it out: how a job is joined or left never changes what a run computes.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
from jax._src import distributed as jax_distributed  # the key-value client's only handle (orbax reads it here too)

from gopo_jax import peer_watch

_log = logging.getLogger(__name__)


def jax_heartbeat_timeout_s(peer_timeout_s: float) -> int:
    """JAX's own heartbeat timeout for a watch of `peer_timeout_s`: late enough that the watch always speaks first.

    JAX's heartbeat check stays as the backstop for a process whose Python threads cannot run, but when it fires it
    ends the survivor with a page of C++ stack trace instead of the watch's line. Its client beats once per half
    timeout, so its service can declare a killed peer dead as early as half its timeout after the kill (measured with
    a 20 s timeout: survivors aborted 11.0 to 20.0 s after their peer's SIGKILL); the watch has ended the survivor by
    `peer_watch.latest_exit_s` after the kill. Half the timeout is that latest exit plus a quarter of it for a loaded
    machine: 10 s -> 38 s, 300 s -> 778 s. (Twice `peer_timeout_s`, as before, raced: JAX spoke first in CI.)
    """
    return math.ceil(2 * 1.25 * peer_watch.latest_exit_s(peer_timeout_s))


def maybe_initialize_distributed(initialization_timeout: int = 300, peer_timeout_s: float = 300) -> bool:
    """Starts `jax.distributed` when the environment describes a multi-process job; returns whether it did.

    Recognised environments (checked in this order; call before any other JAX use):
      * explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID and
        optionally JAX_LOCAL_DEVICE_IDS (comma list) - works anywhere, including several processes on one CPU
        machine;
      * SLURM under `srun` (SLURM_JOB_ID, SLURM_NTASKS > 1, SLURM_PROCID, ...), Open MPI under `mpirun`
        (OMPI_MCA_orte_hnp_uri), Cloud TPU VMs / GKE (TPU_WORKER_HOSTNAMES with several hosts): JAX's own
        cluster auto-detection fills in everything.
    CPU cross-process collectives use gloo (JAX's default CPU backend has none); this setting only affects
    the CPU backend, so it is harmless on GPU/TPU hosts. A peer that never shows up makes `initialize` fail
    after `initialization_timeout` seconds instead of hanging; a peer that stops answering later (killed, its
    machine gone) makes this process exit after `peer_timeout_s` seconds with one line naming it
    (`gopo_jax.peer_watch`), even from inside a collective that never returns.
    """
    if not peer_timeout_s > 0:  # checked on one process too, so that a bad config fails before it reaches a cluster
        raise ValueError(f"bad config: distributed.peer_timeout_s must be a positive number of seconds, got "
                         f"{peer_timeout_s}")
    if jax.distributed.is_initialized():
        return True
    env = os.environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if not env.get(k)]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} is not; set all three "
                             "(JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i)")
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]))
        if kwargs["num_processes"] == 1:
            return False
    elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        pass
    elif "OMPI_MCA_orte_hnp_uri" in env:
        pass
    elif len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        pass
    else:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(initialization_timeout=initialization_timeout,
                               heartbeat_timeout_seconds=jax_heartbeat_timeout_s(peer_timeout_s), **kwargs)
    state = jax_distributed.global_state
    peer_watch.PeerWatch(lambda: state.client, state.process_id, state.num_processes, peer_timeout_s).start()
    _log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
              jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
