"""Synthetic-shop throughput: episodes/s of one jit(vmap(lax.scan)) rollout over many worlds, against a side-by-side
reference: a Python loop over the same jitted reset/step/policy functions, one world at a time.

    python -m benchmarks.bench_envs [--worlds 1024] [--loop_worlds 8] [--policy reference|random|greedy]
"""
from __future__ import annotations

import time

import jax
from absl import flags

from gopo_jax import command_line
from gopo_jax.envs import policies
from gopo_jax.envs import synthetic_shop as ss


def _time(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        jax.block_until_ready(fn())
    return (time.perf_counter() - start) / reps


def define_flags() -> None:
    flags.DEFINE_integer("worlds", 1024, "worlds in the one vmapped rollout")
    flags.DEFINE_integer("loop_worlds", 8, "worlds of the Python loop")
    flags.DEFINE_integer("reps", 3, "timed repetitions")
    flags.DEFINE_enum("policy", "reference", policies.POLICIES, "the scripted policy")


def main(argv) -> None:
    del argv
    args = flags.FLAGS

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


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
