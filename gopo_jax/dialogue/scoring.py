"""Re-scoring rolled-out trajectories with (current or reference) models: one forward pass per agent over the buffer.

The Expert's log-probs are read at its decision positions (the slot before each decision token is the header's
stage token, always valid on an active turn) and restricted to the strategy tokens under the SOP mask; the CS's
log-probs are per token, predicted from the previous *valid* slot (pads are invisible, see `layout`).
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.sop import masked_strategy_log_softmax
from gopo_jax.models.qwen3 import positions_from_valid, previous_valid_slot


def decision_logit_positions(layout: Layout) -> np.ndarray:
    """int[T]: the slot whose logits predict each turn's decision token (the header's last slot)."""
    return np.asarray([layout.decision_pos(t) - 1 for t in range(layout.max_turns)], np.int32)


def expert_strategy_log_probs(expert, traj: Trajectory, layout: Layout, strategy_ids, *, sop_mask: bool = True
                              ) -> jax.Array:
    """f32[B, T, n_k]: log π_E(k | x_t) for every strategy under the masked softmax (all-allowed without the SOP
    mask ablation, matching what the rollout sampled from)."""
    logits, _ = expert(traj.tokens, positions_from_valid(traj.valid), traj.valid)
    at_decisions = logits[:, decision_logit_positions(layout), :]
    strategy_logits = at_decisions[..., jnp.asarray(strategy_ids, jnp.int32)]
    allowed = traj.allowed if sop_mask else jnp.ones_like(traj.allowed)
    return masked_strategy_log_softmax(strategy_logits, allowed & traj.turn_mask[..., None])


def chosen(log_probs: jax.Array, strategy: jax.Array, turn_mask: jax.Array) -> jax.Array:
    """f32[B, T]: the log-prob of the chosen strategy, 0 on padded turns."""
    chex.assert_rank([log_probs, strategy, turn_mask], [3, 2, 2])
    picked = jnp.take_along_axis(log_probs, jnp.clip(strategy, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(turn_mask, picked, 0.0)


def token_log_probs_and_entropy(logits: jax.Array, tokens: jax.Array, valid: jax.Array
                                ) -> tuple[jax.Array, jax.Array]:
    """(log p(token_i | valid slots < i), entropy of that predictive distribution), both f32[B, L], 0 where there
    is no valid previous slot or the slot is a pad."""
    prev, has_prev = previous_valid_slot(valid)
    rows = jnp.arange(tokens.shape[0])[:, None]
    pred = jax.nn.log_softmax(logits[rows, prev], axis=-1)  # [B, L, V]
    logp = jnp.take_along_axis(pred, tokens[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(pred) * pred, axis=-1)
    return jnp.where(has_prev, logp, 0.0), jnp.where(has_prev, entropy, 0.0)


def cs_token_log_probs(cs, traj: Trajectory) -> tuple[jax.Array, jax.Array]:
    logits, _ = cs(traj.tokens, positions_from_valid(traj.valid), traj.valid)
    return token_log_probs_and_entropy(logits, traj.tokens, traj.valid)
