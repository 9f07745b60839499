"""TSE (Task-focused Sequential Engagement) and nTSE, GOPO.md §2.

`TSE(τ) = Σ_t S_t · g_t · w_t` with `w_t = 1/log2(t+1)`, `S_1 = 1`, `S_{t+1} = S_t · c_t`: task progress that the
customer is still engaged to see, earlier progress worth more. Functions are rlax-style: one unbatched dialogue of
padded per-turn arrays plus a validity mask; batch with `jax.vmap`.

Conventions (also in docs/metrics.md):
- The turn index `t` of a valid turn is its rank among the valid turns (1, 2, ...), so a mask that is not a
  prefix (left padding, holes) gives the same value as the compacted dialogue. Masked turns contribute no gain and
  do not reduce survival (their `c` is treated as 1).
- `c_t` is the probability of staying engaged *after* turn t: `c_t = 0` still counts the gain of turn t and zeroes
  every later turn.
- An all-masked dialogue has TSE 0.
"""

import chex
import jax.numpy as jnp

Array = chex.Array


def turn_discount(mask: Array) -> Array:
    """`w_t = 1/log2(t+1)` at each valid turn, with t the valid-turn rank; 0 at masked turns."""
    chex.assert_rank(mask, 1)
    rank = jnp.cumsum(mask.astype(jnp.int32))
    w = 1.0 / jnp.log2(rank.astype(jnp.float32) + 1.0)
    return jnp.where(mask, w, 0.0)


def survival(cont: Array, mask: Array) -> Array:
    """`S_t = Π_{s<t} c_s` over valid turns s (exclusive cumulative product); masked turns keep S unchanged."""
    chex.assert_rank([cont, mask], 1)
    chex.assert_equal_shape([cont, mask])
    c = jnp.where(mask, cont.astype(jnp.float32), 1.0)
    inclusive = jnp.cumprod(c)
    return jnp.concatenate([jnp.ones((1,), jnp.float32), inclusive[:-1]])


def tse(gain: Array, cont: Array, mask: Array) -> Array:
    """TSE of one dialogue.

    Args:
      gain: f32[T] task-progress increments `g_t ∈ [0,1]` (Σ g ≤ 1 keeps TSE in [0,1]).
      cont: f32[T] engagement probabilities `c_t ∈ [0,1]` after each turn.
      mask: bool[T] valid turns.
    Returns:
      f32[] TSE.
    """
    chex.assert_rank([gain, cont, mask], 1)
    chex.assert_equal_shape([gain, cont, mask])
    chex.assert_type([gain, cont, mask], [float, float, bool])
    s = survival(cont, mask)
    w = turn_discount(mask)
    return jnp.sum(jnp.where(mask, s * gain * w, 0.0))


def ntse(
    gain: Array,
    cont: Array,
    mask: Array,
    ref_gain: Array,
    ref_cont: Array,
    ref_mask: Array,
    *,
    zero_ref_value: float = float("nan"),
) -> Array:
    """nTSE = TSE(τ) / TSE(reference τ) for the same customer goal.

    The reference arrays may have a different padded length. When the reference TSE is 0 the ratio is undefined
    (the reference policy made no engaged progress); the result is then `zero_ref_value`, NaN by default so that a
    `nanmean` over episodes leaves such goals out instead of silently counting them as 0 or infinity.
    """
    ref = tse(ref_gain, ref_cont, ref_mask)
    value = tse(gain, cont, mask)
    safe_ref = jnp.where(ref > 0, ref, 1.0)
    return jnp.where(ref > 0, value / safe_ref, jnp.float32(zero_ref_value))
