"""R_B, the joint business reward of one trajectory, and GRE, its mean over evaluation dialogues (GOPO.md §2).

`R_B = w_o·o + w_sat·sat + w_fcr·fcr − w_sop·(1/T)·Σ_t (1 − v_t) − w_len·T/T_max`, with T the number of valid
turns (`mask.sum()`), not the padded length. An all-masked trajectory has no SOP or length penalty (the SOP term
would be 0/0; a dialogue of no turns has no length).
"""

from typing import Any, Mapping

import chex
import jax.numpy as jnp
from flax import struct

Array = chex.Array


@struct.dataclass(frozen=True)
class BusinessWeights:
    """Weights of R_B. A pytree of scalars, so changing them under `jax.jit` does not recompile."""

    w_o: float = 1.0
    w_sat: float = 0.5
    w_fcr: float = 0.5
    w_sop: float = 1.0
    w_len: float = 0.1

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "BusinessWeights":
        """Builds the weights from a mapping / ConfigDict with (a subset of) the keys w_o, w_sat, w_fcr, w_sop, w_len."""
        known = {"w_o", "w_sat", "w_fcr", "w_sop", "w_len"}
        unknown = sorted(set(cfg.keys()) - known)
        if unknown:
            raise ValueError(f"business reward weights: unknown key(s) {unknown}; allowed keys are {sorted(known)}")
        return cls(**{k: float(v) for k, v in cfg.items()})


def business_reward(
    outcome: Array,
    sat: Array,
    fcr: Array,
    sop_valid: Array,
    mask: Array,
    *,
    t_max: int,
    weights: BusinessWeights = BusinessWeights(),
) -> Array:
    """R_B of one trajectory.

    Args:
      outcome: f32[] task outcome o ∈ {0,1} (purchase / resolution).
      sat: f32[] satisfaction ∈ [0,1].
      fcr: f32[] first-contact resolution ∈ {0,1}.
      sop_valid: f32[T] per-turn SOP validity v_t ∈ {0,1} (of the realised strategy).
      mask: bool[T] valid turns.
      t_max: the environment's turn limit T_max (> 0).
      weights: the R_B weights.
    Returns:
      f32[] R_B.
    """
    chex.assert_rank([outcome, sat, fcr, sop_valid, mask], [0, 0, 0, 1, 1])
    chex.assert_equal_shape([sop_valid, mask])
    chex.assert_type([outcome, sat, fcr, sop_valid, mask], [float, float, float, float, bool])
    if not t_max > 0:
        raise ValueError(f"business_reward: t_max must be a positive turn limit, got {t_max!r}")
    num_turns = jnp.sum(mask.astype(jnp.float32))
    violations = jnp.sum(jnp.where(mask, 1.0 - sop_valid, 0.0))
    violation_rate = violations / jnp.maximum(num_turns, 1.0)
    return (
        weights.w_o * outcome
        + weights.w_sat * sat
        + weights.w_fcr * fcr
        - weights.w_sop * violation_rate
        - weights.w_len * num_turns / t_max
    )


def gre(rewards: Array, mask: Array | None = None) -> Array:
    """GRE: the mean R_B over evaluation dialogues (f32[N] → f32[]); `mask` (bool[N]) leaves out padded slots."""
    chex.assert_rank(rewards, 1)
    chex.assert_type(rewards, float)
    if mask is None:
        return jnp.mean(rewards)
    chex.assert_equal_shape([rewards, mask])
    chex.assert_type(mask, bool)
    return jnp.sum(jnp.where(mask, rewards, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
