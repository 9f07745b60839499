"""GRPO (GOPO.md §4): one agent (the CS, no Expert), group-relative advantages on R_B (`algorithms.grpo`)."""
from __future__ import annotations

from gopo_jax.algorithms import grpo
from gopo_jax.train.methods.base import Method, MethodContext


def make_grpo(ctx: MethodContext) -> Method:
    s = ctx.settings("grpo")
    hyper = grpo.GRPOHyper(group_size=ctx.config.train.group_size, clip_eps=s.clip_eps, beta=s.beta,
                           kl_clamp=s.kl_clamp, aggregation=s.aggregation, sampling=ctx.hyper.cs_sampling)

    def prepare_batch(traj, ref_params, params):
        del params
        return grpo.GRPOBatch(traj=traj, rewards=ctx.business_rewards(traj),
                              ref_cs_logp=ctx.reference_cs_log_probs(ref_params, traj) if s.beta > 0 else None)

    return Method(name="grpo", use_expert=False, learning_rates={"expert": 0.0, "cs": ctx.config.train.lr_cs},
                  make_agents=ctx.model_agents,
                  loss=grpo.make_grpo_loss(ctx.cs_gd, ctx.world.layout, hyper), prepare_batch=prepare_batch)
