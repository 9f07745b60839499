"""The training state threaded through every jitted train step (SFT, GOPO, baselines).

A plain pytree, so one `jax.jit` with donation carries it from step to step and orbax can save it as is.
`params` is whatever the loss differentiates: one model's `nnx.State` (from `nnx.split(model, nnx.Param, ...)`),
or a dict of them for several agents, e.g. `{"expert": ..., "cs": ...}`. `extras` holds non-differentiated
arrays the step updates itself (e.g. GOPO's Lagrange multiplier `{"mu": f32[]}`).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: optax.OptState
    step: jax.Array  # int32[]: number of step calls so far (skipped non-finite updates included)
    extras: dict[str, jax.Array]
    rng: jax.Array  # typed PRNG key; split once per step


def create_train_state(params: Any, tx: optax.GradientTransformation, extras: dict[str, Any] | None = None,
                       rng: jax.Array | None = None) -> TrainState:
    """Fresh state at step 0. `rng` defaults to `jax.random.key(0)`; `extras` values become arrays."""
    if rng is None:
        rng = jax.random.key(0)
    elif not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        raise TypeError(f"create_train_state: rng must be a typed key from jax.random.key(seed), got dtype "
                        f"{rng.dtype}; wrap a legacy uint32 key with jax.random.wrap_key_data(key)")
    extras = {k: jnp.asarray(v) for k, v in (extras or {}).items()}
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), extras=extras,
                      rng=rng)
