"""One process of the 2-process run that tests/test_peer_death.py kills a peer of: SFT steps without end.

    python tests/peer_death_worker.py PROCESS_ID NUM_PROCESSES PORT PEER_TIMEOUT_S

Joins the job as tests/multihost_worker.py does (same environment, same SFT step on the tiny Qwen3), with the peer
watch's timeout set to PEER_TIMEOUT_S, then steps until it is killed or the watch ends it; it prints "step N" (and
names the step to the watch) before each step, so the parent knows when the run is in its steady state.
"""
from __future__ import annotations

import itertools
import os
import sys

import multihost_worker


def endless_batches(process_id: int, num_processes: int):
    from gopo_jax import peer_watch

    rows = multihost_worker.BATCH // num_processes
    batches = multihost_worker.make_batches()
    for step in itertools.count():
        peer_watch.doing(f"SFT step {step}")
        print(f"step {step}", flush=True)
        yield {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batches[step % len(batches)].items()}


def main(process_id: int, num_processes: int, port: int, peer_timeout_s: float) -> None:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                      JAX_PROCESS_ID=str(process_id))
    import jax

    from gopo_jax import distributed

    assert distributed.maybe_initialize_distributed(initialization_timeout=60, peer_timeout_s=peer_timeout_s)
    # run_sft fetches each step's loss before it asks for the next batch, so "step N" follows step N-1's end.
    multihost_worker.run_sft(jax.devices(), endless_batches(process_id, num_processes))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
