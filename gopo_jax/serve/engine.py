"""The serving engine: a restored run's agents answer a batch of conversations with one jitted call.

A chat request is a conversation: a business context (the system message), finished turns (a customer message and
the agent's reply) and the customer's new message. `Engine.encode` turns it into the run's fixed-slot layout with
the world's own text codec, exactly as a rollout lays a dialogue out: the context slot, then per turn the customer
slot, the agent header (generation prompt + `<stage:σ>`), the decision slot (`<s:k>`) and the reply slot.

`Engine.answer` runs a batch of such conversations on the device in one call of one jitted function per shape
bucket: `ModelAgents.init` reads the contexts, `ModelAgents.replay` appends every finished turn to both agents'
caches (a `lax.scan` over the layout's turns; shorter histories are padded at the front with inactive turns, which
write nothing visible), and `ModelAgents.act` (the rollout's own agent turn: SOP-masked Expert decision, then the
CS reply from the project's sampler) answers the new message. The reply of a greedy request is therefore the reply
the evaluation rollout writes for the same dialogue (tests/test_serve.py replays held-out dialogues).

Batches are padded to a bucket of rows (`batch_buckets`), so a handful of programs serve every request; `warmup`
compiles them before the server accepts requests. A request's temperature is an argument of the compiled program;
whether it filters (`top_p` < 1; the value itself is an argument too) and whether it asks for `top_logprobs` (an extra
forward pass) select the program.

The SOP stage of the new turn is tracked through the history: each earlier reply is realised with the world's
realisation check and the SOP moves on the realised strategy; in a world without one it moves on the strategy the
assistant message declares (`"gopo": {"strategy": NAME}`, as this server returns it), or `gopo_stage` names it.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.chat import next_stage, realisation_kind, realise
from gopo_jax.dialogue.rollout import (ModelAgents, ModelAgentsState, SamplingConfig, TurnInput, bind_realiser,
                                       make_header)
from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.export import RestoredRun
from gopo_jax.models import qwen3
from gopo_jax.models.heads import SamplingDist

_log = logging.getLogger(__name__)
DEFAULT_BUCKETS = (1, 4, 16)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit; each needs the CS's full distribution at every reply slot


class RequestError(ValueError):
    """A conversation this run cannot answer as sent; `param` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclasses.dataclass(frozen=True)
class PastTurn:
    customer: np.ndarray  # int32[Lc], the customer slot
    customer_valid: np.ndarray
    stage: int  # the SOP stage the agent answered in
    decision: int | None  # the strategy written in the decision slot; None: the slot stays empty
    reply: np.ndarray  # int32[Lr], the reply slot (end of turn included)
    reply_valid: np.ndarray


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One request in the layout's slots: what the agents read before they answer."""

    context: np.ndarray  # int32[Lctx]
    context_valid: np.ndarray
    past: tuple[PastTurn, ...]
    customer: np.ndarray  # int32[Lc], the new customer message
    customer_valid: np.ndarray
    stage: int  # the SOP stage of the new turn
    default_context: bool  # no system message: the run's default business context was used


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a request samples; requests with equal settings share a device batch."""

    temperature: float  # 0: greedy (the Expert's argmax and the CS's most likely tokens)
    top_p: float = 1.0
    top_logprobs: int = 0  # > 0: the top alternatives of every reply token
    seed: int | None = None  # a seeded request runs in a batch of its own, so its draw depends on the seed only
    n_candidates: int = 1  # the deployment-time filter (GOPO.md §1; `Engine.max_candidates` bounds it)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclasses.dataclass(frozen=True)
class Reply:
    """One answer: the Expert's decision and the CS reply, as the rollout would record them."""

    strategy: int | None  # None without an Expert
    strategy_logprob: float | None
    token_ids: tuple[int, ...]  # the reply as written, the end-of-turn token excluded
    token_logprobs: tuple[float, ...]
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None  # per token, (id, log-prob) best first
    stopped: bool  # the CS ended its turn (else it used every slot of the layout's reply)
    realised: int | None = None  # R(reply) computed with the reply on the device (pure-JAX worlds), else None


