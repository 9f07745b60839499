"""Tokens/s of the SFT train step (gopo_jax.train.step + algorithms.sft) against side-by-side references.

    python -m benchmarks.bench_sft [--configs tiny small] [--batch 8] [--length 128] [--steps 8]

Three versions of the same AdamW SFT update on the same batch, random weights:
  * ours:          `make_train_step` (one jax.jit over split NNX state, state donated, sharded on the mesh)
  * ours, no donation
  * nnx.jit:       the idiomatic Flax NNX step (`nnx.Optimizer` + `nnx.value_and_grad` under `nnx.jit`), which
                   re-walks the module graph in Python on every call
tokens/s counts valid tokens (batch * length here) per second, forward + backward + update. Time per step
is the best of `--steps` steps after one compile step, the variants taking turns step by step. All visible
devices form the mesh (data axis); prefix XLA_FLAGS=--xla_force_host_platform_device_count=N to try N fake
CPU devices.
"""
import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gopo_jax import parallel
from gopo_jax.algorithms.sft import make_sft_loss_fn, sft_loss
from gopo_jax.models import qwen3
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_train_step


def _interleaved_best_seconds(runs, steps):
    """Best step time of each variant; variants take turns each round so that load from other processes on a
    shared machine hits all of them alike (the best time is the least disturbed one)."""
    for run_one in runs.values():
        jax.block_until_ready(run_one())  # compile
    times = {label: [] for label in runs}
    for _ in range(steps):
        for label, run_one in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run_one())
            times[label].append(time.perf_counter() - start)
    return {label: min(t) for label, t in times.items()}


def bench(name, batch_size, length, steps):
    cfg = qwen3.get_config(name)
    rs = np.random.RandomState(0)
    batch = dict(tokens=rs.randint(0, cfg.vocab_size, (batch_size, length)).astype(np.int32),
                 valid=np.ones((batch_size, length), bool), loss_mask=rs.rand(batch_size, length) > 0.5)
    tx = optax.adamw(1e-3)
    mesh = parallel.make_mesh({"data": -1})
    placed_batch = parallel.shard_batch(batch, mesh)
    runs = {}

    for label, donate in (("ours", True), ("ours, no donation", False)):
        graphdef, params = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        holder = {"state": parallel.shard_params(create_train_state(params, tx), mesh)}
        step = make_train_step(make_sft_loss_fn(graphdef), tx, mesh=mesh,
                               state_shardings=parallel.param_shardings(holder["state"], mesh), donate=donate)

        def run_ours(step=step, holder=holder):
            holder["state"], metrics = step(holder["state"], placed_batch)
            return metrics["loss"]

        runs[label] = run_ours

    model = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ref_batch = {k: jnp.asarray(v) for k, v in batch.items()}

    @nnx.jit
    def nnx_step(model, optimizer, batch):
        def loss_of(model):
            graphdef, params = nnx.split(model)
            return sft_loss(graphdef, params, batch)

        (loss, _), grads = nnx.value_and_grad(loss_of, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss

    runs["nnx.jit + nnx.Optimizer"] = lambda: nnx_step(model, optimizer, ref_batch)
    results = _interleaved_best_seconds(runs, steps)

    tokens = batch_size * length
    base = results["ours"]
    print(f"\n{name}: {qwen3.count_params(model) / 1e6:.2f}M params, batch {batch_size} x {length} tokens, "
          f"{jax.device_count()} device(s) [{jax.devices()[0].platform}]")
    for label, seconds in results.items():
        print(f"  {label:26s} {seconds * 1e3:9.1f} ms/step {tokens / seconds:12.0f} tokens/s   "
              f"ours is {seconds / base:5.2f}x faster")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} device(s), python {sys.version.split()[0]}")
    for name in args.configs:
        bench(name, args.batch, args.length, args.steps)


if __name__ == "__main__":
    main()
