"""Throughput of the vmapped pure metrics (TSE, ESNDCG closed form, R_B) over 10^5 dialogues, next to a side-by-side
reference: one forward pass of the tiny Qwen3 on a small batch (a lower bound on any train step's cost).

Run: `python -m benchmarks.bench_metrics [--dialogues 100000] [--turns 20]`. Prints one JSON line per function.
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from gopo_jax import command_line
from gopo_jax.metrics import business_reward, esndcg, tse


def _time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - start) / repeats


def define_flags() -> None:
    flags.DEFINE_integer("dialogues", 100_000, "dialogues per metric call")
    flags.DEFINE_integer("turns", 20, "turns per dialogue")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    n, t = args.dialogues, args.turns
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    gain = jax.random.dirichlet(k1, jnp.ones(t), (n,)).astype(jnp.float32)
    cont = jax.random.uniform(k2, (n, t), minval=0.7, maxval=1.0)
    rel = jax.random.randint(k3, (n, t), 0, 4).astype(jnp.float32)
    lengths = jax.random.randint(k4, (n,), 1, t + 1)
    mask = jnp.arange(t)[None, :] < lengths[:, None]
    scalars = jnp.ones((n,), jnp.float32)

    from gopo_jax.models.qwen3 import Qwen3, get_config

    model = Qwen3(get_config("tiny"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((8, 256), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), (8, 256))

    @jax.jit
    def forward(state, tokens, positions):
        return nnx.merge(graphdef, state)(tokens, positions, jnp.ones(tokens.shape, bool))[0]

    reference = _time(forward, state, tokens, positions)
    print(json.dumps(dict(name="reference: tiny Qwen3 forward, batch 8 x 256 tokens", seconds=reference)))
    cases = {
        "tse": (jax.jit(jax.vmap(tse)), (gain, cont, mask)),
        "esndcg": (jax.jit(jax.vmap(functools.partial(esndcg, p=0.8, max_rel=3.0))), (rel, mask)),
        "business_reward": (
            jax.jit(jax.vmap(functools.partial(business_reward, t_max=t))),
            (scalars, scalars, scalars, scalars[:, None] * jnp.ones((n, t)), mask),
        ),
    }
    for name, (fn, fn_args) in cases.items():
        seconds = _time(fn, *fn_args)
        print(
            json.dumps(
                dict(
                    name=name,
                    dialogues=n,
                    turns=t,
                    seconds=seconds,
                    dialogues_per_s=n / seconds,
                    ratio_to_reference=seconds / reference,
                    device=str(jax.devices()[0]),
                )
            )
        )


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
