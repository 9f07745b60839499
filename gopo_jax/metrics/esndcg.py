"""ESNDCG, the Expert Agent's reward: expected session NDCG with one ranked item (the chosen strategy) per turn.

GOPO.md §2, after Kanoulas et al. (2011). A patience model stops the session after turn L with
`P(L) = p^{L-1}(1-p)` for `L < T` and `P(T) = p^{T-1}`;
`DCG_L = Σ_{t≤L} (2^{rel_t} − 1) w_t`, `IDCG_L = Σ_{t≤L} (2^R − 1) w_t`, `w_t = 1/log2(t+1)`,
`ESNDCG = Σ_L P(L) · DCG_L / IDCG_L`.

Conventions (also in docs/metrics.md):
- `T` in the patience model is the number of valid turns, `mask.sum()`, not the padded length: padding must not
  move probability mass onto turns that never happened. The turn index t is the rank among valid turns.
- An all-masked dialogue has ESNDCG 0. `max_rel` (R) must be > 0; relevances above R give values above 1.
- `p` may be a traced scalar in the closed form (0 ≤ p ≤ 1; `0**0 = 1` so p=0 gives NDCG@1 and p=1 NDCG@T).

Three functions: the O(T) closed form (`esndcg`), a Monte-Carlo estimator that samples stopping points turn by
turn from the patience model (`esndcg_monte_carlo`, for validating the closed form), and the ranked-list variant
(`esndcg_ranked`) where the EA outputs a top-m list per turn scanned with continuation probability `p_down`.
"""

import chex
import jax
import jax.numpy as jnp

from gopo_jax.metrics.tse import turn_discount

Array = chex.Array


def _check_max_rel(max_rel: float) -> None:
    if not max_rel > 0:
        raise ValueError(f"esndcg: max_rel must be > 0 (the top relevance grade R), got {max_rel!r}")


def _per_turn_ndcg(gain: Array, ideal_gain: Array, mask: Array) -> Array:
    """`DCG_L / IDCG_L` at every valid turn, L being that turn's valid rank; 0 at masked turns."""
    w = turn_discount(mask)
    dcg = jnp.cumsum(jnp.where(mask, gain * w, 0.0))
    idcg = jnp.cumsum(jnp.where(mask, ideal_gain * w, 0.0))
    # IDCG is 0 only before the first non-empty ranked list (esndcg_ranked with empty lists); score such turns 0.
    defined = mask & (idcg > 0)
    return jnp.where(defined, dcg / jnp.where(defined, idcg, 1.0), 0.0)


def _stop_probabilities(mask: Array, p: Array) -> Array:
    """`P(L)` of the truncated-geometric patience model at each valid turn (L = its valid rank)."""
    num_valid = jnp.sum(mask.astype(jnp.int32))
    rank = jnp.cumsum(mask.astype(jnp.int32))
    reach = jnp.power(p, (rank - 1).astype(jnp.float32))  # P(L ≥ rank)
    prob = jnp.where(rank == num_valid, reach, reach * (1.0 - p))
    return jnp.where(mask, prob, 0.0)


def esndcg(rel: Array, mask: Array, *, p: float = 0.8, max_rel: float) -> Array:
    """Closed-form ESNDCG of one dialogue, O(T) with cumulative sums.

    Args:
      rel: f32[T] graded relevance of the chosen strategy per turn, in [0, max_rel] (0 for an SOP violation).
      mask: bool[T] valid turns.
      p: patience (probability of continuing after a turn).
      max_rel: top relevance grade R.
    Returns:
      f32[] ESNDCG in [0, 1].
    """
    chex.assert_rank([rel, mask], 1)
    chex.assert_equal_shape([rel, mask])
    chex.assert_type([rel, mask], [float, bool])
    _check_max_rel(max_rel)
    p = jnp.asarray(p, jnp.float32)
    gain = jnp.exp2(rel.astype(jnp.float32)) - 1.0
    ideal = jnp.full_like(gain, 2.0**max_rel - 1.0)
    return jnp.sum(_stop_probabilities(mask, p) * _per_turn_ndcg(gain, ideal, mask))


