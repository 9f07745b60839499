"""P1: the whole-dialogue rollout as one jitted scan against the host-world turn loop, and one method iteration as
one jit against a rollout whose trajectory goes through the host before the update.

Side by side in one run, on the embedded synthetic shop (the machine is shared and noisy: only ratios count):
  * rollout: `dialogue.rollout.make_rollout` (every turn inside one `lax.scan`, one call) against
    `dialogue.rollout.python_loop_rollout` with the turn's action copied to the host and back every turn, which is
    what a host world does (one jitted call per turn, the env step on the host); same models, batch and keys, and
    the two trajectories are checked identical. Grid: model presets x batch sizes x turns (`env.max_turns`).
  * iteration: `Phases.iteration` (rollout -> reference pass -> epochs x minibatches, one jitted call) against the
    rollout jit -> trajectory copied to the host -> the update jit, on the grid's first configuration.
Compile time (first call minus a steady call) is reported apart from the steady-state time (best of `--repeats`
rounds over both sides in turn).

    python -m benchmarks.rollout_scan [--quick] [--presets tiny,small] [--batches 64,256] [--turns 8,12]

Ends with `RESULT rollout_scan ratio=<min over the grid of loop time / scan time> goal=5`.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs.mgshop import get_config
from gopo_jax import command_line, parallel
from gopo_jax.dialogue.rollout import SamplingConfig, python_loop_rollout
from gopo_jax.models import qwen3
from gopo_jax.train.build import build
from gopo_jax.train.phases import Phases


@dataclasses.dataclass(frozen=True)
class HostRoundTripAgents:
    """`agents` whose every turn's action is copied to the host and back (`jax.pure_callback`): the device-host
    round trip a host world makes between the agents' turn and the environment's step."""

    agents: Any

    def init(self, params, context, context_valid):
        return self.agents.init(params, context, context_valid)

    def act(self, params, carry, inp, key):
        carry, action = self.agents.act(params, carry, inp, key)
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), action)
        return carry, jax.pure_callback(lambda a: jax.tree.map(np.asarray, jax.device_get(a)), shapes, action)


def make_config(preset: str, batch: int, turns: int):
    """The default run config with both agents of model preset `preset`, `turns` turns, `batch` = groups x 4."""
    m, config = qwen3.get_config(preset), get_config()
    with config.unlocked():
        config.model.preset = preset
        config.model.hidden_size, config.model.num_layers = m.hidden_size, m.num_layers
        config.model.intermediate_size = m.intermediate_size
        config.env.max_turns = turns
        config.train.group_size = 4
        config.train.groups = batch // 4
        config.train.minibatches = 2 if batch >= 16 else 1
    return config


def first_and_best(fns: list, repeats: int) -> tuple[list[float], list[float], list]:
    """Per function: (seconds of its first call, best of `repeats` later calls, its last result). The later calls
    go in rounds over all functions, so that a burst of load on the shared machine hits every side alike."""
    first, out = [], []
    for fn in fns:
        t = time.perf_counter()
        out.append(jax.block_until_ready(fn()))
        first.append(time.perf_counter() - t)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            out[i] = jax.block_until_ready(fn())
            best[i] = min(best[i], time.perf_counter() - t)
    return first, best, out


def rollout_row(preset: str, batch: int, turns: int, repeats: int) -> dict:
    c = build(make_config(preset, batch, turns), None)
    world, params = c.world, c.init_params(0)
    agents = c.method.make_agents(SamplingConfig())
    episodes, key = world.episodes(jax.random.key(0), batch), jax.random.key(1)
    scan = world.make_rollout(agents)
    loop = python_loop_rollout(world.env, world.layout, world.vocab, HostRoundTripAgents(agents))
    (scan_first, loop_first), (scan_best, loop_best), (a, b) = first_and_best(
        [lambda: scan(params, episodes, key), lambda: loop(params, episodes, key)], repeats)
    identical = (np.array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
                 and all(np.allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), atol=1e-5)
                         for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    return {"preset": preset, "batch": batch, "turns": turns, "identical": identical,
            "scan_compile": scan_first - scan_best, "scan": scan_best, "loop_compile": loop_first - loop_best,
            "loop": loop_best, "tokens": int(np.asarray(a.valid).sum())}


def iteration_row(preset: str, batch: int, turns: int, repeats: int) -> dict:
    c = build(make_config(preset, batch, turns), None)
    p = Phases(c, mesh=c.mesh)
    params = c.init_params(0)
    state = parallel.shard_params(p.method_state(params, c.method.init_extras(), 0), c.mesh)
    ref = parallel.shard_params(jax.tree.map(jnp.copy, params), c.mesh)
    one_jit = jax.jit(p.iteration)  # no donation: every call starts from the same state
    rollout, update = jax.jit(p.rollout), jax.jit(p.update)

    def via_host():
        traj = jax.device_get(rollout(state, ref, 0, 0))  # what a host round trip of the trajectory costs
        return update(state, ref, traj, 0, 0)

    (one_first, host_first), (one_best, host_best), _ = first_and_best([lambda: one_jit(state, ref, 0, 0), via_host],
                                                                       repeats)
    return {"preset": preset, "batch": batch, "turns": turns, "one_compile": one_first - one_best, "one": one_best,
            "host_compile": host_first - host_best, "host": host_best}


def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "tiny model, batch 16, 4 turns, 2 repeats")
    flags.DEFINE_string("presets", "tiny,small", "model presets, comma-separated")
    flags.DEFINE_string("batches", "64,256", "dialogue batch sizes, comma-separated")
    flags.DEFINE_string("turns", "8,12", "agent turns per dialogue, comma-separated")
    flags.DEFINE_integer("repeats", 3, "timed repetitions")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    if args.quick:
        presets, batches, turns, repeats = ["tiny"], [16], [4], 2
    else:
        presets, repeats = args.presets.split(","), args.repeats
        batches, turns = [int(b) for b in args.batches.split(",")], [int(t) for t in args.turns.split(",")]

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
    print("rollout: one jitted scan vs a per-turn jitted call + host round trip of the turn (ms; compile = first "
          "call - steady)")
    print(f"{'preset':>6} {'batch':>5} {'turns':>5} {'tokens':>7} {'scan':>9} {'loop':>9} {'ratio':>6} "
          f"{'scan cmp':>9} {'loop cmp':>9} identical")
    rows = []
    for preset in presets:
        for batch in batches:
            for t in turns:
                r = rollout_row(preset, batch, t, repeats)
                rows.append(r)
                print(f"{preset:>6} {batch:>5} {t:>5} {r['tokens']:>7} {r['scan'] * 1e3:>9.1f} "
                      f"{r['loop'] * 1e3:>9.1f} {r['loop'] / r['scan']:>6.2f} {r['scan_compile'] * 1e3:>9.0f} "
                      f"{r['loop_compile'] * 1e3:>9.0f} {r['identical']}", flush=True)
    if not all(r["identical"] for r in rows):
        raise SystemExit("the scan and the loop rolled out different trajectories: the comparison is void")

    it = iteration_row(presets[0], batches[0], turns[0], repeats)
    print(f"\niteration ({it['preset']}, batch {it['batch']}, {it['turns']} turns): one jit vs rollout jit -> "
          "trajectory to the host -> update jit (ms)")
    print(f"  one jit          {it['one'] * 1e3:9.1f}   compile {it['one_compile'] * 1e3:8.0f}")
    print(f"  via the host     {it['host'] * 1e3:9.1f}   compile {it['host_compile'] * 1e3:8.0f}")
    print(f"  ratio (via host / one jit) = {it['host'] / it['one']:.2f}x")
    ratio = min(r["loop"] / r["scan"] for r in rows)
    print(f"RESULT rollout_scan ratio={ratio:.2f} goal=5")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
