"""GOPO's losses by value: L_E, L_C, L = L_E + α·L_C and the dual ascent on μ (GOPO.md §3) against an independent
NumPy implementation written from the spec, on a real rollout of the tiny synthetic shop.

The batch is off-policy and off-reference on purpose: the loss is evaluated with parameters perturbed away from the
rollout's (PPO ratios != 1, some of them clipped) and the reference is perturbed another way (KL != 0), so every
branch of the formulas carries weight. The NumPy side reads only raw per-slot arrays (log-probs of every strategy
and of the CS tokens under the current, rollout and reference policies, masks, per-turn a/v/q, S_i, μ and the
hyper-parameters); it picks the chosen strategies, pairs, advantages and token turns itself.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.algorithms.gopo import make_gopo_loss
from gopo_jax.train.build import build
from gopo_jax.train.phases import Phases
from tests.helpers import tiny_run_config

GROUPS, G = 2, 4  # 4 dialogues per group: 6 ordered pairs per group for the preference loss
MU = 0.3  # μ > 0, so the −μ·(1 − a) term of r^C is live
CLIP_EPS = 0.05  # small enough that the perturbation below pushes some ratios past it
PERTURB = 0.3  # noise std relative to each parameter leaf's own std
RTOL, ATOL = 1e-5, 1e-6


def _config():
    c = tiny_run_config()
    with c.unlocked():
        c.sft.episodes, c.eval.episodes = 16, 8
        c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = GROUPS, G, 2, 2
        c.gopo.clip_eps = CLIP_EPS
        c.gopo.mu_init = MU
        assert c.gopo.beta_cs > 0 and c.gopo.constraint  # the CS KL and the Lagrange constraint are on
    return c


def _perturb(params, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + PERTURB * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(components, current params, reference params, rollout, loss batch, raw NumPy inputs)."""
    comps = build(_config(), tmp_path_factory.mktemp("by_value"))
    rollout_params = comps.init_params(0)
    episodes = comps.world.group_episodes(jax.random.key(0), GROUPS, G)
    traj = jax.jit(comps.rollout)(rollout_params, episodes, jax.random.key(1))
    # An untrained CS realises no strategy (every turn misaligned), so every r^C would be −μ and every CS advantage
    # 0. The per-turn signals are inputs of the objective: give them variety; tokens and log-probs stay the rollout's.
    ka, kv, kq = jax.random.split(jax.random.key(2), 3)
    mask = traj.turn_mask.astype(jnp.float32)
    traj = traj.replace(aligned=jax.random.bernoulli(ka, 0.6, mask.shape).astype(jnp.float32) * mask,
                        sop_valid=jax.random.bernoulli(kv, 0.8, mask.shape).astype(jnp.float32) * mask,
                        quality=jax.random.uniform(kq, mask.shape) * mask)
    current = _perturb(rollout_params, jax.random.key(5))
    reference = _perturb(rollout_params, jax.random.key(6))
    prepare = jax.jit(comps.method.prepare_batch)
    batch = prepare(traj, reference, current)
    # The reference pass run with the current parameters gives the current policy's log-probs: the same scoring
    # the loss runs inside, read out as arrays for the NumPy side.
    current_logp = prepare(traj, current, current)
    layout = comps.world.layout
    raw = {k: np.asarray(v, np.float64) for k, v in {
        "expert_logp": current_logp.ref_expert_logp, "expert_ref_logp": batch.ref_expert_logp,
        "expert_old_logp": traj.ea_logprob, "cs_logp": current_logp.ref_cs_logp, "cs_ref_logp": batch.ref_cs_logp,
        "cs_old_logp": traj.cs_logprob, "aligned": traj.aligned, "sop_valid": traj.sop_valid,
        "quality": traj.quality, "scores": batch.scores}.items()}
    raw.update(strategy=np.asarray(traj.strategy), allowed=np.asarray(traj.allowed),
               turn_mask=np.asarray(traj.turn_mask), cs_mask=np.asarray(traj.cs_mask),
               context_len=layout.context_len, turn_width=layout.turn_width)
    return comps, current, reference, traj, batch, raw


# --- the NumPy side, from GOPO.md §3 (float64) ---

def _softplus(x):
    return np.logaddexp(0.0, x)