def esndcg_monte_carlo(
    key: chex.PRNGKey, rel: Array, mask: Array, *, p: float = 0.8, max_rel: float, num_samples: int
) -> Array:
    """Monte-Carlo ESNDCG: sample `num_samples` sessions from the patience model and average `DCG_L / IDCG_L`.

    Each sampled user reads turn 1, then continues after each turn with probability p (a Bernoulli per turn), and
    stops at the last valid turn at the latest: this is the generative story of `P(L)`, not a transcription of the
    closed form, so agreement checks the closed form. Memory is O(num_samples · T).
    """
    chex.assert_rank([rel, mask], 1)
    chex.assert_equal_shape([rel, mask])
    chex.assert_type([rel, mask], [float, bool])
    _check_max_rel(max_rel)
    num_turns = rel.shape[0]
    num_valid = jnp.sum(mask.astype(jnp.int32))
    gain = jnp.exp2(rel.astype(jnp.float32)) - 1.0
    ndcg = _per_turn_ndcg(gain, jnp.full_like(gain, 2.0**max_rel - 1.0), mask)
    # Valid turns first, in their original order, so index L-1 is the turn with valid rank L.
    order = jnp.argsort(jnp.logical_not(mask), stable=True)
    ndcg_by_rank = ndcg[order]
    continues = jax.random.bernoulli(key, p, (num_samples, num_turns))
    # L = 1 + number of leading "continue" draws, capped at the number of valid turns.
    length = 1 + jnp.sum(jnp.cumprod(continues.astype(jnp.int32), axis=1), axis=1)
    length = jnp.minimum(length, num_valid)
    values = ndcg_by_rank[jnp.maximum(length - 1, 0)]
    return jnp.where(num_valid > 0, jnp.mean(values), 0.0)


def esndcg_ranked(
    rel_lists: Array,
    mask: Array,
    *,
    p: float = 0.8,
    p_down: float = 0.5,
    max_rel: float,
    item_mask: Array | None = None,
) -> Array:
    """ESNDCG when the EA outputs a ranked list of its top-m allowed strategies per turn.

    Inside a turn the user scans down the list (the esNDCG scan-path model): they read rank 1 and continue to rank
    j+1 with probability `p_down`, so rank j is read with probability `p_down^{j-1}`. This project's choice for the
    within-turn scan: it enters in expectation, i.e. turn t contributes its expected scanned gain
    `Σ_j (2^{rel_{t,j}} − 1)/log2(j+1) · p_down^{j-1}` to DCG and the same expectation for an all-R list to IDCG;
    the session stopping point L keeps the patience model of `esndcg`. With m = 1 (or p_down = 0) this equals
    `esndcg` on the first column exactly.

    Args:
      rel_lists: f32[T, m] relevance of the strategy at each rank of each turn's list.
      mask: bool[T] valid turns.
      item_mask: optional bool[T, m] valid list entries (a prefix per turn when fewer than m strategies are
        allowed); the scan cannot go past the end of a list, so padded entries count in neither DCG nor IDCG.
    Returns:
      f32[] ranked-list ESNDCG in [0, 1].
    """
    chex.assert_rank([rel_lists, mask], [2, 1])
    chex.assert_type([rel_lists, mask], [float, bool])
    chex.assert_equal_shape_prefix([rel_lists, mask], 1)
    _check_max_rel(max_rel)
    if item_mask is None:
        item_mask = jnp.ones(rel_lists.shape, bool)
    chex.assert_equal_shape([rel_lists, item_mask])
    chex.assert_type(item_mask, bool)
    depth = jnp.arange(1, rel_lists.shape[1] + 1, dtype=jnp.float32)
    read = jnp.power(jnp.asarray(p_down, jnp.float32), depth - 1.0) / jnp.log2(depth + 1.0)
    read = jnp.where(item_mask, read[None, :], 0.0)
    turn_gain = jnp.sum((jnp.exp2(rel_lists.astype(jnp.float32)) - 1.0) * read, axis=1)
    turn_ideal = (2.0**max_rel - 1.0) * jnp.sum(read, axis=1)
    p = jnp.asarray(p, jnp.float32)
    return jnp.sum(_stop_probabilities(mask, p) * _per_turn_ndcg(turn_gain, turn_ideal, mask))
