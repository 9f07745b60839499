"""DPO baseline (GOPO.md §4): offline pairwise preferences between dialogues ranked by R_B.

The dialogues are sampled from the frozen SFT policy (one agent, no Expert), in groups of G from one start. Every
ordered pair of a group with `R_B(i) > R_B(j) + margin` is a (chosen, rejected) pair, and the loss is DPO's

    −log σ(β · [(ℓ_i − ℓ_i^ref) − (ℓ_j − ℓ_j^ref)]),   ℓ = Σ over the agent's reply tokens of log π(y | prefix),

averaged over the pairs of each group, then over the groups that have any: a group whose R_B are all equal (or
within the margin) carries no preference and no loss, and a group with many pairs counts as much as one with few.

RPO (Pang et al. 2024, "Iterative Reasoning Preference Optimization") adds `rpo_alpha` times the chosen dialogue's
per-token negative log-likelihood, NLL(chosen)/|chosen|, to each pair's loss: it keeps the likelihood of the
preferred replies from sinking while the DPO margin grows (DPO alone can raise the margin by lowering both).
`rpo_alpha = 0` is plain DPO.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory

Array = chex.Array


@dataclasses.dataclass(frozen=True)
class DPOHyper:
    group_size: int
    beta: float = 0.1
    margin: float = 0.0
    rpo_alpha: float = 0.0


def sequence_log_prob(token_logp: Array, mask: Array) -> Array:
    """f32[B, L] -> f32[B]: the log-prob of each dialogue's masked (agent) tokens."""
    chex.assert_equal_shape([token_logp, mask])
    return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1)


def dpo_group_loss(logp: Array, ref_logp: Array, rewards: Array, *, beta: float, margin: float = 0.0,
                   num_tokens: Array | None = None, rpo_alpha: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """DPO (+ RPO's NLL term) over the ordered pairs of one group: f32[G] sequence log-probs (policy, reference),
    R_B and, for RPO, the number of agent tokens of each dialogue.

    Returns the mean pair loss (0 without pairs; NaN when a reward is NaN/inf, for the train step's non-finite
    guard to skip the update) and `has_pairs`, `num_pairs`, `accuracy` (share of pairs whose implicit reward
    β(ℓ − ℓ^ref) ranks them correctly), `margin` (mean implicit-reward gap) and `chosen_nll` (mean per-token NLL of
    the chosen dialogue over the pairs).
    """
    chex.assert_rank([logp, ref_logp, rewards], [1, 1, 1])
    chex.assert_equal_shape([logp, ref_logp, rewards])
    if num_tokens is None:
        if rpo_alpha != 0.0:
            raise ValueError("dpo_group_loss: rpo_alpha != 0 needs num_tokens (each dialogue's agent-token count)")
        num_tokens = jnp.ones_like(logp)
    chex.assert_equal_shape([logp, num_tokens])
    implicit = beta * (logp - ref_logp)
    gap = implicit[:, None] - implicit[None, :]  # row i chosen, column j rejected
    pairs = (rewards[:, None] - rewards[None, :]) > margin
    num = jnp.sum(pairs)
    denom = jnp.maximum(num, 1)
    # Row i of a pair is the chosen dialogue: its NLL per token, counted once per pair it wins.
    chosen_nll = jnp.broadcast_to((-logp / jnp.maximum(num_tokens, 1))[:, None], pairs.shape)
    pair_loss = jax.nn.softplus(-gap) + rpo_alpha * chosen_nll
    loss = jnp.sum(jnp.where(pairs, pair_loss, 0.0)) / denom
    # A NaN reward compares False and drops out of every pair, an infinite one wins them all: either way the update
    # would train on a ranking the rewards do not give.
    loss = jnp.where(jnp.all(jnp.isfinite(rewards)), loss, jnp.nan)
    return loss, {"has_pairs": (num > 0).astype(jnp.float32), "num_pairs": num.astype(jnp.float32),
                  "accuracy": jnp.sum(pairs & (gap > 0)) / denom,
                  "margin": jnp.sum(jnp.where(pairs, gap, 0.0)) / denom,
                  "chosen_nll": jnp.sum(jnp.where(pairs, chosen_nll, 0.0)) / denom}


@flax.struct.dataclass
class DPOBatch:
    """Groups sampled from the reference, their rewards f32[B] (R_B) and the reference's reply log-probs f32[B]."""

    traj: Trajectory
    rewards: jax.Array
    ref_seq_logp: jax.Array


def make_dpo_loss(cs_graphdef: Any, layout: Layout, hyper: DPOHyper):
    """The loss over a `DPOBatch`."""
    g = hyper.group_size

    def loss_fn(params, extras, batch, rng):
        del rng
        traj = batch.traj
        cs = nnx.merge(cs_graphdef, params["cs"])
        logp = sequence_log_prob(scoring.cs_token_log_probs(cs, traj, layout)[0], traj.cs_mask)
        num_tokens = jnp.sum(traj.cs_mask, axis=-1).astype(jnp.float32)
        per_group, aux = jax.vmap(lambda l, r, s, n: dpo_group_loss(
            l, r, s, beta=hyper.beta, margin=hyper.margin, num_tokens=n, rpo_alpha=hyper.rpo_alpha))(
            logp.reshape(-1, g), batch.ref_seq_logp.reshape(-1, g), batch.rewards.reshape(-1, g),
            num_tokens.reshape(-1, g))
        has = aux["has_pairs"]
        n_groups = jnp.maximum(jnp.sum(has), 1.0)
        loss = jnp.sum(per_group * has) / n_groups
        metrics = {"dpo_groups_with_pairs": jnp.mean(has),
                   "dpo_accuracy": jnp.sum(aux["accuracy"] * has) / n_groups,
                   "dpo_margin": jnp.sum(aux["margin"] * has) / n_groups,
                   "dpo_chosen_nll": jnp.sum(aux["chosen_nll"] * has) / n_groups,
                   "reward_mean": jnp.mean(batch.rewards)}
        return loss, (metrics, extras)

    return loss_fn
