"""The hierarchical GOPO loss `L = L_E(θ_E) + α · L_C(θ_C)` over a batch of trajectory groups, and the dual-agent
warm-start (SFT) loss. Both plug into `gopo_jax.train.step.make_train_step` as
`loss_fn(params, extras, batch, rng) -> (loss, (metrics, new_extras))` with `params = {"expert": ..., "cs": ...}`.

The batch is a dict: `traj` (a `Trajectory`, B = num_groups · G rows, groups contiguous), `scores` f32[B]
(S_i = ESNDCG + λ_B R_B, computed once per rollout by `trajectory_scores_from`), and, only when a KL or the
preference reference is on, `ref_expert_logp` f32[B, T, n_k] and `ref_cs_logp` f32[B, L] from the frozen SFT
models (β = 0 with `expert_reference=False` skips the reference forward pass entirely).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.algorithms import gopo
from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.metrics.business import BusinessWeights, business_reward
from gopo_jax.metrics.esndcg import esndcg


@dataclasses.dataclass(frozen=True)
class GOPOHyper:
    """Static hyper-parameters (GOPO.md §3); defaults are the spec's."""

    group_size: int = 4
    expert_loss: str = "preference"  # or "clipped_pg"
    beta_pref: float = 1.0
    pref_margin: float = 0.0
    expert_reference: bool = True  # ℓ_i relative to the reference policy (preference loss)
    beta_expert: float = 0.0  # KL weight of the clipped-PG expert loss
    clip_eps: float = 0.2
    lambda_b: float = 1.0
    lambda_s: float = 1.0
    alpha: float = 1.0
    beta_cs: float = 0.02
    kl_clamp: float = 10.0
    aggregation: str = "token-mean"
    constraint: bool = True  # ablation "no Lagrange constraint": μ stays at 0
    mu_lr: float = 0.5
    delta: float = 0.05
    use_esndcg: bool = True  # ablation "no ESNDCG": S = R_B
    esndcg_p: float = 0.8
    sop_mask: bool = True
    use_expert: bool = True  # ablation "no EA": only the CS objective, on the joint reward

    @property
    def needs_expert_reference(self) -> bool:
        if not self.use_expert:
            return False
        if self.expert_loss == "preference":
            return self.expert_reference
        return self.beta_expert > 0

    @property
    def needs_cs_reference(self) -> bool:
        return self.beta_cs > 0


