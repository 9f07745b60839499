"""GRPO baseline (GOPO.md §4): one agent, no Expert; the CS's replies get group-relative advantages on R_B.

Each dialogue's R_B is normalised within its group (`group_normalise`: G rollouts from one start), the sequence
advantage is broadcast to every reply token of that dialogue, and the loss is GOPO's token-level PPO-clipped
surrogate with the clamped k3 KL to the SFT reference (`gopo.cs_policy_loss`), so GRPO and GOPO differ only in
where the advantage comes from.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.algorithms import gopo
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.metrics.group import group_normalise, zero_variance
from gopo_jax.models.heads import SamplingDist

Array = chex.Array


@dataclasses.dataclass(frozen=True)
class GRPOHyper:
    group_size: int
    clip_eps: float = 0.2
    beta: float = 0.02
    kl_clamp: float = 10.0
    aggregation: str = "seq-mean-token-mean"
    sampling: SamplingDist = SamplingDist()  # the rollout's: the loss's log-probs are those it samples from


def sequence_to_tokens(seq_values: Array, mask: Array) -> Array:
    """f32[B] per-dialogue values on each of its masked tokens: f32[B, L] (0 elsewhere)."""
    chex.assert_rank([seq_values, mask], [1, 2])
    return jnp.where(mask, seq_values[:, None], 0.0)


def grpo_advantages(rewards: Array, group_size: int) -> Array:
    """f32[B] -> f32[B]: each reward normalised within its group of `group_size` contiguous rows."""
    chex.assert_rank(rewards, 1)
    return jax.vmap(group_normalise)(rewards.reshape(-1, group_size)).reshape(-1)


@flax.struct.dataclass
class GRPOBatch:
    """The rolled-out groups, their rewards f32[B] (R_B) and the reference's token log-probs f32[B, L] (β > 0)."""

    traj: Trajectory
    rewards: jax.Array
    ref_cs_logp: jax.Array | None = None


def make_grpo_loss(cs_graphdef: Any, layout: Layout, hyper: GRPOHyper):
    """The loss over a `GRPOBatch`."""
    g = hyper.group_size

    def loss_fn(params, extras, batch, rng):
        del rng
        traj = batch.traj
        rewards = batch.rewards
        adv_tok = sequence_to_tokens(grpo_advantages(rewards, g), traj.cs_mask)
        cs = nnx.merge(cs_graphdef, params["cs"])
        logp, entropy = scoring.cs_token_log_probs(cs, traj, layout, hyper.sampling)
        loss, metrics = gopo.cs_policy_loss(
            logp, traj.cs_logprob, batch.ref_cs_logp if hyper.beta > 0 else None, adv_tok, traj.cs_mask,
            clip_eps=hyper.clip_eps, beta=hyper.beta, aggregation=hyper.aggregation, kl_clamp=hyper.kl_clamp)
        n = jnp.maximum(jnp.sum(traj.cs_mask), 1)
        metrics.update(cs_entropy=jnp.sum(jnp.where(traj.cs_mask, entropy, 0.0)) / n,
                       reward_mean=jnp.mean(rewards), reward_std=jnp.std(rewards),
                       zero_variance_groups=jnp.mean(jax.vmap(zero_variance)(rewards.reshape(-1, g))))
        return loss, (metrics, extras)

    return loss_fn