class Engine:
    """A restored run ready to answer conversations (`encode`, then `answer` on a batch)."""

    def __init__(self, run: RestoredRun, *, batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS, n_candidates: int = 1,
                 max_candidates: int | None = None, candidate_temperature: float = 0.7):
        if not batch_buckets or any(b < 1 for b in batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {batch_buckets!r}")
        # n is static in a program: requests may ask for 1..max_candidates, so at most that many programs per
        # bucket and sampling kind (warmup compiles the default's).
        max_candidates = n_candidates if max_candidates is None else max_candidates
        if not 1 <= n_candidates <= max_candidates:
            raise ValueError(f"n_candidates must be in 1..max_candidates ({max_candidates}), got {n_candidates}")
        if not candidate_temperature > 0:
            raise ValueError(f"candidate_temperature must be > 0, got {candidate_temperature}")
        self.run, self.world = run, run.world
        self.vocab, self.layout, self.sop = self.world.vocab, self.world.layout, self.world.spec.sop
        self.codec = self.world.codec()
        self.use_expert = run.use_expert
        self.sop_mask = bool(run.components.hyper.sop_mask)
        self.buckets = tuple(sorted(set(int(b) for b in batch_buckets)))
        self.params = run.params
        self.default_context = self._world_context()
        self._compiled: dict[tuple, Any] = {}
        # A chat re-sends its whole history with every request: each earlier reply is realised once. Keyed by the
        # reply slot's ids (at most layout.reply_len of them), not by the text, which a client may make 1 MiB long.
        self._realised_slot = functools.lru_cache(maxsize=8192)(self._realise_slot)
        self._device_realises = self.world.kind == "jax" and realisation_kind(self.world) is not None
        if max_candidates > 1 and not self._device_realises:
            raise ValueError("n_candidates > 1 (the deployment-time filter) needs a pure-JAX world with a realisation "
                             f"check; {self.world.spec.name} has none on the device: serve with max_candidates=1")
        self.n_candidates, self.max_candidates = n_candidates, max_candidates
        self.candidate_temperature = float(candidate_temperature)

    # ------------------------------------------------------------------------------------------ requests -> slots
    def _world_context(self) -> tuple[np.ndarray, np.ndarray]:
        """The run's default business context: the world's episode 0, as the chat opens with."""
        if self.world.kind == "jax":
            _, ids, valid, _ = self.world.env.reset(jax.random.key(0))
            return np.asarray(ids), np.asarray(valid)
        return self.codec.context(self.world.env.reset(0).context)

    def default_context_text(self) -> str:
        ids, valid = self.default_context
        return self.world.chat_format.content_text(self.world.tokenizer, ids[valid], "system")

    def stage_index(self, value: Any, param: str) -> int:
        stages = self.sop.stages
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise RequestError(f"{param} must be a stage name or index of SOP {self.sop.name!r}: {list(stages)}",
                               param)
        if isinstance(value, int):
            if not 0 <= value < len(stages):
                raise RequestError(f"{param}={value} is out of range 0..{len(stages) - 1}", param)
            return value
        if value not in stages:
            raise RequestError(f"{param}={value!r} is not a stage of SOP {self.sop.name!r}: {list(stages)}", param)
        return stages.index(value)

    def encode(self, messages: list[dict], gopo_stage: Any = None) -> Conversation:
        """Chat messages ({role, content, gopo?}) -> the conversation in the layout's slots. The history must be
        [system] (user, assistant)* user: a turn is the customer's message and the agent's reply."""
        system = [m for m in messages if m["role"] in ("system", "developer")]
        if len(system) > 1 or (system and messages[0] is not system[0]):
            raise RequestError("at most one system message, and only first: it is the business context the agents "
                               "read before the dialogue", "messages")
        turns = messages[1:] if system else messages
        roles = [m["role"] for m in turns]
        expected = ["user", "assistant"] * (len(turns) // 2) + ["user"]
        if roles != expected:
            raise RequestError("after the optional system message, messages must alternate user, assistant, ..., "
                               f"and end with the user's new message; got {roles}", "messages")
        max_turns = self.layout.max_turns
        if len(turns) // 2 + 1 > max_turns:
            raise RequestError(f"this run's agents hold dialogues of at most {max_turns} agent turns "
                               f"(layout.max_turns); the request asks for turn {len(turns) // 2 + 1}", "messages",
                               code="context_length_exceeded")
        context = (self.codec.context(system[0]["content"]) if system else self.default_context)
        stage, past = int(self.sop.initial), []
        checks = realisation_kind(self.world) is not None
        first = 1 if system else 0
        for t in range(len(turns) // 2):
            i = first + 2 * t + 1  # the assistant message's index in the request
            customer = self.codec.customer(turns[2 * t]["content"])
            reply_text = turns[2 * t + 1]["content"]
            reply, reply_valid = self.codec.reply_ids(reply_text)
            gopo = turns[2 * t + 1].get("gopo") or {}
            declared = gopo.get("strategy")
            if declared is not None and declared not in self.sop.strategies:
                raise RequestError(f"messages[{i}].gopo.strategy={declared!r} is not a strategy of SOP "
                                   f"{self.sop.name!r}: {list(self.sop.strategies)}", f"messages[{i}]")
            realised = self._realised_slot(tuple(reply[reply_valid].tolist())) if checks else None
            known = realised if realised not in (None, UNRECOGNISED) else None
            decision = self.sop.strategies.index(declared) if declared is not None else known
            past.append(PastTurn(*customer, stage=stage, decision=decision if self.use_expert else None,
                                 reply=reply, reply_valid=reply_valid))
            if not checks and "stage" in gopo:
                stage = self.stage_index(gopo["stage"], f"messages[{i}].gopo.stage")
            stage = next_stage(self.sop, stage, realised if checks else decision)
        if gopo_stage is not None:
            stage = self.stage_index(gopo_stage, "gopo_stage")
        customer, customer_valid = self.codec.customer(turns[-1]["content"])
        return Conversation(context=context[0], context_valid=context[1], past=tuple(past), customer=customer,
                            customer_valid=customer_valid, stage=stage, default_context=not system)

    def _realise_slot(self, written: tuple[int, ...]) -> int:
        """R of an earlier reply as its slot holds it; a host world reads the slot's text, as in a rollout."""
        ids = np.full((self.layout.reply_len,), self.vocab.pad, np.int32)
        ids[:len(written)] = written
        valid = np.arange(len(ids)) < len(written)
        return realise(self.world, ids, valid, self.codec.reply_text(ids, valid))

    # ------------------------------------------------------------------------------------------ slots -> device
    def _rows(self, conversations: list[Conversation], bucket: int) -> dict:
        """The batch's arrays: conversation rows, then copies of the first marked inactive up to `bucket`."""
        lay, pad = self.layout, self.vocab.pad
        past_len = lay.max_turns - 1
        r = len(conversations)
        rows = {
            "context": np.stack([c.context for c in conversations]),
            "context_valid": np.stack([c.context_valid for c in conversations]),
            "customer": np.stack([c.customer for c in conversations]),
            "customer_valid": np.stack([c.customer_valid for c in conversations]),
            "stage": np.asarray([c.stage for c in conversations], np.int32),
            "active": np.ones((r,), bool),
            "past_customer": np.full((r, past_len, lay.customer_len), pad, np.int32),
            "past_customer_valid": np.zeros((r, past_len, lay.customer_len), bool),
            "past_stage": np.full((r, past_len), self.sop.initial, np.int32),
            "past_active": np.zeros((r, past_len), bool),
            "past_decision": np.full((r, past_len), pad, np.int32),
            "past_decision_valid": np.zeros((r, past_len), bool),
            "past_reply": np.full((r, past_len, lay.reply_len), pad, np.int32),
            "past_reply_valid": np.zeros((r, past_len, lay.reply_len), bool),
        }
        for b, conv in enumerate(conversations):
            # Front padding: the new turn is always the layout's last, a short history's turns just before it.
            for j, turn in enumerate(conv.past, start=past_len - len(conv.past)):
                rows["past_customer"][b, j], rows["past_customer_valid"][b, j] = turn.customer, turn.customer_valid
                rows["past_stage"][b, j], rows["past_active"][b, j] = turn.stage, True
                if turn.decision is not None:
                    rows["past_decision"][b, j] = self.vocab.strategy_ids[turn.decision]
                    rows["past_decision_valid"][b, j] = True
                rows["past_reply"][b, j], rows["past_reply_valid"][b, j] = turn.reply, turn.reply_valid
        if bucket > r:
            rows = {k: np.concatenate([v, np.repeat(v[:1], bucket - r, axis=0)]) for k, v in rows.items()}
            rows["active"][r:] = False
        rows["allowed"] = np.asarray(self.sop.allowed)[rows["stage"]]
        return rows

    def _turn(self, params, rows: dict, key, temperature, top_p, *, greedy: bool, filtered: bool,
              top_logprobs: int, n_candidates: int):
        """The device program: read the contexts, replay the finished turns, answer the new one. With the filter,
        candidate 0 is the request's own draw; the others are drawn at the request's temperature, or at the server's
        candidate_temperature for a greedy request (n greedy drafts would be one)."""
        vocab = self.vocab
        sampling = SamplingConfig(temperature=0.0 if greedy else temperature, top_k=0,
                                  top_p=top_p if filtered and not greedy else 1.0,
                                  expert_greedy=greedy, expert_temperature=1.0 if greedy else temperature,
                                  sop_mask=self.sop_mask, use_expert=self.use_expert, n_candidates=n_candidates,
                                  candidate_temperature=self.candidate_temperature if greedy else temperature)
        agents = ModelAgents(self.run.components.expert_gd, self.run.components.cs_gd, vocab, self.layout, sampling)
        agents = bind_realiser(agents, self.world.env)
        carry = agents.init(params, rows["context"], rows["context_valid"])

        def past_turn(carry, turn):
            header, header_valid = make_header(vocab, turn["stage"], turn["active"])
            inp = TurnInput(customer=turn["customer"], customer_valid=turn["customer_valid"], header=header,
                            header_valid=header_valid, allowed=None, active=turn["active"], env_state=None)
            return agents.replay(params, carry, inp, turn["decision"], turn["decision_valid"], turn["reply"],
                                 turn["reply_valid"]), None

        past = {k.removeprefix("past_"): jnp.swapaxes(v, 0, 1) for k, v in rows.items() if k.startswith("past_")}
        carry, _ = jax.lax.scan(past_turn, carry, past)
        header, header_valid = make_header(vocab, rows["stage"], rows["active"])
        inp = TurnInput(customer=rows["customer"], customer_valid=rows["customer_valid"], header=header,
                        header_valid=header_valid, allowed=rows["allowed"], active=rows["active"], env_state=None)
        after, action = agents.act(params, carry, inp, key)
        del after
        # The alternatives are read from the distribution the reply was drawn from (the request's temperature and
        # top_p; greedy: the model's own). The written tokens' log-probs are the decode's own (action.reply_logp).
        dist = SamplingDist(temperature=sampling.temperature, top_p=sampling.top_p)
        top = self._top_logprobs(params, carry, inp, action, top_logprobs, dist) if top_logprobs else None
        realised = None
        if self._device_realises:  # the world's check is pure JAX: realise the replies where they are
            out = jax.vmap(self.world.env.realise)(action.reply, action.reply_valid)
            realised = out[0] if isinstance(out, tuple) else out
        return action, top, realised

    def _top_logprobs(self, params, carry: ModelAgentsState, inp: TurnInput, action, n: int, dist: SamplingDist):
        """(log-probs f32[B, Lr, n], ids int32[B, Lr, n]): the CS's best `n` tokens at every reply slot under
        `dist`, from one forward pass over the new turn as written (only a request that asks for them pays for
        [B, Lr, V]). A written token's own log-prob is not taken from this pass: the pass rounds differently from
        the decode, so at a top_p boundary it can leave out the very token the decode drew (log-prob -inf, a 500)."""
        cs = nnx.merge(self.run.components.cs_gd, params["cs"])
        strategy_ids = jnp.asarray(self.vocab.strategy_ids, jnp.int32)
        decision = jnp.where(action.decision_valid, strategy_ids[jnp.clip(action.strategy, 0)], self.vocab.pad)
        chunk = jnp.concatenate([inp.customer, inp.header, decision[:, None], action.reply], axis=1)
        valid = jnp.concatenate([inp.customer_valid, inp.header_valid, action.decision_valid[:, None],
                                 action.reply_valid], axis=1)
        positions = carry.num_valid[:, None] + qwen3.positions_from_valid(valid)
        h, _ = cs.hidden(chunk, positions, valid, carry.cs_cache)
        # Reply token j is predicted from the slot before it, the slot of token j - 1 (decision_slot + j); the
        # first from the decision slot, or without an Expert from the header's last slot.
        decision_slot = inp.customer.shape[1] + inp.header.shape[1]
        first = jnp.where(action.decision_valid, decision_slot, decision_slot - 1)
        lr = action.reply.shape[1]
        predictors = jnp.concatenate([first[:, None], jnp.broadcast_to(decision_slot + jnp.arange(1, lr),
                                                                       (first.shape[0], lr - 1))], axis=1)
        hidden = jnp.take_along_axis(h, predictors[:, :, None], axis=1)
        logp = jax.nn.log_softmax(dist.logits(cs.logits(hidden).astype(jnp.float32)), axis=-1)
        return jax.lax.top_k(logp, n)

    def _program(self, bucket: int, sampling: Sampling):
        filtered = not sampling.greedy and sampling.top_p < 1.0
        if not 1 <= sampling.n_candidates <= self.max_candidates:
            raise RequestError(f"gopo_n_candidates={sampling.n_candidates}: this server draws 1..{self.max_candidates} "
                               "candidate replies per turn", "gopo_n_candidates")
        key = (bucket, sampling.greedy, filtered, sampling.top_logprobs, sampling.n_candidates)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(functools.partial(
                self._turn, greedy=sampling.greedy, filtered=filtered, top_logprobs=sampling.top_logprobs,
                n_candidates=sampling.n_candidates))
        return self._compiled[key]

    def bucket(self, rows: int) -> int:
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def answer(self, conversations: list[Conversation], sampling: Sampling, key: jax.Array) -> list[Reply]:
        """One reply per conversation, in order (a batch larger than the largest bucket runs in several calls)."""
        out: list[Reply] = []
        for start in range(0, len(conversations), self.max_batch):
            part = conversations[start:start + self.max_batch]
            bucket = self.bucket(len(part))
            rows = self._rows(part, bucket)
            action, top, realised = jax.device_get(self._program(bucket, sampling)(
                self.params, rows, jax.random.fold_in(key, start), jnp.float32(sampling.temperature),
                jnp.float32(sampling.top_p)))
            out += self._replies(action, top, realised, len(part))
        return out

    def _replies(self, action, top, realised, count: int) -> list[Reply]:
        replies = []
        for b in range(count):
            length = int(np.asarray(action.reply_valid[b]).sum())
            ids = [int(i) for i in action.reply[b, :length]]
            stopped = bool(ids) and ids[-1] == self.vocab.eot
            kept = length - 1 if stopped else length
            replies.append(Reply(
                strategy=int(action.strategy[b]) if self.use_expert else None,
                strategy_logprob=float(action.strategy_logp[b]) if self.use_expert else None,
                token_ids=tuple(ids[:kept]),
                token_logprobs=tuple(float(x) for x in action.reply_logp[b, :kept]),
                top_logprobs=None if top is None else tuple(
                    tuple(zip(top[1][b, j].tolist(), top[0][b, j].tolist())) for j in range(kept)),
                stopped=stopped, realised=None if realised is None else int(realised[b])))
        return replies

    def warmup(self, samplings: list[Sampling]) -> float:
        """Compiles the program of every bucket for each of `samplings` (seconds taken), so no request waits."""
        start = time.perf_counter()
        probe = Conversation(context=self.default_context[0], context_valid=self.default_context[1], past=(),
                             customer=self.codec.customer("hello")[0], customer_valid=self.codec.customer("hello")[1],
                             stage=int(self.sop.initial), default_context=True)
        for sampling in samplings:
            for bucket in self.buckets:
                self.answer([probe] * bucket, sampling, jax.random.key(0))
        return time.perf_counter() - start

    # ------------------------------------------------------------------------------------------ what a reply means
    def realised(self, reply: Reply) -> int | None:
        """R(reply): the strategy the reply carries out (UNRECOGNISED if none); None without a realisation check.
        The world reads the reply slot as the rollout hands it over: the ids written, end of turn included."""
        if realisation_kind(self.world) is None:
            return None
        if reply.realised is not None:
            return reply.realised
        written = [*reply.token_ids, *((self.vocab.eot,) if reply.stopped else ())]
        ids = np.full((self.layout.reply_len,), self.vocab.pad, np.int32)
        ids[:len(written)] = written
        return realise(self.world, ids, np.arange(len(ids)) < len(written), self.text(reply.token_ids))

    def text(self, ids) -> str:
        return self.codec.reply_text(np.asarray(ids, np.int32), np.ones(len(ids), bool))

    def token_text(self, token_id: int) -> str:
        return self.world.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                           clean_up_tokenization_spaces=False)
