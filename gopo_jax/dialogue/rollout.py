"""Rollout drivers: run batches of dialogues between agents and an environment into a `Trajectory`.

One agent turn (GOPO.md §1) is the same code for every driver:

1. the customer's utterance and the agent header (`<|agent|> <stage:σ>`) are appended to both agents' KV caches;
2. the Expert scores the strategy tokens at its decision position, masks them with the SOP (`M[σ]`, probability 0
   for disallowed strategies) and picks `k_t` (sample, or argmax for evaluation);
3. the CS reads `<s:k_t>` and writes the reply with the KV-cache sampler until its end-of-turn token;
4. the decision and the reply are appended to the Expert's cache (it reads the whole dialogue next turn);
5. the environment realises the reply, reacts as the customer and emits the per-turn signals.

For a pure-JAX environment the whole dialogue batch runs in one jitted `lax.scan` over turns (`rollout_jax`); for
a host environment, `rollout_host` runs a Python turn loop around the same jitted agent turn. Scripted agents (the
environment's reference policy, for demonstrations) go through the same buffer assembly, so SFT data and RL data
share one layout. Token-in-token-out: sampled ids are the record; only host environments see decoded text.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax import sampling
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.sop import UNRECOGNISED, masked_strategy_log_softmax
from gopo_jax.dialogue.env_protocol import JaxEnv, TurnSignals
from gopo_jax.models import heads, qwen3
from gopo_jax.models.chat_format import ChatFormat
from gopo_jax.models.tokenizer import stage_token, strategy_token


@dataclasses.dataclass(frozen=True)
class AgentVocab:
    """Token ids the drivers need; hashable (static under jit). The header of an agent turn is the chat template's
    generation prompt followed by the stage marker (`gopo_jax.models.chat_format`)."""

    header_open: tuple[int, ...]  # opens every agent turn (`<|agent|>`; Qwen3: "\n<|im_start|>assistant\n" + ...)
    eot: int  # end of turn: the CS stops on it
    pad: int
    stage_ids: tuple[int, ...]  # one marker token per SOP stage
    strategy_ids: tuple[int, ...]  # one marker token per strategy

    @property
    def header_len(self) -> int:
        return len(self.header_open) + 1

    @classmethod
    def from_tokenizer(cls, tokenizer, sop, stage_names=None, chat_format: ChatFormat | None = None) -> "AgentVocab":
        fmt = chat_format or ChatFormat.from_tokenizer(tokenizer)

        def one(tok: str) -> int:
            ids = tokenizer.convert_tokens_to_ids([tok])
            if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no token {tok!r}; it must be built with the world's marker tokens "
                                 "(gopo_jax.models.markers.add_markers)")
            return int(ids[0])

        return cls(header_open=fmt.assistant_open, eot=fmt.eot, pad=fmt.pad,
                   stage_ids=tuple(one(stage_token(s)) for s in (stage_names or sop.stages)),
                   strategy_ids=tuple(one(strategy_token(k)) for k in sop.strategies))


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the agents act. Evaluation uses `expert_greedy=True, temperature=0`."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    expert_greedy: bool = False
    expert_temperature: float = 1.0
    sop_mask: bool = True  # ablation "no SOP mask": the EA may pick any strategy
    use_expert: bool = True  # ablation "no EA": the CS writes replies with no strategy token
    # The deployment-time filter (GOPO.md §1): the CS draws `n_candidates` replies and keeps the first aligned,
    # SOP-valid one, else the most likely (`ModelAgents.act`). Candidate 0 is the reply drawn without the filter
    # (greedy in evaluation); candidates 1..n-1 are drawn at `candidate_temperature` (n greedy drafts would be one).
    n_candidates: int = 1
    candidate_temperature: float = 0.7


@flax.struct.dataclass
class TurnInput:
    customer: Any  # int32[B, Lc]
    customer_valid: Any  # bool[B, Lc]
    header: Any  # int32[B, Lh]
    header_valid: Any  # bool[B, Lh]
    allowed: Any  # bool[B, n_k]
    active: Any  # bool[B]
    env_state: Any  # batched env state (scripted agents read it); None for host envs


@flax.struct.dataclass
class TurnAction:
    strategy: Any  # int32[B]
    strategy_logp: Any  # f32[B]: log π_E(k_t | x_t) under the masked softmax (0 for scripted agents)
    decision_valid: Any  # bool[B]
    reply: Any  # int32[B, Lr]
    reply_valid: Any  # bool[B, Lr]
    reply_logp: Any  # f32[B, Lr]
    # bool[B]: the n-candidate filter kept a later candidate because the first failed the realisation check (aligned
    # and SOP-valid); None when no filter ran (n_candidates == 1, scripted agents), so the record has no such field.
    rescued: Any = None


@flax.struct.dataclass
class ModelAgentsState:
    """What the model agents carry between turns: their KV caches and the count of valid tokens (RoPE position)."""

    expert_cache: Any
    cs_cache: Any
    num_valid: Any  # int32[B]


def _positions(num_valid: jax.Array, valid: jax.Array) -> jax.Array:
    """Positions of a chunk appended after `num_valid` valid tokens (the buffer-wide `positions_from_valid`)."""
    return num_valid[:, None] + qwen3.positions_from_valid(valid)


@dataclasses.dataclass(frozen=True)
class ModelAgents:
    """The Expert + CS pair as a rollout policy. With `sampling.use_expert=False` (no-EA ablation, single-agent
    baselines) the Expert is not run and the CS writes replies with no strategy token."""

    expert_graphdef: Any
    cs_graphdef: Any
    vocab: AgentVocab
    layout: Layout
    sampling: SamplingConfig
    # R as the filter reads it: (reply int32[Lr], reply_valid bool[Lr]) -> the realised strategy int32[]. Needed
    # when sampling.n_candidates > 1; the pure-JAX rollouts bind the world's own (`bind_realiser`).
    realise: Callable | None = None

    def init(self, params, context, context_valid) -> ModelAgentsState:
        b = context.shape[0]
        cs = nnx.merge(self.cs_graphdef, params["cs"])
        pos = _positions(jnp.zeros((b,), jnp.int32), context_valid)
        # The context only fills the caches: nothing is predicted from it, so no logits.
        cs_cache = qwen3.init_cache(cs.config, b, self.layout.length)
        _, cs_cache = cs.hidden(context, pos, context_valid, cs_cache)
        expert_cache = None
        if self.sampling.use_expert:
            expert = nnx.merge(self.expert_graphdef, params["expert"])
            expert_cache = qwen3.init_cache(expert.config, b, self.layout.length)
            _, expert_cache = expert.hidden(context, pos, context_valid, expert_cache)
        return ModelAgentsState(expert_cache=expert_cache, cs_cache=cs_cache,
                                num_valid=context_valid.sum(-1).astype(jnp.int32))

    def act(self, params, carry: ModelAgentsState, inp: TurnInput, key, strategy_bias: jax.Array | None = None
            ) -> tuple[ModelAgentsState, TurnAction]:
        """One agent turn. `strategy_bias` f32[B, n_k] is added to the Expert's strategy logits before the SOP mask
        (Memento's soft-Q: π ∝ π_E · exp(Q/α)); the recorded log-prob is that of the biased policy."""
        cfg, vocab = self.sampling, self.vocab
        b = inp.customer.shape[0]
        k_expert, k_cs = jax.random.split(key)
        chunk = jnp.concatenate([inp.customer, inp.header], axis=1)
        chunk_valid = jnp.concatenate([inp.customer_valid, inp.header_valid], axis=1)
        pos = _positions(carry.num_valid, chunk_valid)
        n_after_chunk = carry.num_valid + chunk_valid.sum(-1).astype(jnp.int32)
        strategy_ids = jnp.asarray(vocab.strategy_ids, jnp.int32)
        expert_cache = carry.expert_cache
        if cfg.use_expert:
            expert = nnx.merge(self.expert_graphdef, params["expert"])
            h, expert_cache = expert.hidden(chunk, pos, chunk_valid, expert_cache)
            allowed = inp.allowed if cfg.sop_mask else jnp.ones_like(inp.allowed)
            # The decision is predicted from the chunk's last slot (the header's stage token), n_k rows only.
            strategy_logits = heads.row_logits(h[:, -1, :], expert.head_embedding(), strategy_ids)
            if strategy_bias is not None:
                strategy_logits = strategy_logits + strategy_bias
            logp_all = masked_strategy_log_softmax(strategy_logits, allowed)
            if cfg.expert_greedy:
                strategy = jnp.argmax(logp_all, axis=-1).astype(jnp.int32)
            else:
                strategy = jax.random.categorical(k_expert, logp_all / cfg.expert_temperature).astype(jnp.int32)
            # The log-prob under the distribution actually drawn from (tempered, still masked); T = 1 and the greedy
            # Expert record logp_all itself, bit for bit.
            # (A server passes a traced temperature: always the tempered form there.)
            untempered = cfg.expert_greedy or (isinstance(cfg.expert_temperature, (int, float))
                                               and cfg.expert_temperature == 1.0)
            drawn = (logp_all if untempered
                     else masked_strategy_log_softmax(logp_all / cfg.expert_temperature, allowed))
            strategy_logp = jnp.take_along_axis(drawn, strategy[:, None], axis=1)[:, 0]
            decision_valid = inp.active
        else:
            strategy = jnp.full((b,), UNRECOGNISED, jnp.int32)
            strategy_logp = jnp.zeros((b,), jnp.float32)
            decision_valid = jnp.zeros((b,), bool)
        decision_tok = jnp.where(decision_valid, strategy_ids[jnp.clip(strategy, 0)], vocab.pad)

        cs = nnx.merge(self.cs_graphdef, params["cs"])
        cs_chunk = jnp.concatenate([chunk, decision_tok[:, None]], axis=1)
        cs_valid = jnp.concatenate([chunk_valid, decision_valid[:, None]], axis=1)
        h, cs_cache = cs.hidden(cs_chunk, _positions(carry.num_valid, cs_valid), cs_valid, carry.cs_cache)
        # The reply is predicted from the last *valid* slot: the decision token, or the header without an EA.
        last_logits = cs.logits(jnp.where(decision_valid[:, None], h[:, -1, :], h[:, -2, :]))
        n_before_reply = n_after_chunk + decision_valid.astype(jnp.int32)
        decode = functools.partial(
            sampling.decode, cs, max_new_tokens=self.layout.reply_len, stop_tokens=jnp.asarray([vocab.eot], jnp.int32),
            pad_id=vocab.pad, top_k=cfg.top_k, top_p=cfg.top_p)
        max_lengths = jnp.where(inp.active, self.layout.reply_len, 0)
        prompt_cache = cs_cache
        reply, reply_logp, lengths, cs_cache = decode(prompt_cache, last_logits, k_cs, temperature=cfg.temperature,
                                                      start_positions=n_before_reply, max_lengths=max_lengths)
        rescued = None
        if cfg.n_candidates > 1:
            # Candidates 1..n-1 continue the same prompt cache, repeated candidate-major ([c * B + b]).
            m = cfg.n_candidates - 1
            more = decode(_repeat_rows(prompt_cache, m), jnp.tile(last_logits, (m, 1)), jax.random.fold_in(k_cs, 1),
                          temperature=cfg.candidate_temperature, start_positions=jnp.tile(n_before_reply, m),
                          max_lengths=jnp.tile(max_lengths, m))
            reply, reply_logp, lengths, cs_cache, rescued = self._filter(
                (reply, reply_logp, lengths, cs_cache), more, strategy, inp)
        reply_valid = jnp.arange(self.layout.reply_len)[None, :] < lengths[:, None]
        if cfg.use_expert:
            tail = jnp.concatenate([decision_tok[:, None], reply], axis=1)
            tail_valid = jnp.concatenate([decision_valid[:, None], reply_valid], axis=1)
            _, expert_cache = expert.hidden(tail, _positions(n_after_chunk, tail_valid), tail_valid, expert_cache)
        carry = ModelAgentsState(expert_cache=expert_cache, cs_cache=cs_cache,
                                 num_valid=n_before_reply + lengths.astype(jnp.int32))
        return carry, TurnAction(strategy=strategy, strategy_logp=strategy_logp, decision_valid=decision_valid,
                                 reply=reply, reply_valid=reply_valid,
                                 reply_logp=jnp.where(reply_valid, reply_logp, 0.0), rescued=rescued)

    def _filter(self, first, more, strategy, inp: TurnInput):
        """The n-candidate filter: of candidate 0 (`first`: the decode of B rows) and the others (`more`: the decode
        of (n-1)·B rows, candidate-major), keeps per row the first whose realised strategy k̂ = R(y) is aligned
        (k̂ == k_t; without an Expert, any recognised k̂, as the world counts it) and SOP-valid (M[σ_t][k̂]), else the
        most likely (largest sum of token log-probs). The kept reply's own cache rows become the CS cache, so the
        cache holds exactly what decoding that reply alone writes. -> (reply, logp, lengths, cache, rescued)."""
        if self.realise is None:
            raise ValueError("sampling.n_candidates > 1 needs the world's realisation check: ModelAgents.realise "
                             "(the pure-JAX rollouts bind it; host worlds do not support the filter)")
        n, b, lr = self.sampling.n_candidates, strategy.shape[0], self.layout.reply_len
        replies, logps, lengths = (jnp.concatenate([f, m], axis=0) for f, m in zip(first[:3], more[:3]))
        replies, logps = replies.reshape(n, b, lr), logps.reshape(n, b, lr)
        lengths = lengths.reshape(n, b)
        valid = jnp.arange(lr) < lengths[..., None]
        realised = jax.vmap(jax.vmap(self.realise))(replies, valid).astype(jnp.int32)
        chex.assert_shape(realised, (n, b))
        target = jnp.where(strategy >= 0, strategy, realised)
        sop_valid = (realised >= 0) & inp.allowed[jnp.arange(b)[None, :], jnp.clip(realised, 0)]
        passes = (realised == target) & (realised >= 0) & sop_valid
        most_likely = jnp.argmax(jnp.where(valid, logps, 0.0).sum(-1), axis=0)
        kept = jnp.where(passes.any(0), jnp.argmax(passes, axis=0), most_likely)
        rows = jnp.arange(b)
        cache = _select_rows(_concat_rows(first[3], more[3]), kept * b + rows)
        rescued = (kept > 0) & passes[kept, rows] & inp.active
        return replies[kept, rows], logps[kept, rows], lengths[kept, rows], cache, rescued

    def replay(self, params, carry: ModelAgentsState, inp: TurnInput, decision: jax.Array,
               decision_valid: jax.Array, reply: jax.Array, reply_valid: jax.Array) -> ModelAgentsState:
        """Appends a turn that already happened (the decision token int32[B] and the reply int32[B, Lr], e.g. a
        served conversation's history) to both caches, in the slots and chunks `act` writes them: the Expert reads
        [customer, header] then [decision, reply]; the CS reads [customer, header, decision] then the reply (as
        one chunk here, where `act` decodes it a token at a time). Nothing is predicted."""
        chunk = jnp.concatenate([inp.customer, inp.header], axis=1)
        chunk_valid = jnp.concatenate([inp.customer_valid, inp.header_valid], axis=1)
        n_after_chunk = carry.num_valid + chunk_valid.sum(-1).astype(jnp.int32)
        expert_cache = carry.expert_cache
        if self.sampling.use_expert:
            expert = nnx.merge(self.expert_graphdef, params["expert"])
            _, expert_cache = expert.hidden(chunk, _positions(carry.num_valid, chunk_valid), chunk_valid,
                                            expert_cache)
            tail = jnp.concatenate([decision[:, None], reply], axis=1)
            tail_valid = jnp.concatenate([decision_valid[:, None], reply_valid], axis=1)
            _, expert_cache = expert.hidden(tail, _positions(n_after_chunk, tail_valid), tail_valid, expert_cache)
        cs = nnx.merge(self.cs_graphdef, params["cs"])
        cs_chunk = jnp.concatenate([chunk, decision[:, None]], axis=1)
        cs_valid = jnp.concatenate([chunk_valid, decision_valid[:, None]], axis=1)
        _, cs_cache = cs.hidden(cs_chunk, _positions(carry.num_valid, cs_valid), cs_valid, carry.cs_cache)
        n_before_reply = n_after_chunk + decision_valid.astype(jnp.int32)
        _, cs_cache = cs.hidden(reply, _positions(n_before_reply, reply_valid), reply_valid, cs_cache)
        return ModelAgentsState(expert_cache=expert_cache, cs_cache=cs_cache,
                                num_valid=n_before_reply + reply_valid.sum(-1).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class ScriptedAgents:
    """A scripted policy of a pure-JAX environment in the rollout interface: the reference, the noisy SFT
    demonstrator and the report's random/greedy policies (`gopo_jax.envs.policies`) all play through these drivers.

    `policy(env_state, inp, key) -> (strategy int32[], reply int32[Lr], reply_valid bool[Lr])` is called per
    dialogue (vmapped over the batch), where `inp` is that dialogue's `TurnInput`: a policy reads `inp.allowed`
    (M[σ_t]) and, if it must, `inp.customer`/`inp.active`; everything else it needs is in the env state. Each dialogue
    draws from its own split of the turn's key.
    """

    policy: Callable
    vocab: AgentVocab
    emit_decision: bool = True  # False: demonstrations for a single agent (no strategy token in the buffer)

    def init(self, params, context, context_valid):
        return ()

    def act(self, params, carry, inp: TurnInput, key):
        b = inp.active.shape[0]
        strategy, reply, reply_valid = jax.vmap(self.policy)(inp.env_state, inp, jax.random.split(key, b))
        reply_valid = reply_valid & inp.active[:, None]
        return carry, TurnAction(strategy=strategy.astype(jnp.int32), strategy_logp=jnp.zeros((b,), jnp.float32),
                                 decision_valid=inp.active & self.emit_decision,
                                 reply=jnp.where(reply_valid, reply, self.vocab.pad), reply_valid=reply_valid,
                                 reply_logp=jnp.zeros(reply.shape, jnp.float32))


def _cache_map(fn_kv, fn_valid, *caches):
    """Maps the batch axis of KV caches (axis 1 of k/v, axis 0 of valid); the write index is shared."""
    c = caches[0]
    return c.replace(k=fn_kv(*(x.k for x in caches)), v=fn_kv(*(x.v for x in caches)),
                     valid=fn_valid(*(x.valid for x in caches)))


def _repeat_rows(cache, m: int):
    return _cache_map(lambda x: jnp.concatenate([x] * m, axis=1), lambda x: jnp.concatenate([x] * m, axis=0), cache)


def _concat_rows(a, b):
    return _cache_map(lambda x, y: jnp.concatenate([x, y], axis=1), lambda x, y: jnp.concatenate([x, y], axis=0),
                      a, b)


def _select_rows(cache, rows: jax.Array):
    return _cache_map(lambda x: x[:, rows], lambda x: x[rows], cache)


def _realised_strategy(env, reply: jax.Array, reply_valid: jax.Array) -> jax.Array:
    out = env.realise(reply, reply_valid)
    return out[0] if isinstance(out, tuple) else out  # the synthetic shop also returns product and value


def filters(agents) -> bool:
    """Whether `agents` (or the ModelAgents a method's agents wrap as `inner`, e.g. Memento's) run the n-candidate
    filter (and so record `rescued`)."""
    agents = getattr(agents, "inner", agents)
    return isinstance(agents, ModelAgents) and agents.sampling.n_candidates > 1


def bind_realiser(agents, env: JaxEnv):
    """`agents` with the pure-JAX world's realisation check for the n-candidate filter (others unchanged)."""
    if not isinstance(agents, ModelAgents) and isinstance(getattr(agents, "inner", None), ModelAgents):
        return dataclasses.replace(agents, inner=bind_realiser(agents.inner, env))
    if filters(agents) and agents.realise is None:
        return dataclasses.replace(agents, realise=functools.partial(_realised_strategy, env))
    return agents


def jax_env_layout(env: JaxEnv, vocab: AgentVocab) -> Layout:
    """The buffer layout of a pure-JAX environment: its own slot sizes and every turn up to T_max."""
    return Layout(context_len=env.context_len, customer_len=env.customer_len, header_len=vocab.header_len,
                  reply_len=env.reply_len, max_turns=env.spec.max_turns)


def make_header(vocab: AgentVocab, stage: jax.Array, active: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The generation prompt and `<stage:σ>` for each dialogue: (int32[B, Lh], bool[B, Lh])."""
    stage_ids = jnp.asarray(vocab.stage_ids, jnp.int32)
    opening = jnp.broadcast_to(jnp.asarray(vocab.header_open, jnp.int32), stage.shape + (len(vocab.header_open),))
    header = jnp.concatenate([opening, stage_ids[stage][:, None]], axis=1).astype(jnp.int32)
    return header, jnp.broadcast_to(active[:, None], header.shape)


def assemble(layout: Layout, context, context_valid, turns: dict, signals: TurnSignals, outcome) -> Trajectory:
    """Stacks per-turn records (leading axis T, then B) into the fixed-slot buffer of `layout`."""
    def bt(x):  # [T, B, ...] -> [B, T, ...]
        return jnp.swapaxes(x, 0, 1)

    b = context.shape[0]
    dec = turns["decision"][..., None]
    dec_valid = turns["decision_valid"][..., None]
    width_tokens = jnp.concatenate([turns["customer"], turns["header"], dec, turns["reply"]], axis=-1)
    width_valid = jnp.concatenate([turns["customer_valid"], turns["header_valid"], dec_valid,
                                   turns["reply_valid"]], axis=-1)
    zeros_c = jnp.zeros(turns["customer"].shape, bool)
    zeros_h = jnp.zeros(turns["header"].shape, bool)
    ea = jnp.concatenate([zeros_c, zeros_h, dec_valid, jnp.zeros(turns["reply"].shape, bool)], axis=-1)
    cs = jnp.concatenate([zeros_c, zeros_h, jnp.zeros(dec.shape, bool), turns["reply_valid"]], axis=-1)
    cs_lp = jnp.concatenate([jnp.zeros(turns["customer"].shape, jnp.float32),
                             jnp.zeros(turns["header"].shape, jnp.float32), jnp.zeros(dec.shape, jnp.float32),
                             turns["reply_logp"]], axis=-1)

    def flat(x):  # [T, B, W] -> [B, T*W]
        return bt(x).reshape(b, -1)

    zc = jnp.zeros(context.shape, bool)
    active = turns["active"]
    fmask = lambda x: bt(jnp.where(active, x.astype(jnp.float32), 0.0))
    traj = Trajectory(
        tokens=jnp.concatenate([context, flat(width_tokens)], axis=1).astype(jnp.int32),
        valid=jnp.concatenate([context_valid, flat(width_valid)], axis=1),
        ea_mask=jnp.concatenate([zc, flat(ea)], axis=1),
        cs_mask=jnp.concatenate([zc, flat(cs)], axis=1),
        cs_logprob=jnp.concatenate([jnp.zeros(context.shape, jnp.float32), flat(cs_lp)], axis=1),
        strategy=bt(turns["strategy"]).astype(jnp.int32),
        allowed=bt(turns["allowed"]),
        ea_logprob=fmask(turns["strategy_logp"]),
        realised=bt(jnp.where(active, signals.realised, UNRECOGNISED)).astype(jnp.int32),
        aligned=fmask(signals.aligned), sop_valid=fmask(signals.sop_valid), gain=fmask(signals.gain),
        cont=fmask(signals.cont), rel=fmask(signals.rel), quality=fmask(signals.quality),
        rel_realised=fmask(signals.rel_realised),
        turn_mask=bt(active),
        outcome=outcome.outcome.astype(jnp.float32), satisfaction=outcome.satisfaction.astype(jnp.float32),
        fcr=outcome.fcr.astype(jnp.float32),
        filter_rescued=fmask(turns["rescued"]) if "rescued" in turns else None)
    traj.check(layout, turns["allowed"].shape[-1])
    return traj


def _turn_input(vocab: AgentVocab, state, obs) -> TurnInput:
    active = ~obs.done
    header, header_valid = make_header(vocab, obs.stage, active)
    return TurnInput(customer=jnp.where(obs.customer_valid & active[:, None], obs.customer, vocab.pad),
                     customer_valid=obs.customer_valid & active[:, None], header=header,
                     header_valid=header_valid, allowed=obs.allowed, active=active, env_state=state)


def _no_action(vocab: AgentVocab, batch: int, reply_len: int, filtered: bool = False) -> TurnAction:
    """What a dialogue that has ended does on a turn: no strategy, no decision token, an all-pad reply (and no
    rescue, where the agents' filter records them)."""
    return TurnAction(rescued=jnp.zeros((batch,), bool) if filtered else None,
                      strategy=jnp.full((batch,), UNRECOGNISED, jnp.int32),
                      strategy_logp=jnp.zeros((batch,), jnp.float32), decision_valid=jnp.zeros((batch,), bool),
                      reply=jnp.full((batch, reply_len), vocab.pad, jnp.int32),
                      reply_valid=jnp.zeros((batch, reply_len), bool),
                      reply_logp=jnp.zeros((batch, reply_len), jnp.float32))


def _record(vocab: AgentVocab, inp: TurnInput, act: TurnAction) -> dict:
    decision = jnp.where(act.decision_valid, jnp.asarray(vocab.strategy_ids)[jnp.clip(act.strategy, 0)], vocab.pad)
    return {"customer": inp.customer, "customer_valid": inp.customer_valid, "header": inp.header,
            "header_valid": inp.header_valid, "decision": decision, "decision_valid": act.decision_valid,
            "reply": act.reply, "reply_valid": act.reply_valid, "reply_logp": act.reply_logp,
            "strategy": act.strategy, "strategy_logp": act.strategy_logp, "allowed": inp.allowed,
            "active": inp.active, **({} if act.rescued is None else {"rescued": act.rescued})}


def _turn(env: JaxEnv, vocab: AgentVocab, agents, params, agent_key, loop, t):
    """One agent turn for a batch of dialogues (the body of the scan, and of the Python turn loop)."""
    state, obs, carry = loop
    inp = _turn_input(vocab, state, obs)
    carry, act = agents.act(params, carry, inp, jax.random.fold_in(agent_key, t))
    # Ended dialogues act `_no_action` whatever the agents computed for them (e.g. an Expert's draw from a
    # finished dialogue's state), so the record does not depend on running the agents for them: `_ended_turn`.
    b, reply_len = act.reply.shape
    act = jax.tree.map(lambda a, none: jnp.where(inp.active.reshape((b,) + (1,) * (a.ndim - 1)), a, none),
                       act, _no_action(vocab, b, reply_len, act.rescued is not None))
    new_state, new_obs, signals = jax.vmap(env.step)(state, act.strategy, act.reply, act.reply_valid)
    return (new_state, new_obs, carry), (_record(vocab, inp, act), signals)


def _ended_turn(vocab: AgentVocab, reply_len: int, filtered: bool, signals_shape, loop):
    """A turn of a batch whose dialogues have all ended, without running the agents or the environment: the record
    `_turn` writes for ended dialogues, the state and the observation as they are (an ended environment's step is
    a no-op; the record reads the observation only through the stage and the SOP mask, which it keeps) and the
    signals an ended environment emits (zero, no realised strategy, done)."""
    state, obs, carry = loop
    inp = _turn_input(vocab, state, obs)
    signals = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), signals_shape)
    signals = signals.replace(realised=jnp.full_like(signals.realised, UNRECOGNISED),
                              done=jnp.ones_like(signals.done))
    return (state, obs, carry), (_record(vocab, inp, _no_action(vocab, inp.active.shape[0], reply_len, filtered)),
                                 signals)


def _start(env: JaxEnv, agents, params, env_keys):
    state, context, context_valid, obs = jax.vmap(env.reset)(env_keys)
    return state, context, context_valid, obs, agents.init(params, context, context_valid)


def rollout_jax(env: JaxEnv, layout: Layout, vocab: AgentVocab, agents, params, env_keys: jax.Array,
                agent_key: jax.Array) -> Trajectory:
    """Runs B dialogues (one per env key) to the end, entirely in traced JAX: `jax.jit` it with env/layout/vocab/
    agents static (see `make_rollout`). Groups of G rollouts from one start state repeat an env key
    (`World.group_episodes`); the agents' randomness comes from `agent_key`, folded with the turn index.

    Once every dialogue of the batch has ended, the remaining turns skip the agents and the environment
    (`_ended_turn` records the same; under `jax.vmap` the cond runs both branches, which is still correct)."""
    agents = bind_realiser(agents, env)
    state, context, context_valid, obs, carry = _start(env, agents, params, env_keys)
    live = functools.partial(_turn, env, vocab, agents, params, agent_key)
    none = _no_action(vocab, env_keys.shape[0], layout.reply_len)
    signals_shape = jax.eval_shape(jax.vmap(env.step), state, none.strategy, none.reply, none.reply_valid)[2]
    ended = functools.partial(_ended_turn, vocab, layout.reply_len, filters(agents), signals_shape)

    def turn(loop, t):
        return jax.lax.cond(jnp.any(~loop[1].done), live, lambda lp, _: ended(lp), loop, t)

    (state, _, _), (turns, signals) = jax.lax.scan(turn, (state, obs, carry), jnp.arange(layout.max_turns))
    return assemble(layout, context, context_valid, turns, signals, jax.vmap(env.outcome)(state))


def python_loop_rollout(env: JaxEnv, layout: Layout, vocab: AgentVocab, agents) -> Callable:
    """The same rollout as `make_rollout`, driven by a Python loop over turns (one jitted call per turn, as a host
    environment must run). Used as the side-by-side reference of the full-jit rollout in benchmarks/tests."""
    agents = bind_realiser(agents, env)
    start = jax.jit(functools.partial(_start, env, agents))
    step = jax.jit(functools.partial(_turn, env, vocab, agents))
    finish = jax.jit(functools.partial(_finish, env, layout))

    def rollout(params, env_keys, agent_key):
        state, context, context_valid, obs, carry = start(params, env_keys)
        loop, records = (state, obs, carry), []
        for t in range(layout.max_turns):
            loop, rec = step(params, agent_key, loop, jnp.int32(t))
            records.append(rec)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *records)
        return finish(context, context_valid, stacked, loop[0])

    return rollout


def _finish(env, layout, context, context_valid, stacked, state):
    turns, signals = stacked
    return assemble(layout, context, context_valid, turns, signals, jax.vmap(env.outcome)(state))


def make_rollout(env: JaxEnv, layout: Layout, vocab: AgentVocab, agents) -> Callable:
    """jit-compiled `rollout(params, env_keys, agent_key) -> Trajectory` (compiles once per batch size)."""
    return jax.jit(functools.partial(rollout_jax, env, layout, vocab, agents))
