"""GOPO's objectives (GOPO.md §3) as pure functions on one group of G rollouts; the caller vmaps over groups.

* Expert (EA): the trajectory-level goal-preference loss (default) or group-normalised clipped policy gradient,
  both on the masked strategy distribution `softmax(z + log M[σ])` whose disallowed strategies have probability 0.
* Customer-service (CS): per-turn constrained reward `a·v·(q + λ_S·S) − μ·(1 − a)`, advantages normalised over
  the group's turns, token-level PPO clipping with a clamped k3 KL to the reference, and dual ascent on μ.

Shapes: G rollouts per group, T turns, n_k strategies, L token slots. Every function asserts its shapes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.dialogue import scoring
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.metrics.group import group_normalise, pairwise_preference_weights
from gopo_jax.models.heads import SamplingDist

Array = chex.Array


def strategy_kl(logp: Array, ref_logp: Array, allowed: Array) -> Array:
    """Exact KL(π ‖ π_ref) over the allowed strategies, per decision: f32[..., n_k] x2 -> f32[...]."""
    chex.assert_equal_shape([logp, ref_logp, allowed])
    p = jnp.where(allowed, jnp.exp(logp), 0.0)
    return jnp.sum(jnp.where(allowed, p * (logp - ref_logp), 0.0), axis=-1)


def strategy_entropy(logp: Array, allowed: Array) -> Array:
    chex.assert_equal_shape([logp, allowed])
    p = jnp.where(allowed, jnp.exp(logp), 0.0)
    return -jnp.sum(jnp.where(allowed, p * logp, 0.0), axis=-1)


def trajectory_scores(esndcg: Array, business: Array, *, lambda_b: float, use_esndcg: bool = True) -> Array:
    """S_i = ESNDCG(τ_i) + λ_B · R_B(τ_i); the "no ESNDCG" ablation uses S = R_B."""
    chex.assert_equal_shape([esndcg, business])
    return (esndcg if use_esndcg else 0.0) + lambda_b * business


def expert_preference_loss(logp: Array, ref_logp: Array | None, turn_mask: Array, scores: Array, *,
                           beta_pref: float, margin: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """Trajectory-level goal preference over one group.

    ℓ_i = Σ_t [log π_E(k_it) − log π_ref(k_it)] (without a reference, Σ_t log π_E(k_it));
    L_E = Σ_ij W_ij softplus(−β (ℓ_i − ℓ_j)) / Σ_ij W_ij with W_ij = |S_i − S_j| for S_i > S_j + margin.
    A group without any ordered pair gives 0 loss and `has_pairs = 0` (the caller averages over groups with pairs);
    a group with a NaN/inf score gives a NaN loss (for the train step's non-finite guard to skip the update).

    Args: logp, ref_logp: f32[G, T] log-probs of the chosen strategies; turn_mask: bool[G, T]; scores: f32[G].
    """
    chex.assert_rank([logp, turn_mask, scores], [2, 2, 1])
    chex.assert_equal_shape([logp, turn_mask])
    delta = logp if ref_logp is None else logp - ref_logp
    ell = jnp.sum(jnp.where(turn_mask, delta, 0.0), axis=-1)
    weights = pairwise_preference_weights(scores, margin=margin)
    pair_loss = jax.nn.softplus(-beta_pref * (ell[:, None] - ell[None, :]))
    total_weight = jnp.sum(weights)
    loss = jnp.sum(weights * pair_loss) / jnp.maximum(total_weight, 1e-12)
    has_pairs = total_weight > 0
    pref_acc = jnp.sum(jnp.where(weights > 0, (ell[:, None] > ell[None, :]).astype(jnp.float32), 0.0)) / jnp.maximum(
        jnp.sum(weights > 0), 1)
    # NaN compares False, so a NaN score would drop out of every pair and the group would train on the rest.
    loss = jnp.where(jnp.all(jnp.isfinite(scores)), jnp.where(has_pairs, loss, 0.0), jnp.nan)
    return loss, {"has_pairs": has_pairs.astype(jnp.float32), "preference_accuracy": pref_acc}


def clipped_surrogate(logp: Array, old_logp: Array, advantages: Array, mask: Array, *, clip_eps: float
                      ) -> tuple[Array, Array, Array]:
    """Per-element PPO surrogate −min(r·A, clip(r)·A) with r = exp(logp − old_logp); also returns clip indicators
    and the ratio. Shapes are any, all equal; masked elements give 0."""
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    ratio = jnp.exp(jnp.where(mask, logp - old_logp, 0.0))
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -jnp.minimum(unclipped, clipped)
    was_clipped = (jnp.abs(ratio - 1.0) > clip_eps) & mask
    return jnp.where(mask, loss, 0.0), was_clipped, ratio


def expert_clipped_pg_loss(logp: Array, old_logp: Array, turn_mask: Array, scores: Array, kl: Array | None, *,
                           clip_eps: float, beta: float) -> tuple[Array, dict[str, Array]]:
    """The alternative expert loss: A_i = group-normalised S_i on every EA decision of τ_i, PPO clipping against the
    rollout policy, plus β·KL(π_E ‖ π_ref) (exact over strategies, per decision). Mean over the group's decisions."""
    chex.assert_rank([logp, old_logp, turn_mask, scores], [2, 2, 2, 1])
    adv = jnp.broadcast_to(group_normalise(scores)[:, None], logp.shape)
    per_dec, was_clipped, _ = clipped_surrogate(logp, old_logp, adv, turn_mask, clip_eps=clip_eps)
    n = jnp.maximum(jnp.sum(turn_mask), 1)
    loss = jnp.sum(per_dec) / n
    if kl is not None:
        loss = loss + beta * jnp.sum(jnp.where(turn_mask, kl, 0.0)) / n
    return loss, {"expert_clip_fraction": jnp.sum(was_clipped) / n}


def cs_turn_rewards(aligned: Array, sop_valid: Array, quality: Array, scores: Array, mu: Array, *,
                    lambda_s: float) -> Array:
    """r^C_it = a_it · v_it · (q_it + λ_S · S_i) − μ · (1 − a_it): f32[G, T]."""
    chex.assert_rank([aligned, sop_valid, quality, scores, mu], [2, 2, 2, 1, 0])
    chex.assert_equal_shape([aligned, sop_valid, quality])
    return aligned * sop_valid * (quality + lambda_s * scores[:, None]) - mu * (1.0 - aligned)


def normalise_over_valid(values: Array, mask: Array, *, eps: float = 1e-6) -> Array:
    """(x − mean)/(std + eps) over the valid entries of one group; zeros when they do not vary, NaN on every valid
    entry when one of them is NaN/inf."""
    chex.assert_equal_shape([values, mask])
    n = jnp.maximum(jnp.sum(mask), 1)
    mean = jnp.sum(jnp.where(mask, values, 0.0)) / n
    var = jnp.sum(jnp.where(mask, (values - mean) ** 2, 0.0)) / n
    std = jnp.sqrt(var)
    out = (values - mean) / (std + eps)
    # Written so that a NaN std is not "constant": `std > 1e-6` is False for NaN and would turn a NaN reward into
    # zero advantages, a finite update the train step's non-finite guard could not see.
    constant = std <= 1e-6
    return jnp.where(mask & ~constant, out, 0.0)


def turn_to_token(per_turn: Array, token_turn: Array) -> Array:
    """Broadcast a per-turn quantity f32[T] to token slots via their turn index int32[L] (-1 -> 0)."""
    chex.assert_rank([per_turn, token_turn], [1, 1])
    return jnp.where(token_turn >= 0, per_turn[jnp.clip(token_turn, 0, per_turn.shape[0] - 1)], 0.0)


def k3_kl(logp: Array, ref_logp: Array, *, clamp: float = 10.0) -> Array:
    """Schulman's k3 estimator of KL(π ‖ π_ref) per sampled token, exp(ref − logp) − (ref − logp) − 1, clamped."""
    log_ratio = jnp.clip(ref_logp - logp, -clamp, clamp)
    return jnp.clip(jnp.exp(log_ratio) - log_ratio - 1.0, 0.0, clamp)


def aggregate_tokens(values: Array, mask: Array, mode: str) -> Array:
    """Loss aggregation over f32[B, L]: 'token-mean' (all tokens equal) or 'seq-mean-token-mean'."""
    chex.assert_rank([values, mask], [2, 2])
    values = jnp.where(mask, values, 0.0)
    if mode == "token-mean":
        return jnp.sum(values) / jnp.maximum(jnp.sum(mask), 1)
    if mode == "seq-mean-token-mean":
        per_seq = jnp.sum(values, -1) / jnp.maximum(jnp.sum(mask, -1), 1)
        has = jnp.any(mask, -1)
        return jnp.sum(jnp.where(has, per_seq, 0.0)) / jnp.maximum(jnp.sum(has), 1)
    raise ValueError(f"unknown loss aggregation {mode!r}; use 'token-mean' or 'seq-mean-token-mean'")


def cs_policy_loss(logp: Array, old_logp: Array, ref_logp: Array | None, advantages: Array, mask: Array, *,
                   clip_eps: float, beta: float, aggregation: str, kl_clamp: float = 10.0
                   ) -> tuple[Array, dict[str, Array]]:
    """Token-level PPO-clipped policy gradient on the CS reply tokens with β·k3-KL to the reference: f32[B, L] inputs."""
    chex.assert_equal_shape([logp, old_logp, advantages, mask])
    per_tok, was_clipped, ratio = clipped_surrogate(logp, old_logp, advantages, mask, clip_eps=clip_eps)
    loss = aggregate_tokens(per_tok, mask, aggregation)
    n = jnp.maximum(jnp.sum(mask), 1)
    metrics = {"cs_clip_fraction": jnp.sum(was_clipped) / n,
               "cs_ratio_mean": jnp.sum(jnp.where(mask, ratio, 0.0)) / n,
               "cs_approx_kl_old": jnp.sum(jnp.where(mask, old_logp - logp, 0.0)) / n}
    if ref_logp is not None:
        kl = k3_kl(logp, ref_logp, clamp=kl_clamp)
        kl_mean = aggregate_tokens(kl, mask, aggregation)
        loss = loss + beta * kl_mean
        metrics["cs_kl_ref"] = jnp.sum(jnp.where(mask, kl, 0.0)) / n
    return loss, metrics


def update_multiplier(mu: Array, violation_rate: Array, *, lr: float, target: float) -> Array:
    """Dual ascent on the Lagrange multiplier: μ ← max(0, μ + η_μ (violation_rate − δ))."""
    chex.assert_rank([mu, violation_rate], [0, 0])
    return jnp.maximum(0.0, mu + lr * (violation_rate - target))


EXPERT_LOSSES: dict[str, Callable] = {"preference": expert_preference_loss, "clipped_pg": expert_clipped_pg_loss}


def get_expert_loss(name: str) -> Callable:
    if name not in EXPERT_LOSSES:
        raise ValueError(f"unknown expert_loss {name!r}; choose one of {sorted(EXPERT_LOSSES)}")
    return EXPERT_LOSSES[name]


# --- the hierarchical loss L = L_E(θ_E) + α · L_C(θ_C) over a batch of groups (GOPO.md §3) ---

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
    # The rollout's sampling: the losses' log-probs are those of the distributions it samples from (`scoring`).
    cs_sampling: SamplingDist = SamplingDist()
    expert_temperature: float = 1.0

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


@flax.struct.dataclass
class GOPOBatch:
    """What the hierarchical loss reads: the rolled-out groups (B = groups · G rows, a group's rows contiguous), the
    trajectory scores S f32[B], and the frozen reference's log-probs where a KL or the preference reference is on
    (`ref_expert_logp` f32[B, T, n_k], `ref_cs_logp` f32[B, L]; None when off, so no reference pass is made)."""

    traj: Trajectory
    scores: jax.Array
    ref_expert_logp: jax.Array | None = None
    ref_cs_logp: jax.Array | None = None


def _groups(x: jax.Array, g: int) -> jax.Array:
    return x.reshape(x.shape[0] // g, g, *x.shape[1:])


def _masked_mean(x, mask):
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def make_gopo_loss(expert_graphdef: Any, cs_graphdef: Any, layout: Layout, strategy_ids: tuple[int, ...],
                   hyper: GOPOHyper):
    g = hyper.group_size
    token_turn = layout.turn_of_position()
    expert_loss_fn = get_expert_loss(hyper.expert_loss)

    def loss_fn(params, extras, batch, rng):
        del rng
        traj = batch.traj
        scores = batch.scores
        mu = extras["mu"]
        metrics: dict[str, jax.Array] = {}
        loss_e = jnp.zeros((), jnp.float32)
        if hyper.use_expert:
            expert = nnx.merge(expert_graphdef, params["expert"])
            logp_all = scoring.expert_strategy_log_probs(expert, traj, layout, strategy_ids, sop_mask=hyper.sop_mask,
                                                         temperature=hyper.expert_temperature)
            logp = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
            ref_all = batch.ref_expert_logp
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
                kl = strategy_kl(logp_all, ref_all, allowed) if hyper.beta_expert > 0 else None
                per_group, aux = jax.vmap(lambda l, o, m, s, k: expert_loss_fn(
                    l, o, m, s, k, clip_eps=hyper.clip_eps, beta=hyper.beta_expert))(
                    _groups(logp, g), _groups(traj.ea_logprob, g), _groups(traj.turn_mask, g), _groups(scores, g),
                    None if kl is None else _groups(kl, g))
                loss_e = jnp.mean(per_group)
                metrics["expert_clip_fraction"] = jnp.mean(aux["expert_clip_fraction"])
            metrics["expert_entropy"] = _masked_mean(strategy_entropy(logp_all, allowed), traj.turn_mask)
            if ref_all is not None:
                metrics["expert_kl_ref"] = _masked_mean(strategy_kl(logp_all, ref_all, allowed), traj.turn_mask)
            metrics["expert_ratio_mean"] = _masked_mean(jnp.exp(logp - traj.ea_logprob), traj.turn_mask)

        cs = nnx.merge(cs_graphdef, params["cs"])
        cs_logp, cs_entropy = scoring.cs_token_log_probs(cs, traj, layout, hyper.cs_sampling)
        # Without an EA there is no chosen strategy to be aligned with: every turn counts as aligned.
        aligned = traj.aligned if hyper.use_expert else jnp.ones_like(traj.aligned)
        rewards = jax.vmap(lambda a, v, q, s: cs_turn_rewards(a, v, q, s, mu, lambda_s=hyper.lambda_s))(
            _groups(aligned, g), _groups(traj.sop_valid, g), _groups(traj.quality, g), _groups(scores, g))
        adv_turn = jax.vmap(normalise_over_valid)(rewards, _groups(traj.turn_mask, g)).reshape(aligned.shape)
        adv_tok = jax.vmap(lambda a: turn_to_token(a, token_turn))(adv_turn)
        loss_c, cs_metrics = cs_policy_loss(
            cs_logp, traj.cs_logprob, batch.ref_cs_logp if hyper.needs_cs_reference else None, adv_tok,
            traj.cs_mask, clip_eps=hyper.clip_eps, beta=hyper.beta_cs, aggregation=hyper.aggregation,
            kl_clamp=hyper.kl_clamp)
        metrics.update(cs_metrics)
        metrics["cs_entropy"] = _masked_mean(cs_entropy, traj.cs_mask)

        violation = 1.0 - _masked_mean(aligned, traj.turn_mask)
        loss = loss_e + hyper.alpha * loss_c
        metrics.update(loss_expert=loss_e, loss_cs=loss_c, misalignment_rate=violation,
                       sop_violation_rate=1.0 - _masked_mean(traj.sop_valid, traj.turn_mask), mu=mu,
                       score_mean=jnp.mean(scores), score_std=jnp.std(scores),
                       zero_variance_groups=jnp.mean(jnp.ptp(_groups(scores, g), axis=1) <= 1e-6))
        return loss, (metrics, extras)

    return loss_fn


def make_dual_ascent(hyper: GOPOHyper):
    """`(extras, rollout trajectory) -> extras`: μ's dual-ascent step, once per iteration (GOPO.md §3), from the
    misalignment rate over the valid turns of the iteration's whole rollout.

    Once per iteration rather than per minibatch update: every update of an iteration reads the same rollout, so
    per-update steps would count the same evidence epochs × minibatches times (η_μ silently scaled by the number of
    updates) and let μ drift within one iteration on minibatch noise, while the constraint is about the policy
    that acted, whose violation rate the rollout measures once. Without an Expert every turn counts as aligned."""

    def end_iteration(extras: dict, traj) -> dict:
        if not (hyper.constraint and hyper.use_expert):
            return extras
        violation = 1.0 - _masked_mean(traj.aligned, traj.turn_mask)
        stepped = update_multiplier(extras["mu"], violation, lr=hyper.mu_lr, target=hyper.delta)
        # A non-finite `aligned` signal (the train step skipped those updates) must not poison μ: it keeps its value.
        return {**extras, "mu": jnp.where(jnp.isfinite(stepped), stepped, extras["mu"])}

    return end_iteration
