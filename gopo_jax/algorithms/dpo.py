"""DPO baseline (GOPO.md §4): offline pairwise preferences between dialogues ranked by R_B.

The dialogues are sampled from the frozen SFT policy (one agent, no Expert), in groups of G from one start. Every
ordered pair of a group with `R_B(i) > R_B(j) + margin` is a (chosen, rejected) pair, and the loss is DPO's

    −log σ(β · [(ℓ_i − ℓ_i^ref) − (ℓ_j − ℓ_j^ref)]),   ℓ = Σ over the agent's reply tokens of log π(y | prefix),

averaged over the pairs of the groups that have any (a group whose R_B are all equal carries no preference).
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


def sequence_log_prob(token_logp: Array, mask: Array) -> Array:
    """f32[B, L] -> f32[B]: the log-prob of each dialogue's masked (agent) tokens."""
    chex.assert_equal_shape([token_logp, mask])
    return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=-1)


def dpo_group_loss(logp: Array, ref_logp: Array, rewards: Array, *, beta: float, margin: float = 0.0
                   ) -> tuple[Array, dict[str, Array]]:
    """DPO over the ordered pairs of one group: f32[G] sequence log-probs (policy, reference) and R_B.

    Returns the mean pair loss (0 without pairs; NaN when a reward is NaN/inf, for the train step's non-finite
    guard to skip the update) and `has_pairs`, `num_pairs`, `accuracy` (share of pairs whose implicit reward
    β(ℓ − ℓ^ref) ranks them correctly) and `margin` (mean implicit-reward gap).
    """
    chex.assert_rank([logp, ref_logp, rewards], [1, 1, 1])
    chex.assert_equal_shape([logp, ref_logp, rewards])
    implicit = beta * (logp - ref_logp)
    gap = implicit[:, None] - implicit[None, :]  # row i chosen, column j rejected
    pairs = (rewards[:, None] - rewards[None, :]) > margin
    num = jnp.sum(pairs)
    denom = jnp.maximum(num, 1)
    loss = jnp.sum(jnp.where(pairs, jax.nn.softplus(-gap), 0.0)) / denom
    # A NaN reward compares False and drops out of every pair, an infinite one wins them all: either way the update
    # would train on a ranking the rewards do not give.
    loss = jnp.where(jnp.all(jnp.isfinite(rewards)), loss, jnp.nan)
    return loss, {"has_pairs": (num > 0).astype(jnp.float32), "num_pairs": num.astype(jnp.float32),
                  "accuracy": jnp.sum(pairs & (gap > 0)) / denom,
                  "margin": jnp.sum(jnp.where(pairs, gap, 0.0)) / denom}


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
        per_group, aux = jax.vmap(lambda l, r, s: dpo_group_loss(l, r, s, beta=hyper.beta, margin=hyper.margin))(
            logp.reshape(-1, g), batch.ref_seq_logp.reshape(-1, g), batch.rewards.reshape(-1, g))
        has = aux["has_pairs"]
        n_groups = jnp.maximum(jnp.sum(has), 1.0)
        loss = jnp.sum(per_group * has) / n_groups
        metrics = {"dpo_groups_with_pairs": jnp.mean(has),
                   "dpo_accuracy": jnp.sum(aux["accuracy"] * has) / n_groups,
                   "dpo_margin": jnp.sum(aux["margin"] * has) / n_groups,
                   "reward_mean": jnp.mean(batch.rewards)}
        return loss, (metrics, extras)

    return loss_fn
