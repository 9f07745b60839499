"""One process of the 2-process SFT run launched by tests/test_multihost.py (also importable for its helpers).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.npz

The parent sets XLA_FLAGS (fake CPU devices per process) and JAX_PLATFORMS=cpu in the environment. The process
joins the job through `gopo_jax.distributed.maybe_initialize_distributed` (the JAX_* variables, gloo collectives),
feeds only its own rows of each batch, and process 0 writes the losses and the gathered final parameters.
"""
from __future__ import annotations

import os
import sys

import numpy as np

MESH = {"data": 2, "fsdp": 2}
BATCH, LENGTH, STEPS = 8, 16, 3


def make_batches(vocab: int = 512, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(STEPS):
        valid = rs.rand(BATCH, LENGTH) > 0.2
        out.append(dict(tokens=rs.randint(0, vocab, (BATCH, LENGTH)).astype(np.int32), valid=valid,
                        loss_mask=valid & (rs.rand(BATCH, LENGTH) > 0.3)))
    return out


def run_sft(devices, batches) -> tuple[np.ndarray, list[np.ndarray]]:
    """Losses per step and final parameters (as host arrays) of SGD SFT steps of the tiny Qwen3 on `devices`.

    `batches` are this process's rows (all rows when single-process).
    """
    import jax
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils

    from gopo_jax import parallel
    from gopo_jax.algorithms.sft import make_sft_loss_fn
    from gopo_jax.models import qwen3
    from gopo_jax.train.state import create_train_state
    from gopo_jax.train.step import make_train_step

    graphdef, params = nnx.split(qwen3.Qwen3(qwen3.get_config("tiny"), rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.sgd(0.5, momentum=0.9)
    mesh = parallel.make_mesh(MESH, devices=devices)
    state = parallel.shard_params(create_train_state(params, tx), mesh)
    step = make_train_step(make_sft_loss_fn(graphdef), tx, mesh=mesh,
                           state_shardings=parallel.param_shardings(state, mesh))
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    leaves = jax.tree.leaves(state.params)
    if jax.process_count() > 1:
        leaves = multihost_utils.process_allgather(leaves, tiled=True)
    return np.array(losses), [np.asarray(x) for x in leaves]


def main(process_id: int, num_processes: int, port: int, out_path: str) -> None:
    os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                      JAX_PROCESS_ID=str(process_id))
    import jax

    from gopo_jax import distributed

    assert distributed.maybe_initialize_distributed(initialization_timeout=60)
    assert jax.process_count() == num_processes, jax.process_count()
    rows = BATCH // num_processes
    local = [{k: v[process_id * rows:(process_id + 1) * rows] for k, v in b.items()} for b in make_batches()]
    losses, params = run_sft(jax.devices(), local)
    if process_id == 0:
        np.savez(out_path, losses=losses, num_devices=jax.device_count(), **{f"p{i}": p for i, p in enumerate(params)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