def trajectory_scores_from(traj: Trajectory, *, max_relevance: float, t_max: int, weights: BusinessWeights,
                           hyper: GOPOHyper) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(S f32[B], ESNDCG f32[B], R_B f32[B]) of a rolled-out batch, with the metrics functions vmapped."""
    es = jax.vmap(lambda rel, m: esndcg(rel, m, p=hyper.esndcg_p, max_rel=max_relevance))(traj.rel, traj.turn_mask)
    rb = jax.vmap(lambda o, s, f, v, m: business_reward(o, s, f, v, m, t_max=t_max, weights=weights))(
        traj.outcome, traj.satisfaction, traj.fcr, traj.sop_valid, traj.turn_mask)
    return gopo.trajectory_scores(es, rb, lambda_b=hyper.lambda_b, use_esndcg=hyper.use_esndcg), es, rb


def _groups(x: jax.Array, g: int) -> jax.Array:
    return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_gopo_loss(expert_graphdef: Any, cs_graphdef: Any, layout: Layout, strategy_ids: tuple[int, ...],
                   hyper: GOPOHyper):
    g = hyper.group_size
    token_turn = layout.turn_of_position()
    expert_loss_fn = gopo.get_expert_loss(hyper.expert_loss)

    def loss_fn(params, extras, batch, rng):
        del rng
        traj: Trajectory = batch["traj"]
        scores = batch["scores"]
        mu = extras["mu"]
        metrics: dict[str, jax.Array] = {}
        loss_e = jnp.zeros((), jnp.float32)
        if hyper.use_expert:
            expert = nnx.merge(expert_graphdef, params["expert"])
            logp_all = scoring.expert_strategy_log_probs(expert, traj, layout, strategy_ids, sop_mask=hyper.sop_mask)
            logp = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
            ref_all = batch.get("ref_expert_logp")
            allowed = (traj.allowed if hyper.sop_mask else jnp.ones_like(traj.allowed)) & traj.turn_mask[..., None]
            if hyper.expert_loss == "preference":
                ref = scoring.chosen(ref_all, traj.strategy, traj.turn_mask) if hyper.expert_reference else None
                per_group, aux = jax.vmap(lambda l, r, m, s: expert_loss_fn(
                    l, r, m, s, beta_pref=hyper.beta_pref, margin=hyper.pref_margin))(
                    _groups(logp, g), None if ref is None else _groups(ref, g), _groups(traj.turn_mask, g),
                    _groups(scores, g))
                has = aux["has_pairs"]
                loss_e = jnp.sum(per_group * has) / jnp.maximum(jnp.sum(has), 1.0)
                metrics["expert_groups_with_pairs"] = jnp.mean(has)
                metrics["expert_preference_accuracy"] = jnp.sum(aux["preference_accuracy"] * has) / jnp.maximum(
                    jnp.sum(has), 1.0)
            else:
                kl = gopo.strategy_kl(logp_all, ref_all, allowed) if hyper.beta_expert > 0 else None
                per_group, aux = jax.vmap(lambda l, o, m, s, k: expert_loss_fn(
                    l, o, m, s, k, clip_eps=hyper.clip_eps, beta=hyper.beta_expert))(
                    _groups(logp, g), _groups(traj.ea_logprob, g), _groups(traj.turn_mask, g), _groups(scores, g),
                    None if kl is None else _groups(kl, g))
                loss_e = jnp.mean(per_group)
                metrics["expert_clip_fraction"] = jnp.mean(aux["expert_clip_fraction"])
            metrics["expert_entropy"] = _masked_mean(gopo.strategy_entropy(logp_all, allowed), traj.turn_mask)
            if ref_all is not None:
                metrics["expert_kl_ref"] = _masked_mean(gopo.strategy_kl(logp_all, ref_all, allowed), traj.turn_mask)
            metrics["expert_ratio_mean"] = _masked_mean(jnp.exp(logp - traj.ea_logprob), traj.turn_mask)

        cs = nnx.merge(cs_graphdef, params["cs"])
        cs_logp, cs_entropy = scoring.cs_token_log_probs(cs, traj)
        # Without an EA there is no chosen strategy to be aligned with: every turn counts as aligned.
        aligned = traj.aligned if hyper.use_expert else jnp.ones_like(traj.aligned)
        rewards = jax.vmap(lambda a, v, q, s: gopo.cs_turn_rewards(a, v, q, s, mu, lambda_s=hyper.lambda_s))(
            _groups(aligned, g), _groups(traj.sop_valid, g), _groups(traj.quality, g), _groups(scores, g))
        adv_turn = jax.vmap(gopo.normalise_over_valid)(rewards, _groups(traj.turn_mask, g)).reshape(aligned.shape)
        adv_tok = jax.vmap(lambda a: gopo.turn_to_token(a, token_turn))(adv_turn)
        loss_c, cs_metrics = gopo.cs_policy_loss(
            cs_logp, traj.cs_logprob, batch.get("ref_cs_logp") if hyper.needs_cs_reference else None, adv_tok,
            traj.cs_mask, clip_eps=hyper.clip_eps, beta=hyper.beta_cs, aggregation=hyper.aggregation,
            kl_clamp=hyper.kl_clamp)
        metrics.update(cs_metrics)
        metrics["cs_entropy"] = _masked_mean(cs_entropy, traj.cs_mask)

        violation = 1.0 - _masked_mean(aligned, traj.turn_mask)
        new_mu = gopo.update_multiplier(mu, violation, lr=hyper.mu_lr, target=hyper.delta) if hyper.constraint else mu
        loss = loss_e + hyper.alpha * loss_c
        metrics.update(loss_expert=loss_e, loss_cs=loss_c, misalignment_rate=violation,
                       sop_violation_rate=1.0 - _masked_mean(traj.sop_valid, traj.turn_mask), mu=mu,
                       score_mean=jnp.mean(scores), score_std=jnp.std(scores),
                       zero_variance_groups=jnp.mean(jnp.ptp(_groups(scores, g), axis=1) <= 1e-6))
        return loss, (metrics, {**extras, "mu": jax.lax.stop_gradient(new_mu)})

    return loss_fn


def imitable_decisions(traj: Trajectory, *, sop_mask: bool) -> jax.Array:
    """bool[B, T]: demonstrated turns the Expert can learn to reproduce. A logged agent sometimes takes a strategy
    the SOP does not allow at that stage (real MG-ShopDial wizards: ~3% of turns) or one no strategy name covers;
    under the SOP mask the Expert gives such a move probability 0, so its NLL is unbounded and carries no
    gradient: it is left out of the loss (and counted in `sft_expert_skipped`) rather than swamping it."""
    known = (traj.strategy >= 0) & traj.turn_mask
    if not sop_mask:
        return known
    k = jnp.clip(traj.strategy, 0)[..., None]
    return known & jnp.take_along_axis(traj.allowed, k, axis=-1)[..., 0]


def make_warm_start_loss(expert_graphdef: Any, cs_graphdef: Any, layout: Layout, strategy_ids: tuple[int, ...], *,
                         use_expert: bool = True, sop_mask: bool = True):
    """SFT of both agents on demonstrations: EA on x_t -> k_t (masked-softmax NLL), CS on (x_t, k_t) -> y_t
    (token cross-entropy on the reply slots). Batch: {"traj": Trajectory} of scripted rollouts."""

    def loss_fn(params, extras, batch, rng):
        del rng
        traj: Trajectory = batch["traj"]
        metrics = {}
        loss = jnp.zeros((), jnp.float32)
        if use_expert:
            expert = nnx.merge(expert_graphdef, params["expert"])
            logp_all = scoring.expert_strategy_log_probs(expert, traj, layout, strategy_ids, sop_mask=sop_mask)
            imitable = imitable_decisions(traj, sop_mask=sop_mask)
            logp = scoring.chosen(logp_all, traj.strategy, imitable)
            loss_e = -_masked_mean(logp, imitable)
            metrics["sft_expert_nll"] = loss_e
            metrics["sft_expert_accuracy"] = _masked_mean(
                (jnp.argmax(logp_all, -1) == traj.strategy).astype(jnp.float32), imitable)
            metrics["sft_expert_skipped"] = 1.0 - _masked_mean(imitable.astype(jnp.float32), traj.turn_mask)
            loss = loss + loss_e
        cs = nnx.merge(cs_graphdef, params["cs"])
        cs_logp, _ = scoring.cs_token_log_probs(cs, traj)
        loss_c = -_masked_mean(cs_logp, traj.cs_mask)
        metrics["sft_cs_nll"] = loss_c
        return loss + loss_c, (metrics, extras)

    return loss_fn