def _chosen(logp_all, strategy, turn_mask):
    """log π(k_t | x_t) of the strategy chosen on each valid turn, 0 on padded turns."""
    idx = np.where(turn_mask, strategy, 0)
    return np.where(turn_mask, np.take_along_axis(logp_all, idx[..., None], axis=-1)[..., 0], 0.0)


def _normalise(x, valid, eps=1e-6, atol=1e-6):
    """(x − mean)/(std + ε) over the valid entries, population std; 0 where they do not vary (docs/metrics.md
    "Group statistics": a zero-variance group gives exact zeros)."""
    v = x[valid]
    if v.size == 0 or np.ptp(v) <= atol:
        return np.zeros_like(x)
    return np.where(valid, (x - v.mean()) / (v.std() + eps), 0.0)


def _clipped_pg(ratio, adv, eps):
    """PPO surrogate −min(r·A, clip(r, 1 − ε, 1 + ε)·A) per element."""
    return -np.minimum(ratio * adv, np.clip(ratio, 1.0 - eps, 1.0 + eps) * adv)


def _aggregate(values, mask, mode):
    """§3 "loss aggregation mode": token-mean over every reply token, or the mean over dialogues (rows with reply
    tokens) of each dialogue's token mean."""
    if mode == "token-mean":
        return values[mask].sum() / mask.sum()
    rows = mask.any(-1)
    return np.mean([values[b][mask[b]].mean() for b in np.flatnonzero(rows)])


def numpy_expert_preference(raw, *, beta_pref, margin):
    """§3 Expert objective (preference): ℓ_i = Σ_t [log π_E(k_it) − log π_E^ref(k_it)];
    L_E = Σ_{S_i > S_j + margin} |S_i − S_j| softplus(−β_pref(ℓ_i − ℓ_j)) / Σ |S_i − S_j| per group, averaged over
    the groups that have an ordered pair (gopo.expert_preference_loss's docstring)."""
    m = raw["turn_mask"]
    ell = (_chosen(raw["expert_logp"], raw["strategy"], m)
           - _chosen(raw["expert_ref_logp"], raw["strategy"], m)).sum(-1)
    group_losses = []
    for g in range(GROUPS):
        s, e = raw["scores"][g * G:(g + 1) * G], ell[g * G:(g + 1) * G]
        num = den = 0.0
        for i in range(G):
            for j in range(G):
                if s[i] > s[j] + margin:
                    num += abs(s[i] - s[j]) * _softplus(-beta_pref * (e[i] - e[j]))
                    den += abs(s[i] - s[j])
        if den > 0:
            group_losses.append(num / den)
    return float(np.mean(group_losses)) if group_losses else 0.0


def numpy_expert_clipped_pg(raw, *, clip_eps, beta_expert):
    """§3 alternative expert_loss="clipped_pg": A_i = (S_i − mean_g S)/(std_g S + ε) on every EA decision of τ_i,
    PPO clipping against the rollout log-probs, plus β_E · KL(π_E ‖ π_E^ref) exact over the allowed strategies;
    mean over the group's decisions, then over groups."""
    m = raw["turn_mask"]
    ratio = np.exp(_chosen(raw["expert_logp"], raw["strategy"], m) - np.where(m, raw["expert_old_logp"], 0.0))
    allowed = raw["allowed"] & m[..., None]
    p = np.where(allowed, np.exp(raw["expert_logp"]), 0.0)
    kl = np.where(allowed, p * (raw["expert_logp"] - raw["expert_ref_logp"]), 0.0).sum(-1)
    group_losses = []
    for g in range(GROUPS):
        rows = slice(g * G, (g + 1) * G)
        adv = _normalise(raw["scores"][rows], np.ones(G, bool))
        gm = m[rows]
        pg = _clipped_pg(ratio[rows], np.broadcast_to(adv[:, None], gm.shape), clip_eps)[gm]
        group_losses.append((pg.sum() + beta_expert * kl[rows][gm].sum()) / gm.sum())
    return float(np.mean(group_losses))


