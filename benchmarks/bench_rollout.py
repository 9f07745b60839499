"""Rollout and train-step throughput on the embedded synthetic shop.

Side by side in one run (the machine is shared and noisy, so only the ratios are meaningful):
  * the full-jit rollout (one `lax.scan` over turns) vs the Python turn loop (one jitted call per turn, what a host
    environment must do), same environment, models, batch and keys — the two produce identical trajectories;
  * the hierarchical GOPO train step (both agents, one jit) in tokens/s, next to the SFT step on the same batch.

    python -m benchmarks.bench_rollout [--batch 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs.mgshop import get_config
from gopo_jax import parallel
from gopo_jax.algorithms.sft import DemoBatch
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig, python_loop_rollout
from gopo_jax.train.build import build
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_optimizer, make_train_step


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    config = get_config()
    c = build(config, None)
    world, ge, gc, params = c.world, c.expert_gd, c.cs_gd, c.init_params(0)
    agents = ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig())
    episodes = world.episodes(jax.random.key(0), args.batch)
    key = jax.random.key(1)
    fused = world.make_rollout(agents)
    looped = python_loop_rollout(world.env, world.layout, world.vocab, agents)
    a, b = fused(params, episodes, key), looped(params, episodes, key)  # compile both
    same = all(np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    t_fused = best_of(lambda: fused(params, episodes, key).tokens, args.repeats)
    t_loop = best_of(lambda: looped(params, episodes, key).tokens, args.repeats)
    tokens = float(np.asarray(a.valid).sum())
    print(f"rollout  batch={args.batch} turns={world.layout.max_turns} identical={same}")
    print(f"  full-jit scan   {t_fused * 1e3:8.1f} ms  {args.batch / t_fused:8.1f} dialogues/s  {tokens / t_fused:9.0f} tok/s")
    print(f"  python loop     {t_loop * 1e3:8.1f} ms  {args.batch / t_loop:8.1f} dialogues/s  {tokens / t_loop:9.0f} tok/s")
    print(f"  ratio (loop / scan time) = {t_loop / t_fused:.2f}x")

    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    batch = jax.jit(c.method.prepare_batch)(a, params, params)  # GOPO's scores and reference log-probs
    tx = make_optimizer({"expert": 1e-4, "cs": 1e-4})
    gopo = make_train_step(c.method.loss, tx, mesh=mesh)
    sft = make_train_step(c.warm_start_loss, tx, mesh=mesh)
    slots = a.tokens.size * 2  # both agents read every slot of the buffer

    def timed(step, b):
        state = create_train_state(jax.tree.map(jnp.copy, params), tx, extras={"mu": jnp.float32(0)})
        state, _ = step(state, b)  # compile
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            state, m = step(state, b)
            jax.block_until_ready(m)
            best = min(best, time.perf_counter() - t)
        return best

    t_gopo = timed(gopo, batch)
    t_sft = timed(sft, DemoBatch(traj=a))
    print(f"train step  batch={args.batch} x {a.tokens.shape[1]} slots, two agents")
    print(f"  GOPO hierarchical step {t_gopo * 1e3:8.1f} ms  {slots / t_gopo:9.0f} slot-tok/s")
    print(f"  SFT warm-start step    {t_sft * 1e3:8.1f} ms  {slots / t_sft:9.0f} slot-tok/s")
    print(f"  ratio (GOPO / SFT time) = {t_gopo / t_sft:.2f}x")


if __name__ == "__main__":
    main()
