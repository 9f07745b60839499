"""GOPO (GOPO.md §3): both agents act; the hierarchical loss over groups, scored by S = ESNDCG + λ_B R_B, with the
frozen warm start as the KL / preference reference where one is on."""
from __future__ import annotations

import jax.numpy as jnp

from gopo_jax.algorithms.gopo import GOPOBatch, make_dual_ascent, make_gopo_loss
from gopo_jax.train.methods.base import Method, MethodContext


def make_gopo(ctx: MethodContext) -> Method:
    hyper, t = ctx.hyper, ctx.config.train
    expert_reference = hyper.needs_expert_reference
    cs_reference = hyper.needs_cs_reference

    def prepare_batch(traj, ref_params, params):
        del params
        return GOPOBatch(
            traj=traj, scores=ctx.scores(traj)[0],
            ref_expert_logp=ctx.reference_expert_log_probs(ref_params, traj) if expert_reference else None,
            ref_cs_logp=ctx.reference_cs_log_probs(ref_params, traj) if cs_reference else None)

    mu_init = float(ctx.config.gopo.mu_init)
    return Method(
        name="gopo", use_expert=hyper.use_expert, learning_rates={"expert": t.lr_expert, "cs": t.lr_cs},
        make_agents=ctx.model_agents,
        loss=make_gopo_loss(ctx.expert_gd, ctx.cs_gd, ctx.world.layout, ctx.world.vocab.strategy_ids, hyper),
        prepare_batch=prepare_batch, init_extras=lambda: {"mu": jnp.float32(mu_init)},
        end_iteration=make_dual_ascent(hyper))
