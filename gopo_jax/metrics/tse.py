"""TSE (Task-focused Sequential Engagement) and nTSE, GOPO.md §2.

`TSE(τ) = Σ_t S_t · g_t · w_t` with `w_t = 1/log2(t+1)`, `S_1 = 1`, `S_{t+1} = S_t · c_t`: task progress that the
customer is still engaged to see, earlier progress worth more. `tse` is rlax-style: one unbatched dialogue of padded
per-turn arrays plus a validity mask; batch with `jax.vmap`. `ntse` reduces a set of dialogues (ratio of means);
every report (run summaries, scripted-policy evaluation) computes nTSE with it.

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


def ntse(tse_values: Array, reference_tse: Array) -> Array:
    """nTSE of a set of evaluation dialogues: their mean TSE over the reference policy's mean TSE on the same
    customers (`tse_values[i]` and `reference_tse[i]` are dialogues of one customer), GOPO.md §2.

    A ratio of means, not a mean of per-dialogue ratios: a customer the reference barely serves would otherwise
    dominate the mean (TSE / ~0) or have to be dropped. NaN when the reference's mean TSE is 0 (it made no engaged
    progress to normalise by).

    Args:
      tse_values: f32[N] TSE of the policy's dialogues.
      reference_tse: f32[N] TSE of the reference policy's dialogues with the same N customers, in the same order.
    Returns:
      f32[] nTSE.
    """
    chex.assert_rank([tse_values, reference_tse], 1)
    chex.assert_equal_shape([tse_values, reference_tse])
    reference = jnp.mean(jnp.asarray(reference_tse, jnp.float32))
    defined = reference > 0
    return jnp.where(defined, jnp.mean(jnp.asarray(tse_values, jnp.float32)) / jnp.where(defined, reference, 1.0),
                     jnp.nan)
