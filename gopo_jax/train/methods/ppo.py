"""PPO (GOPO.md §4): one agent (the CS) with a separate value model; token-level GAE on R_B plus per-turn shaping
(`algorithms.ppo`)."""
from __future__ import annotations

from flax import nnx

from gopo_jax.algorithms import ppo
from gopo_jax.train.methods.base import Method, MethodContext


def make_ppo(ctx: MethodContext) -> Method:
    s = ctx.settings("ppo")
    hyper = ppo.PPOHyper(clip_eps=s.clip_eps, beta=s.beta, kl_clamp=s.kl_clamp, aggregation=s.aggregation,
                         gamma=s.gamma, lam=s.lam, shaping=s.shaping, vf_coef=s.vf_coef, value_clip=s.value_clip,
                         normalize_advantages=s.normalize_advantages, sampling=ctx.hyper.cs_sampling)
    value_config = ctx.world.model_config.replace(num_layers=s.value_layers)
    # The graph definition does not depend on the initialisation key: take it from an abstract model.
    value_gd = nnx.split(nnx.eval_shape(lambda: ppo.ValueModel(value_config, rngs=nnx.Rngs(0))), nnx.Param)[0]
    token_turn = ctx.world.layout.turn_of_position()

    def init_value(key):
        return {"value": nnx.split(ppo.ValueModel(value_config, rngs=nnx.Rngs(key)), nnx.Param)[1]}

    def prepare_batch(traj, ref_params, params):
        values = ppo.trajectory_values(nnx.merge(value_gd, params["value"]), traj)
        targets = ppo.ppo_targets(values, traj, ctx.business_rewards(traj), token_turn, hyper)
        return ppo.PPOBatch(traj=traj, **targets,
                            ref_cs_logp=ctx.reference_cs_log_probs(ref_params, traj) if hyper.beta > 0 else None)

    return Method(name="ppo", use_expert=False,
                  learning_rates={"expert": 0.0, "cs": ctx.config.train.lr_cs, "value": s.lr_value},
                  make_agents=ctx.model_agents, loss=ppo.make_ppo_loss(ctx.cs_gd, value_gd, ctx.world.layout, hyper),
                  prepare_batch=prepare_batch, init_extra_params=init_value)
