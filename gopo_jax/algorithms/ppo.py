"""PPO baseline (GOPO.md §4): one agent (the CS, no Expert) with a value model, token-level GAE and clipped PG.

The MDP is the agent's own tokens: every reply token of the dialogue is an action, customer and header tokens are
the environment's transition between two actions (they are skipped, not discounted). Rewards:

* `shaping · g_t` (task progress of turn t, GOPO.md §1) on the last reply token of turn t — the per-turn shaping;
* `R_B` (the joint business reward) on the last reply token of the dialogue.

A turn whose reply is empty hands its reward to the closest earlier reply token, so no reward is dropped.

Value model: `ValueModel`, a small Qwen3 body of its own (embedding, `num_layers` decoder layers, final RMSNorm)
with a scalar linear head on the final hidden state (a Qwen3 with `vocab_size=1` cannot be used: its input
embedding shares that size). The value of an action token is read from the slot that predicts it (the previous
valid slot), exactly like the token log-probs. Losses: GOPO's token-level PPO-clipped surrogate with the clamped
k3 KL to the SFT reference (`gopo.cs_policy_loss`), plus `vf_coef ·` the clipped value loss.
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
from gopo_jax.models.heads import SamplingDist
from gopo_jax.models.qwen3 import positions_from_valid, previous_valid_slot
from gopo_jax.models import qwen3

Array = chex.Array


class ValueModel(nnx.Module):
    """V(prefix): the Qwen3 decoder stack (`qwen3.stacked_layers`, run by the same layer scan, remat policy and
    attention kernel as the policy) + a scalar head. Same partition annotations as the policy's layers."""

    def __init__(self, config: qwen3.Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        dt, pdt = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dt, param_dtype=pdt,
            embedding_init=qwen3._partitioned(nnx.initializers.normal(0.02), ("tensor", "fsdp")), rngs=rngs)
        self.layers = qwen3.stacked_layers(config, rngs)
        self.norm = qwen3.RMSNorm(config.hidden_size, config.rms_norm_eps, pdt)
        self.value_head = nnx.Linear(config.hidden_size, 1, use_bias=True, dtype=dt, param_dtype=pdt,
                                     kernel_init=qwen3._partitioned(nnx.initializers.zeros, ("fsdp", None)),
                                     bias_init=qwen3._partitioned(nnx.initializers.zeros, (None,)), rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array) -> jax.Array:
        """f32[B, L]: the value after reading slots <= i (garbage on pad slots; callers gather valid ones)."""
        chex.assert_rank([tokens, positions, token_valid], 2)
        x, _ = qwen3.run_layers(self.config, self.layers, self.embed_tokens(tokens), positions, token_valid)
        return self.value_head(self.norm(x))[..., 0].astype(jnp.float32)


def action_values(values: Array, valid: Array) -> Array:
    """f32[B, L]: the value of the state each token is predicted from (its previous valid slot), 0 without one."""
    chex.assert_equal_shape([values, valid])
    prev, has_prev = previous_valid_slot(valid)
    return jnp.where(has_prev, jnp.take_along_axis(values, prev, axis=1), 0.0)


def trajectory_values(model: ValueModel, traj: Trajectory) -> Array:
    return action_values(model(traj.tokens, positions_from_valid(traj.valid), traj.valid), traj.valid)


def shaped_turn_rewards(gain: Array, turn_mask: Array, final_reward: Array, *, shaping: float) -> Array:
    """f32[T]: `shaping · g_t` on every valid turn, plus the dialogue's `final_reward` on its last valid turn."""
    chex.assert_rank([gain, turn_mask, final_reward], [1, 1, 0])
    chex.assert_equal_shape([gain, turn_mask])
    t = jnp.arange(gain.shape[0])
    last = jnp.max(jnp.where(turn_mask, t, -1))
    return jnp.where(turn_mask, shaping * gain, 0.0) + jnp.where(t == last, final_reward, 0.0)


def turn_rewards_to_tokens(turn_rewards: Array, action_mask: Array, token_turn: Array) -> Array:
    """f32[T] -> f32[L]: each turn's reward on the last action token at or before the end of that turn."""
    chex.assert_rank([turn_rewards, action_mask, token_turn], [1, 1, 1])
    num_turns, length = turn_rewards.shape[0], action_mask.shape[0]
    idx = jnp.where(action_mask, jnp.arange(length), -1)
    # Segment T collects the context prefix (turn -1); it has no actions of a turn of its own.
    last_in_turn = jax.ops.segment_max(idx, jnp.where(token_turn >= 0, token_turn, num_turns),
                                       num_segments=num_turns + 1)[:num_turns]
    last_upto = jax.lax.cummax(jnp.maximum(last_in_turn, -1))
    return jnp.zeros((length,), jnp.float32).at[jnp.maximum(last_upto, 0)].add(
        jnp.where(last_upto >= 0, turn_rewards, 0.0))


