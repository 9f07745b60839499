"""Re-scoring rolled-out trajectories with (current or reference) models: one forward pass per agent over the buffer.

The model returns hidden states only; each agent turns into logits just the slots and vocabulary rows it reads
(`gopo_jax.models.heads`), never [B, L, V]:

* the Expert's log-probs are read at its decision positions (the slot before each decision token is the header's
  stage token, always valid on an active turn): the n_k strategy rows of the output embedding at T slots, under the
  SOP mask;
* the CS's log-probs and entropies are read at the reply slots of the layout (the only slots `cs_mask` can mark),
  each predicted from the previous *valid* slot (pads are invisible, see `layout`), through the chunked head.

Which distribution. The RL losses train the policy the rollout samples from, so their log-probs are the sampled
distribution's, as the rollout recorded them (GOPO.md §1): the CS's under the run's `heads.SamplingDist`
(temperature, top-k, top-p, applied per chunk of the head), the Expert's under its sampling temperature,
masked_log_softmax(z / T_E) (= log_softmax(masked_log_softmax(z) / T_E), what the rollout draws from). At θ = θ_old
they equal the recorded behaviour log-probs, so every PPO ratio starts at 1; the reference model's log-probs (KL,
preference reference) go through the same functions with the same transformation. The defaults (T 1, no filter)
are the model's own distribution: what SFT's likelihood and DPO's sequence log-probs use.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.sop import masked_strategy_log_softmax
from gopo_jax.models import heads
from gopo_jax.models.qwen3 import positions_from_valid, previous_valid_slot


def decision_logit_positions(layout: Layout) -> np.ndarray:
    """int[T]: the slot whose logits predict each turn's decision token (the header's last slot)."""
    return np.asarray([layout.decision_pos(t) - 1 for t in range(layout.max_turns)], np.int32)


def reply_positions(layout: Layout) -> np.ndarray:
    """int[T * Lr]: every CS reply slot of the buffer, turn after turn (a superset of any `cs_mask`)."""
    return np.asarray([layout.reply_start(t) + j for t in range(layout.max_turns) for j in range(layout.reply_len)],
                      np.int32)


def expert_strategy_log_probs(expert, traj: Trajectory, layout: Layout, strategy_ids, *, sop_mask: bool = True,
                              temperature: float = 1.0) -> jax.Array:
    """f32[B, T, n_k]: log π_E(k | x_t) for every strategy under the masked softmax of the logits / `temperature`
    (the Expert's sampling temperature; all-allowed without the SOP mask ablation), matching what the rollout
    sampled from."""
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"the Expert's sampling temperature must be a number > 0, got {temperature!r}")
    h, _ = expert.hidden(traj.tokens, positions_from_valid(traj.valid), traj.valid)
    at_decisions = h[:, decision_logit_positions(layout), :]  # [B, T, D]
    strategy_logits = heads.row_logits(at_decisions, expert.head_embedding(), jnp.asarray(strategy_ids, jnp.int32))
    allowed = traj.allowed if sop_mask else jnp.ones_like(traj.allowed)
    return masked_strategy_log_softmax(strategy_logits / temperature, allowed & traj.turn_mask[..., None])


def chosen(log_probs: jax.Array, strategy: jax.Array, turn_mask: jax.Array) -> jax.Array:
    """f32[B, T]: the log-prob of the chosen strategy, 0 on padded turns."""
    chex.assert_rank([log_probs, strategy, turn_mask], [3, 2, 2])
    picked = jnp.take_along_axis(log_probs, jnp.clip(strategy, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(turn_mask, picked, 0.0)


def cs_token_log_probs(cs, traj: Trajectory, layout: Layout, dist: heads.SamplingDist = heads.SamplingDist()
                       ) -> tuple[jax.Array, jax.Array]:
    """(log π(token_i | valid slots < i), entropy of that predictive distribution), both f32[B, L], with π the
    sampled distribution `dist` of the CS's logits (default: the model's own), filled at the reply slots of `layout`
    and 0 elsewhere, and 0 where the slot is a pad or has no valid slot before it. Callers read them under
    `traj.cs_mask` (reply slots only)."""
    chex.assert_shape([traj.tokens, traj.valid], (None, layout.length))
    b = traj.tokens.shape[0]
    h, _ = cs.hidden(traj.tokens, positions_from_valid(traj.valid), traj.valid)
    slots = reply_positions(layout)
    prev, has_prev = previous_valid_slot(traj.valid)
    prev, has_prev = prev[:, slots], has_prev[:, slots]  # [B, R]
    h_prev = jnp.take_along_axis(h, prev[..., None], axis=1)  # [B, R, D]: the hidden state that predicts each slot
    logp, entropy = heads.token_log_probs_and_entropy(h_prev, cs.head_embedding(), traj.tokens[:, slots],
                                                      chunk=cs.config.logits_chunk, dist=dist)
    zeros = jnp.zeros(traj.tokens.shape, jnp.float32)

    def scatter(x):
        return zeros.at[:, slots].set(jnp.where(has_prev, x.reshape(b, -1), 0.0))

    return scatter(logp), scatter(entropy)
