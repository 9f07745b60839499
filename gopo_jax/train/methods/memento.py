"""Memento (GOPO.md §4): the frozen SFT Expert + CS, a case bank in the train state's extras and a soft-Q correction
of the SFT Expert's strategy choice, π ∝ π_SFT · exp(Q/α) (`algorithms.memento`); only the Q-MLP learns."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gopo_jax.algorithms import memento, ppo
from gopo_jax.dialogue import scoring
from gopo_jax.train.methods.base import Method, MethodContext


def make_memento(ctx: MethodContext) -> Method:
    s = ctx.settings("memento")
    cfg, w = ctx.config, ctx.world
    rows_per_step = cfg.train.groups * cfg.train.group_size // cfg.train.minibatches
    if s.bank_size < rows_per_step * w.layout.max_turns:
        raise ValueError(f"baselines.memento.bank_size={s.bank_size} cannot hold one train step's cases "
                         f"({rows_per_step} dialogues x {w.layout.max_turns} turns); raise it to at least "
                         f"{rows_per_step * w.layout.max_turns}")
    if not s.alpha > 0:
        raise ValueError(f"baselines.memento.alpha must be > 0 (the KL weight: π ∝ π_SFT · exp(Q/α)), got {s.alpha}")
    sop = w.spec.sop
    hyper = memento.MementoHyper(
        num_strategies=sop.num_strategies, num_stages=len(sop.stages), max_turns=w.layout.max_turns, top_k=s.top_k,
        retrieval_temperature=s.retrieval_temperature, alpha=s.alpha, gamma=s.gamma, shaping=s.shaping,
        steps_per_iteration=cfg.train.epochs * cfg.train.minibatches, write_steps=cfg.train.minibatches)
    embed_dim = w.expert_config.hidden_size + hyper.num_stages + 1  # the frozen Expert embeds the states

    def init_q(key):
        return {"q": memento.init_q_params(key, embed_dim + 2 * hyper.num_strategies, s.hidden, hyper.num_strategies)}

    def init_extras():
        bank = memento.CaseBank.empty(s.bank_size, embed_dim, hyper.num_strategies)
        return {**bank.to_extras(), "memento_updates": jnp.zeros((), jnp.int32)}

    def acting_params(params, extras):
        return {**params, "bank": {k: extras[k] for k in memento.BANK_KEYS}}

    def make_agents(sampling):
        # The frozen SFT Expert embeds states and decides, its strategy logits shifted by Q/α, under the run's SOP
        # mask and greedy/sampling setting.
        inner = ctx.model_agents(dataclasses.replace(sampling, use_expert=True))
        return memento.MementoAgents(inner=inner, hyper=hyper, stage_ids=w.vocab.stage_ids)

    def prepare_batch(traj, ref_params, params):
        emb = memento.trajectory_state_embeddings(traj, w.layout, w.vocab.stage_ids,
                                                  memento.embedding_table(params["expert"]),
                                                  num_stages=hyper.num_stages)
        rewards = jax.vmap(lambda g, m, f: ppo.shaped_turn_rewards(g, m, f, shaping=hyper.shaping))(
            traj.gain, traj.turn_mask, ctx.business_rewards(traj))
        # ρ = log π − log π_SFT of each strategy taken: the KL term of the soft return (π_SFT: the frozen Expert).
        sft_logp = scoring.chosen(ctx.reference_expert_log_probs(ref_params, traj), traj.strategy, traj.turn_mask)
        log_ratio = jnp.where(traj.turn_mask, traj.ea_logprob - sft_logp, 0.0)
        targets = jax.vmap(lambda r, lr, m: memento.soft_q_targets(r, lr, m, gamma=hyper.gamma, alpha=hyper.alpha))(
            rewards, log_ratio, traj.turn_mask)
        return memento.MementoBatch(emb=emb, strategy=traj.strategy, target=targets, turn_mask=traj.turn_mask)

    # The LLM agents are frozen: a zero step size with zero weight decay leaves them bit-for-bit unchanged.
    return Method(name="memento", use_expert=True, learning_rates={"expert": 0.0, "cs": 0.0, "q": s.lr_q},
                  make_agents=make_agents, loss=memento.make_memento_loss(hyper), prepare_batch=prepare_batch,
                  init_extra_params=init_q, init_extras=init_extras, acting_params=acting_params)
