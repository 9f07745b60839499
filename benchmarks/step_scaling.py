"""P4: GOPO train step time against the tokens it trains on — linear, with no quadratic blow-up.

For each number of turns (`env.max_turns`, up to 12) the run's components are built, the agents roll out a real
GOPO batch (`Phases.rollout`) and the method prepares it (`Phases.prepare`: scores, reference log-probs); the first
`batch` rows of it (whole groups) are then trained on by the method's jitted step (`Phases.train_step`, both agents,
one update), timed as the best of `--repeats` steady calls (rounds over all points in turn). Tokens = batch x buffer slots (the slots grow linearly
with the turns). A line time = a + b·tokens is fitted (R² printed), and a quadratic, whose relative curvature
c·x_max² / time(x_max) says what share of the largest step a quadratic term would explain.

    python -m benchmarks.step_scaling [--quick] [--turns 2,4,8,12] [--batches 16,32,64] [--repeats 3]

Ends with `RESULT step_scaling ratio=<R² of the line> goal=0.98`.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from configs.mgshop import get_config
from gopo_jax import command_line, parallel
from gopo_jax.train.build import build
from gopo_jax.train.phases import Phases


def make_config(turns: int, max_batch: int):
    config = get_config()
    with config.unlocked():
        config.env.max_turns = turns
        config.train.group_size = 4
        config.train.groups = max_batch // 4
        config.train.minibatches, config.train.epochs = 1, 1
    return config


def prepare_points(turns: int, batches: list[int]) -> list[tuple[dict, object]]:
    """(row, compiled step call) for each batch size at `turns` turns; each call is run once (compiled)."""
    c = build(make_config(turns, max(batches)), None)
    p = Phases(c, mesh=c.mesh)
    params = c.init_params(0)
    state = parallel.shard_params(p.method_state(params, c.method.init_extras(), 0), c.mesh)
    ref = parallel.shard_params(jax.tree.map(jnp.copy, params), c.mesh)
    batch = jax.jit(p.prepare)(jax.jit(p.rollout)(state, ref, 0, 0), ref, state.params)
    step = jax.jit(p.train_step())  # no donation: every call starts from the same state
    points = []
    for b in batches:
        minibatch = jax.tree.map(lambda x, rows=b: x[:rows], batch)  # the first b / 4 groups

        def call(minibatch=minibatch):
            return step(state, minibatch)

        jax.block_until_ready(call())
        points.append(({"turns": turns, "batch": b, "slots": c.world.layout.length,
                        "tokens": b * c.world.layout.length}, call))
    return points


def time_interleaved(calls: list, repeats: int) -> list[float]:
    """Best of `repeats` rounds over all calls in turn, so that a burst of load on the shared machine hits every
    point alike rather than a few."""
    best = [float("inf")] * len(calls)
    for _ in range(repeats):
        for i, call in enumerate(calls):
            t = time.perf_counter()
            jax.block_until_ready(call())
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def fits(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, np.ndarray, float]:
    """(line coefficients [b, a], its R², quadratic coefficients [c, b, a], relative curvature at max x)."""
    line = np.polyfit(x, y, 1)
    r2 = 1.0 - np.sum((y - np.polyval(line, x)) ** 2) / np.sum((y - y.mean()) ** 2)
    quad = np.polyfit(x, y, 2)
    x_max = x.max()
    return line, float(r2), quad, float(quad[0] * x_max ** 2 / np.polyval(quad, x_max))


def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "turns 2,4; batches 8,16; 3 repeats")
    flags.DEFINE_string("turns", "2,4,8,12", "agent turns per dialogue, comma-separated")
    flags.DEFINE_string("batches", "16,32,64", "dialogue batch sizes, comma-separated (multiples of 4)")
    flags.DEFINE_integer("repeats", 3, "timed repetitions")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    if args.quick:
        turns, batches, repeats = [2, 4], [8, 16], 3
    else:
        turns, repeats = [int(t) for t in args.turns.split(",")], args.repeats
        batches = sorted(int(b) for b in args.batches.split(","))
    if any(b % 4 for b in batches):
        command_line.fail(f"--batches {batches}: each must be a multiple of the group size 4")

    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; GOPO step (both agents, one update)")
    print(f"{'turns':>5} {'batch':>5} {'slots':>5} {'tokens':>7} {'step ms':>9} {'us/token':>9}")
    points = [point for t in turns for point in prepare_points(t, batches)]
    rows = [row | {"time": t} for (row, _), t in zip(points, time_interleaved([call for _, call in points], repeats))]
    for r in rows:
        print(f"{r['turns']:>5} {r['batch']:>5} {r['slots']:>5} {r['tokens']:>7} {r['time'] * 1e3:>9.1f} "
              f"{r['time'] / r['tokens'] * 1e6:>9.2f}")
    x = np.array([r["tokens"] for r in rows], np.float64)
    y = np.array([r["time"] for r in rows], np.float64)
    line, r2, quad, curvature = fits(x, y)
    print(f"line:      time = {line[1] * 1e3:.2f} ms + {line[0] * 1e6:.3f} us x tokens   R^2 = {r2:.4f}")
    print(f"quadratic: c = {quad[0]:.3e} s/token^2; relative curvature at {int(x.max())} tokens = {curvature:+.3f} "
          "(share of the largest step a quadratic term explains; ~0 = no blow-up)")
    print(f"RESULT step_scaling ratio={r2:.4f} goal=0.98")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