def gae(rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float) -> tuple[Array, Array]:
    """Generalised advantage estimation over the masked slots of one sequence (unmasked slots are skipped: the
    next action's value is the next *masked-in* slot's). Terminal after the last action. Returns
    (advantages f32[L], returns = advantages + values f32[L]), both 0 off the mask."""
    chex.assert_rank([rewards, values, mask], [1, 1, 1])
    chex.assert_equal_shape([rewards, values, mask])

    def back(carry, x):
        next_value, next_adv = carry
        r, v, m = x
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        return jax.lax.cond(m, lambda: ((v, adv), adv), lambda: ((next_value, next_adv), jnp.zeros_like(adv)))

    zero = jnp.zeros((), jnp.float32)
    _, adv = jax.lax.scan(back, (zero, zero), (rewards.astype(jnp.float32), values.astype(jnp.float32), mask),
                          reverse=True)
    return adv, jnp.where(mask, adv + values, 0.0)


def whiten(x: Array, mask: Array, eps: float = 1e-8) -> Array:
    """(x − mean)/std over the masked entries (any shape); 0 off the mask."""
    chex.assert_equal_shape([x, mask])
    n = jnp.maximum(jnp.sum(mask), 1)
    mean = jnp.sum(jnp.where(mask, x, 0.0)) / n
    var = jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0)) / n
    return jnp.where(mask, (x - mean) / (jnp.sqrt(var) + eps), 0.0)


def clipped_value_loss(values: Array, old_values: Array, returns: Array, mask: Array, *, clip: float) -> Array:
    """0.5 · max((V − R)², (clip(V, V_old ± c) − R)²), mean over the masked tokens."""
    chex.assert_equal_shape([values, old_values, returns, mask])
    clipped = old_values + jnp.clip(values - old_values, -clip, clip)
    per = 0.5 * jnp.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return jnp.sum(jnp.where(mask, per, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    clip_eps: float = 0.2
    beta: float = 0.02
    kl_clamp: float = 10.0
    aggregation: str = "token-mean"
    gamma: float = 1.0
    lam: float = 0.95
    shaping: float = 1.0
    vf_coef: float = 0.5
    value_clip: float = 0.2
    normalize_advantages: bool = True
    sampling: SamplingDist = SamplingDist()  # the rollout's: the loss's log-probs are those it samples from


def ppo_targets(old_values: Array, traj: Trajectory, final_rewards: Array, token_turn: Array, hyper: PPOHyper
                ) -> dict[str, Array]:
    """Once per rollout: token rewards, GAE advantages (whitened over the batch if configured) and value targets.
    old_values f32[B, L] (from `trajectory_values`), final_rewards f32[B] (R_B)."""
    chex.assert_rank([old_values, final_rewards], [2, 1])
    mask = traj.cs_mask
    turn_r = jax.vmap(lambda g, m, f: shaped_turn_rewards(g, m, f, shaping=hyper.shaping))(
        traj.gain, traj.turn_mask, final_rewards)
    tok_r = jax.vmap(lambda r, m: turn_rewards_to_tokens(r, m, token_turn))(turn_r, mask)
    adv, returns = jax.vmap(lambda r, v, m: gae(r, v, m, gamma=hyper.gamma, lam=hyper.lam))(tok_r, old_values, mask)
    if hyper.normalize_advantages:
        adv = whiten(adv, mask)
    return {"advantages": adv, "returns": returns, "old_values": jnp.where(mask, old_values, 0.0)}


@flax.struct.dataclass
class PPOBatch:
    """The rolled-out dialogues, `ppo_targets`' token advantages, returns and old values f32[B, L], and the
    reference's token log-probs f32[B, L] when β > 0."""

    traj: Trajectory
    advantages: jax.Array
    returns: jax.Array
    old_values: jax.Array
    ref_cs_logp: jax.Array | None = None


def make_ppo_loss(cs_graphdef: Any, value_graphdef: Any, layout: Layout, hyper: PPOHyper):
    """The loss over a `PPOBatch`."""

    def loss_fn(params, extras, batch, rng):
        del rng
        traj = batch.traj
        mask = traj.cs_mask
        cs = nnx.merge(cs_graphdef, params["cs"])
        logp, entropy = scoring.cs_token_log_probs(cs, traj, layout, hyper.sampling)
        loss_pg, metrics = gopo.cs_policy_loss(
            logp, traj.cs_logprob, batch.ref_cs_logp if hyper.beta > 0 else None, batch.advantages, mask,
            clip_eps=hyper.clip_eps, beta=hyper.beta, aggregation=hyper.aggregation, kl_clamp=hyper.kl_clamp)
        values = trajectory_values(nnx.merge(value_graphdef, params["value"]), traj)
        loss_v = clipped_value_loss(values, batch.old_values, batch.returns, mask, clip=hyper.value_clip)
        n = jnp.maximum(jnp.sum(mask), 1)
        metrics.update(loss_pg=loss_pg, loss_value=loss_v,
                       cs_entropy=jnp.sum(jnp.where(mask, entropy, 0.0)) / n,
                       value_mean=jnp.sum(jnp.where(mask, values, 0.0)) / n,
                       return_mean=jnp.sum(jnp.where(mask, batch.returns, 0.0)) / n)
        return loss_pg + hyper.vf_coef * loss_v, (metrics, extras)

    return loss_fn
