"""Group statistics for GOPO's objectives (GOPO.md §3): a group is G rollouts from the same start.

- `group_normalise`: the clipped-PG expert advantage `A_i = (S_i − mean S) / (std S + ε)` (population std).
- `pairwise_preference_weights`: the weights `|S_i − S_j|` of the trajectory-level preference loss for ordered
  pairs with `S_i > S_j + margin`.
- `zero_variance`: whether a group carries no learning signal (all scores equal), a per-step diagnostic.
"""

import chex
import jax.numpy as jnp

Array = chex.Array


def zero_variance(scores: Array, *, atol: float = 1e-6) -> Array:
    """True when all scores of the group are equal up to `atol` (range ≤ atol); a group of one is zero-variance.

    An explicit test rather than `std == 0`: the float mean of equal scores need not equal them exactly, and
    `(S − mean)/ε` would turn that rounding noise into advantages of order 1e-2.
    """
    chex.assert_rank(scores, 1)
    chex.assert_type(scores, float)
    return (jnp.max(scores) - jnp.min(scores)) <= atol


def group_normalise(scores: Array, *, eps: float = 1e-6, atol: float = 1e-6) -> Array:
    """Group-normalised scores `(S_i − mean)/(std + eps)`; all zeros for a zero-variance group (see `zero_variance`)."""
    chex.assert_rank(scores, 1)
    chex.assert_type(scores, float)
    centred = scores - jnp.mean(scores)
    normalised = centred / (jnp.std(scores) + eps)
    return jnp.where(zero_variance(scores, atol=atol), jnp.zeros_like(scores), normalised)


def pairwise_preference_weights(scores: Array, *, margin: float = 0.0) -> Array:
    """`W[i, j] = |S_i − S_j|` where `S_i > S_j + margin`, else 0 (f32[G] → f32[G, G]); row i is the preferred one."""
    chex.assert_rank(scores, 1)
    chex.assert_type(scores, float)
    diff = scores[:, None] - scores[None, :]
    return jnp.where(diff > margin, jnp.abs(diff), 0.0)