def numpy_cs(raw, mu, *, lambda_s, clip_eps, beta_cs, kl_clamp, aggregation):
    """§3 CS objective: r^C_it = a·v·(q + λ_S·S_i) − μ·(1 − a), normalised over the valid turns of each group; each
    reply token takes its turn's advantage; token-level PPO clipping against the rollout log-probs plus
    β_C · k3 KL to the reference (k3 = e^x − x − 1 with x = log π_ref − log π, x and k3 clamped to ±clamp / [0,
    clamp]); both terms aggregated by `aggregation`. Returns (L_C, k3 token mean, ratio token mean)."""
    m = raw["turn_mask"]
    a = raw["aligned"]
    reward = a * raw["sop_valid"] * (raw["quality"] + lambda_s * raw["scores"][:, None]) - mu * (1.0 - a)
    adv_turn = np.concatenate([_normalise(reward[g * G:(g + 1) * G], m[g * G:(g + 1) * G]) for g in range(GROUPS)])
    cs_mask = raw["cs_mask"]
    positions = np.arange(cs_mask.shape[1])
    turn_of_pos = np.where(positions >= raw["context_len"], (positions - raw["context_len"]) // raw["turn_width"], -1)
    assert np.all(turn_of_pos[cs_mask.any(0)] >= 0)  # reply tokens never sit in the context prefix
    adv_tok = np.where(cs_mask, adv_turn[:, np.clip(turn_of_pos, 0, None)], 0.0)
    ratio = np.exp(np.where(cs_mask, raw["cs_logp"] - raw["cs_old_logp"], 0.0))
    pg = _clipped_pg(ratio, adv_tok, clip_eps)
    x = np.clip(raw["cs_ref_logp"] - raw["cs_logp"], -kl_clamp, kl_clamp)
    k3 = np.clip(np.exp(x) - x - 1.0, 0.0, kl_clamp)
    loss = _aggregate(pg, cs_mask, aggregation) + beta_cs * _aggregate(k3, cs_mask, aggregation)
    return loss, k3[cs_mask].mean(), ratio[cs_mask].mean()


def numpy_gopo(raw, mu, hyper):
    """§3 Hierarchical loss: L = L_E + α · L_C."""
    if hyper.expert_loss == "preference":
        loss_e = numpy_expert_preference(raw, beta_pref=hyper.beta_pref, margin=hyper.pref_margin)
    else:
        loss_e = numpy_expert_clipped_pg(raw, clip_eps=hyper.clip_eps, beta_expert=hyper.beta_expert)
    loss_c, kl, ratio = numpy_cs(raw, mu, lambda_s=hyper.lambda_s, clip_eps=hyper.clip_eps, beta_cs=hyper.beta_cs,
                                 kl_clamp=hyper.kl_clamp, aggregation=hyper.aggregation)
    return {"loss_expert": loss_e, "loss_cs": loss_c, "total": loss_e + hyper.alpha * loss_c, "cs_kl_ref": kl,
            "cs_ratio_mean": ratio}


def _misalignment_rate(aligned, turn_mask) -> float:
    """§3: the violation rate of the dual ascent, the misalignment rate over the valid turns of the whole rollout."""
    aligned, turn_mask = np.asarray(aligned, np.float64), np.asarray(turn_mask)
    return 1.0 - aligned[turn_mask].sum() / turn_mask.sum()


# --- the tests ---

def test_batch_is_off_policy_and_off_reference(setup):
    """The by-value comparisons below would prove little on an on-policy batch: check the regime they run in."""
    _, _, _, _, _, raw = setup
    m, cm = raw["turn_mask"], raw["cs_mask"]
    cs_ratio = np.exp(raw["cs_logp"] - raw["cs_old_logp"])[cm]
    ea_ratio = np.exp(_chosen(raw["expert_logp"], raw["strategy"], m) - raw["expert_old_logp"])[m]
    assert np.max(np.abs(ea_ratio - 1.0)) > 1e-2
    clipped = np.abs(cs_ratio - 1.0) > CLIP_EPS
    assert 0.0 < clipped.mean() < 1.0, clipped.mean()  # both branches of the PPO min are taken
    assert np.mean(np.abs(raw["cs_ref_logp"] - raw["cs_logp"])[cm]) > 1e-2  # KL(π_C ‖ π_C^ref) != 0
    ell = (_chosen(raw["expert_logp"], raw["strategy"], m) - _chosen(raw["expert_ref_logp"], raw["strategy"], m))
    assert np.max(np.abs(ell.sum(-1))) > 1e-2  # ℓ_i != 0
    assert 0.0 < raw["aligned"][m].mean() < 1.0 and np.ptp(raw["scores"]) > 0


CASES = {  # (expert_loss, aggregation, other GOPOHyper fields); the first is the default config
    "preference-token-mean": ("preference", "token-mean", {}),
    "preference-seq-mean-token-mean-margin": ("preference", "seq-mean-token-mean", {"pref_margin": 0.05, "alpha": 0.7}),
    "clipped_pg-token-mean": ("clipped_pg", "token-mean", {"beta_expert": 0.05}),
}


def _hyper(comps, case):
    expert_loss, aggregation, overrides = CASES[case]
    return dataclasses.replace(comps.hyper, expert_loss=expert_loss, aggregation=aggregation, **overrides)


@pytest.fixture(scope="module")
def jax_losses(setup):
    """case -> (L, metrics) of the JAX loss at the current parameters; every case in one jit, whose common
    subexpressions (the agents' forward passes) XLA computes once."""
    comps, current, _, _, batch, _ = setup
    fns = {case: make_gopo_loss(comps.expert_gd, comps.cs_gd, comps.world.layout, comps.world.vocab.strategy_ids,
                                _hyper(comps, case)) for case in CASES}

    def all_cases(params, mu, batch):
        out = {}
        for case, fn in fns.items():
            loss, (metrics, _) = fn(params, {"mu": mu}, batch, None)
            out[case] = (loss, metrics)
        return out

    return jax.device_get(jax.jit(all_cases)(current, jnp.float32(MU), batch))


@pytest.mark.parametrize("case", list(CASES))
def test_gopo_loss_by_value(setup, jax_losses, case):
    comps, _, _, _, _, raw = setup
    hyper = _hyper(comps, case)
    assert hyper.beta_cs > 0 and hyper.constraint and hyper.clip_eps == CLIP_EPS
    if hyper.expert_loss == "preference" and hyper.pref_margin > 0:  # the margin must drop some pairs, not all
        s = raw["scores"].reshape(GROUPS, G)
        gaps = (s[:, :, None] - s[:, None, :])[s[:, :, None] > s[:, None, :]]
        assert np.any(gaps <= hyper.pref_margin) and np.any(gaps > hyper.pref_margin)
    loss, metrics = jax_losses[case]
    expected = numpy_gopo(raw, MU, hyper)
    got = {"loss_expert": metrics["loss_expert"], "loss_cs": metrics["loss_cs"], "total": loss,
           "cs_kl_ref": metrics["cs_kl_ref"], "cs_ratio_mean": metrics["cs_ratio_mean"]}
    for name, want in expected.items():
        np.testing.assert_allclose(float(got[name]), want, rtol=RTOL, atol=ATOL, err_msg=name)
    np.testing.assert_allclose(float(metrics["misalignment_rate"]),
                               _misalignment_rate(raw["aligned"], raw["turn_mask"]), rtol=RTOL, atol=ATOL)
    assert abs(expected["loss_expert"]) > 1e-3 and abs(expected["loss_cs"]) > 1e-3  # neither side is trivially 0


def test_mu_dual_ascent_once_per_iteration(setup):
    """§3: "The multiplier is updated by dual ascent once per iteration, from that iteration's rollout violation
    rate: μ ← max(0, μ + η_μ · (violation_rate − δ))" — one update after E epochs × M minibatches, from the
    misalignment rate over the valid turns of the whole rollout, and the same μ in every minibatch's loss."""
    comps, current, reference, traj, _, _ = setup
    t, g = comps.config.train, comps.config.gopo
    assert t.epochs * t.minibatches > 1  # several updates per iteration: per-minibatch ascent would differ
    phases = Phases(comps)
    state = phases.method_state(current, comps.method.init_extras(), comps.config.seed)
    mu_old = float(state.extras["mu"])
    assert mu_old == np.float32(MU)
    new_state, stats, _ = jax.jit(phases.update)(state, reference, traj, comps.config.seed, 0)
    violation = _misalignment_rate(traj.aligned, traj.turn_mask)
    expected = max(0.0, mu_old + g.mu_lr * (violation - g.delta))
    assert abs(expected - mu_old) > 1e-3  # the update moves μ
    np.testing.assert_allclose(float(new_state.extras["mu"]), expected, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(stats["mu"]), np.full((t.epochs, t.minibatches), mu_old), rtol=RTOL)
