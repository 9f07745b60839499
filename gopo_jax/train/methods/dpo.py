"""DPO (GOPO.md §4): one agent (the CS), offline pairwise preferences between dialogues of the frozen SFT policy,
ranked by R_B (`algorithms.dpo`), at its own step size `baselines.dpo.lr` (see configs/baselines.py)."""
from __future__ import annotations

from gopo_jax.algorithms import dpo
from gopo_jax.train.methods.base import Method, MethodContext


def _reference(params, ref_params):
    # Offline: the preference data come from the frozen SFT policy, not from the policy being trained.
    del params
    return ref_params


def make_dpo(ctx: MethodContext) -> Method:
    s = ctx.settings("dpo")
    if not s.lr > 0:
        raise ValueError(f"baselines.dpo.lr must be > 0 (DPO's step size for the CS), got {s.lr}")
    if s.rpo_alpha < 0:
        raise ValueError(f"baselines.dpo.rpo_alpha must be >= 0 (0: plain DPO), got {s.rpo_alpha}")
    hyper = dpo.DPOHyper(group_size=ctx.config.train.group_size, beta=s.beta, margin=s.margin,
                         rpo_alpha=s.rpo_alpha)

    def prepare_batch(traj, ref_params, params):
        del params
        ref_seq = dpo.sequence_log_prob(ctx.reference_cs_log_probs(ref_params, traj), traj.cs_mask)
        return dpo.DPOBatch(traj=traj, rewards=ctx.business_rewards(traj), ref_seq_logp=ref_seq)

    return Method(name="dpo", use_expert=False, learning_rates={"expert": 0.0, "cs": s.lr},
                  make_agents=ctx.model_agents, loss=dpo.make_dpo_loss(ctx.cs_gd, ctx.world.layout, hyper),
                  prepare_batch=prepare_batch, rollout_params=_reference)
