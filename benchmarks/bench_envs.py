"""Synthetic-shop throughput: episodes/s of one jit(vmap(lax.scan)) rollout over many worlds, against a side-by-side
reference: a Python loop over the same jitted reset/step/policy functions, one world at a time.

    python -m benchmarks.bench_envs [--worlds 1024] [--loop-worlds 8] [--policy reference|random|greedy]
"""
from __future__ import annotations

import argparse
import time

import jax

from gopo_jax.envs import policies
from gopo_jax.envs import synthetic_shop as ss


def _time(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", type=int, default=1024)
    parser.add_argument("--loop-worlds", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--policy", default="reference", choices=policies.POLICIES)
    args = parser.parse_args()

    env = ss.make_env()
    policy = policies.jax_policy(env, args.policy)
    keys = jax.random.split(jax.random.PRNGKey(0), args.worlds)
    start = time.perf_counter()
    jax.block_until_ready(policies.rollout_scripted(env, keys, policy))
    compile_s = time.perf_counter() - start
    vmapped = _time(lambda: policies.rollout_scripted(env, keys, policy), args.reps)
    vmapped_eps = args.worlds / vmapped

    reset, step, act = jax.jit(env.reset), jax.jit(env.step), jax.jit(policy)

    def loop():
        last = None
        for key in keys[:args.loop_worlds]:
            k_reset, k_policy = jax.random.split(key)
            state, _, _, obs = reset(k_reset)
            for k in jax.random.split(k_policy, env.spec.max_turns):
                if bool(obs.done):  # the host loop stops early; the scan always runs T_max turns
                    break
                strategy, reply, valid = act(state, obs, k)
                state, obs, last = step(state, strategy, reply, valid)
        return last.gain

    loop()  # compile
    looped = _time(loop, args.reps)
    looped_eps = args.loop_worlds / looped

    print(f"synthetic shop, policy={args.policy}, T_max={env.spec.max_turns}, backend={jax.default_backend()}, "
          f"devices={jax.device_count()}")
    print(f"  jit(vmap(scan)) over {args.worlds} worlds: {vmapped_eps:,.0f} episodes/s "
          f"({vmapped * 1e3:.1f} ms per batch; first call incl. compile {compile_s:.1f} s)")
    print(f"  Python loop of jitted step, {args.loop_worlds} worlds: {looped_eps:,.1f} episodes/s")
    print(f"  ratio: {vmapped_eps / looped_eps:,.0f}x")


if __name__ == "__main__":
    main()
