"""DPO (GOPO.md §4): one agent (the CS), offline pairwise preferences between dialogues of the frozen SFT policy,
ranked by R_B (`algorithms.dpo`)."""
from __future__ import annotations

from gopo_jax.algorithms import dpo
from gopo_jax.train.methods.base import Method, MethodContext


def _reference(params, ref_params):
    # Offline: the preference data come from the frozen SFT policy, not from the policy being trained.
    del params
    return ref_params


def make_dpo(ctx: MethodContext) -> Method:
    s = ctx.settings("dpo")
    hyper = dpo.DPOHyper(group_size=ctx.config.train.group_size, beta=s.beta, margin=s.margin)

    def prepare_batch(traj, ref_params, params):
        del params
        ref_seq = dpo.sequence_log_prob(ctx.reference_cs_log_probs(ref_params, traj), traj.cs_mask)
        return dpo.DPOBatch(traj=traj, rewards=ctx.business_rewards(traj), ref_seq_logp=ref_seq)

    return Method(name="dpo", use_expert=False, learning_rates={"expert": 0.0, "cs": ctx.config.train.lr_cs},
                  make_agents=ctx.model_agents, loss=dpo.make_dpo_loss(ctx.cs_gd, ctx.world.layout, hyper),
                  prepare_batch=prepare_batch, rollout_params=_reference)
