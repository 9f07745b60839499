"""This machine's matmul peak, measured: the denominator of the FLOP-utilisation figures (benchmarks.train_mfu).

    python -m benchmarks.peak [--size 2048] [--dtype float32] [--repeats 5]

A vendor's datasheet number is not what XLA reaches on a shared 2-core CPU or at a given precision setting, so the
peak is the best rate of one large jitted square matmul under the same defaults the model's own matmuls get (JAX's
default matmul precision: on GPUs that allows TF32 for float32 inputs, and the model runs under it too).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import flags

from gopo_jax import command_line


def default_size() -> int:
    """Large enough to be compute-bound: 2048 on CPU (~17 GFLOP, a few seconds on 2 cores), 8192 on accelerators."""
    return 2048 if jax.default_backend() == "cpu" else 8192


def matmul_peak_flops(size: int | None = None, dtype: str = "float32", repeats: int = 5) -> float:
    """Best FLOP/s of `repeats` [size, size] @ [size, size] products (2·size³ FLOPs each), compile excluded."""
    size = size or default_size()
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
    # Several products per call so that dispatch overhead on a fast device is a small share of the time.
    chained = 4

    @jax.jit
    def products(a, b):
        out = a
        for _ in range(chained):
            out = (out @ b) * jnp.asarray(1.0 / size ** 0.5, dtype)  # rescaled: values stay finite
        return out

    jax.block_until_ready(products(a, b))  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(products(a, b))
        best = min(best, time.perf_counter() - start)
    return chained * 2.0 * size ** 3 / best


def define_flags() -> None:
    flags.DEFINE_integer("size", None, "matrix size (default: by backend)")
    flags.DEFINE_string("dtype", "float32", "matmul dtype")
    flags.DEFINE_integer("repeats", 5, "timed repetitions (the best is kept)")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    peak = matmul_peak_flops(args.size, args.dtype, args.repeats)
    print(f"{jax.devices()[0].device_kind}: {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"(size {args.size or default_size()}, best of {args.repeats})")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
