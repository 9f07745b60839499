"""The baselines of GOPO.md §4 as methods of the one run pipeline (`config.method`), sharing its world, warm start,
rollouts, rewards, train step, evaluation and checkpoints; each is its objective plus what it rolls out:

* `sft`     — the warm-start Expert + CS, no RL.
* `grpo`    — one agent (the CS, no Expert), group-relative advantages on R_B (`algorithms.grpo`).
* `ppo`     — one agent with a separate value model, token-level GAE on R_B + per-turn shaping (`algorithms.ppo`).
* `dpo`     — one agent, pairwise preferences between dialogues of the frozen SFT policy ranked by R_B
              (`algorithms.dpo`).
* `memento` — frozen SFT Expert + CS, a case bank in the train state's extras and a soft-Q case-selection policy
              (`algorithms.memento`); only the Q-MLP learns.
* `prompted` — not a method of this pipeline: a chat model behind an OpenAI-compatible endpoint as the CS of a host
              world, evaluated by `gopo_jax.clients.prompted_eval` (routed there by `gopo_jax.train.loop.train`).

The hyper-parameters are `config.baselines.<name>` (`configs/baselines.py`); the single-agent baselines train the
CS with `config.train.lr_cs` and the SFT reference is their KL / DPO reference.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.algorithms import dpo, grpo, memento, ppo
from gopo_jax.dialogue.rollout import ModelAgents
from gopo_jax.train.methods import Method, reference_log_probs, register


def _business_rewards(run, traj):
    return run.scores(traj)[2]  # (S, ESNDCG, R_B): the baselines optimise R_B


def _settings(run, name: str):
    if "baselines" not in run.config:
        raise ValueError(f"config.method={name!r} needs the config section 'baselines': call "
                         "configs.baselines.add_baseline_config(c) in the run config before it is locked")
    return run.config.baselines[name]


@register("sft")
class SFT(Method):
    trains = False


class _SingleAgent(Method):
    """One LLM agent: no Expert acts (the rollout writes no strategy token) and none is trained."""

    use_expert = False

    def __init__(self, run):
        super().__init__(run)
        self.settings = _settings(run, self.name)
        self._ref_cs_logp = jax.jit(lambda ref, traj: reference_log_probs(run, ref, traj, expert=False,
                                                                          cs=True)["ref_cs_logp"])

    def learning_rates(self) -> dict[str, float]:
        return {"expert": 0.0, "cs": self.run.config.train.lr_cs}


@register("grpo")
class GRPO(_SingleAgent):
    def make_loss(self):
        s = self.settings
        return grpo.make_grpo_loss(self.run.cs_gd, grpo.GRPOHyper(
            group_size=self.run.config.train.group_size, clip_eps=s.clip_eps, beta=s.beta, kl_clamp=s.kl_clamp,
            aggregation=s.aggregation))

    def prepare_batch(self, traj, ref_params, params):
        batch = {"traj": traj, "rewards": _business_rewards(self.run, traj)}
        if self.settings.beta > 0:
            batch["ref_cs_logp"] = self._ref_cs_logp(ref_params, traj)
        return batch


@register("ppo")
class PPO(_SingleAgent):
    def __init__(self, run):
        super().__init__(run)
        s = self.settings
        self.hyper = ppo.PPOHyper(clip_eps=s.clip_eps, beta=s.beta, kl_clamp=s.kl_clamp, aggregation=s.aggregation,
                                  gamma=s.gamma, lam=s.lam, shaping=s.shaping, vf_coef=s.vf_coef,
                                  value_clip=s.value_clip, normalize_advantages=s.normalize_advantages)
        self.value_config = run.world.model_config.replace(num_layers=s.value_layers)
        self.value_gd = None
        token_turn = run.world.layout.turn_of_position()

        def targets(value_params, traj, final_rewards):
            values = ppo.trajectory_values(nnx.merge(self.value_gd, value_params), traj)
            return ppo.ppo_targets(values, traj, final_rewards, token_turn, self.hyper)

        self._targets = jax.jit(targets)

    def extra_params(self, key):
        self.value_gd, value_params = nnx.split(ppo.ValueModel(self.value_config, rngs=nnx.Rngs(key)), nnx.Param)
        return {"value": value_params}

    def learning_rates(self):
        return {**super().learning_rates(), "value": self.settings.lr_value}

    def make_loss(self):
        return ppo.make_ppo_loss(self.run.cs_gd, self.value_gd, self.hyper)

    def prepare_batch(self, traj, ref_params, params):
        batch = {"traj": traj, **self._targets(params["value"], traj, _business_rewards(self.run, traj))}
        if self.hyper.beta > 0:
            batch["ref_cs_logp"] = self._ref_cs_logp(ref_params, traj)
        return batch


@register("dpo")
class DPO(_SingleAgent):
    def __init__(self, run):
        super().__init__(run)
        self._ref_seq_logp = jax.jit(lambda ref, traj: dpo.sequence_log_prob(self._ref_cs_logp(ref, traj),
                                                                             traj.cs_mask))

    def rollout_params(self, params, ref_params):
        # Offline: the preference data come from the frozen SFT policy, not from the policy being trained.
        return ref_params

    def make_loss(self):
        s = self.settings
        return dpo.make_dpo_loss(self.run.cs_gd, dpo.DPOHyper(group_size=self.run.config.train.group_size,
                                                              beta=s.beta, margin=s.margin))

    def prepare_batch(self, traj, ref_params, params):
        return {"traj": traj, "rewards": _business_rewards(self.run, traj),
                "ref_seq_logp": self._ref_seq_logp(ref_params, traj)}


@register("memento")
class Memento(Method):
    use_expert = True  # the frozen SFT Expert embeds states and decides when no case is retrieved

    def __init__(self, run):
        super().__init__(run)
        s = self.settings = _settings(run, "memento")
        cfg, w = run.config, run.world
        rows_per_step = cfg.train.groups * cfg.train.group_size // cfg.train.minibatches
        if s.bank_size < rows_per_step * w.layout.max_turns:
            raise ValueError(f"baselines.memento.bank_size={s.bank_size} cannot hold one train step's cases "
                             f"({rows_per_step} dialogues x {w.layout.max_turns} turns); raise it to at least "
                             f"{rows_per_step * w.layout.max_turns}")
        sop = w.spec.sop
        self.hyper = memento.MementoHyper(
            num_strategies=sop.num_strategies, num_stages=len(sop.stages), max_turns=w.layout.max_turns,
            top_k=s.top_k, retrieval_temperature=s.retrieval_temperature, alpha=s.alpha, gamma=s.gamma,
            shaping=s.shaping, steps_per_iteration=cfg.train.epochs * cfg.train.minibatches,
            write_steps=cfg.train.minibatches)
        self.embed_dim = w.model_config.hidden_size + self.hyper.num_stages + 1

        def prepare(params, traj, final_rewards):
            h = self.hyper
            emb = memento.trajectory_state_embeddings(traj, w.layout, w.vocab.stage_ids,
                                                      memento.embedding_table(params["expert"]),
                                                      num_stages=h.num_stages)
            rewards = jax.vmap(lambda g, m, f: ppo.shaped_turn_rewards(g, m, f, shaping=h.shaping))(
                traj.gain, traj.turn_mask, final_rewards)
            targets = jax.vmap(lambda r, lp, m: memento.soft_q_targets(r, lp, m, gamma=h.gamma, alpha=h.alpha))(
                rewards, traj.ea_logprob, traj.turn_mask)
            return {"emb": emb, "strategy": traj.strategy, "target": targets, "turn_mask": traj.turn_mask}

        self._prepare = jax.jit(prepare)

    def extra_params(self, key):
        q_in = self.embed_dim + 2 * self.hyper.num_strategies
        return {"q": memento.init_q_params(key, q_in, self.settings.hidden, self.hyper.num_strategies)}

    def learning_rates(self):
        # The LLM agents are frozen: a zero step size with zero weight decay leaves them bit-for-bit unchanged.
        return {"expert": 0.0, "cs": 0.0, "q": self.settings.lr_q}

    def init_extras(self):
        bank = memento.CaseBank.empty(self.settings.bank_size, self.embed_dim)
        return {**super().init_extras(), **bank.to_extras(), "memento_updates": jnp.zeros((), jnp.int32)}

    def acting_params(self, params, extras):
        return {**params, "bank": {k: extras[k] for k in memento.BANK_KEYS}}

    def make_agents(self, sampling):
        r = self.run
        inner = ModelAgents(r.expert_gd, r.cs_gd, r.world.vocab, r.world.layout,
                            dataclasses.replace(sampling, sop_mask=True, use_expert=True))
        return memento.MementoAgents(inner=inner, hyper=self.hyper, stage_ids=r.world.vocab.stage_ids,
                                     greedy=sampling.expert_greedy, sop_mask=sampling.sop_mask)

    def make_loss(self):
        return memento.make_memento_loss(self.hyper)

    def prepare_batch(self, traj, ref_params, params):
        return self._prepare(params, traj, _business_rewards(self.run, traj))
