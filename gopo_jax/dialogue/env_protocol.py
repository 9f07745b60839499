"""The environment protocol: the data types and interfaces every dialogue world shares with rollouts, metrics and
training. It lives below the rollout drivers (gopo_jax/dialogue) so that they need nothing from gopo_jax/envs.

Two kinds of environment share one spec and one set of per-turn signals (GOPO.md §1):

* `JaxEnv` — state as arrays; `reset(key)` and `step(state, ...)` are pure, jittable and vmappable, so the whole
  multi-turn rollout of a batch of dialogues runs inside one `lax.scan` over turns. Customer utterances are token
  ids of fixed length (padded, with a validity mask), built by appending ids, never by re-tokenising text.
* host environments (gopo_jax/envs/base.py `HostEnv`) — a Python object per episode (databases, retrieval,
  external services). Text in, text out (`HostObs`); the rollout driver runs the turn loop in Python around
  jitted generation and tokenises customer text.

Both expose the strategy set and SOP, a deterministic customer simulator, the realisation check R, a reference
(scripted or logged) policy, and demonstrations for the SFT warm start.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import flax.struct
import jax
import numpy as np

from gopo_jax.dialogue.sop import SOP


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """Static description of a world; hashable so it can be a static argument of jitted functions."""

    name: str
    sop: SOP = dataclasses.field(hash=False, compare=False)
    max_turns: int  # T_max: agent turns per episode
    max_relevance: int  # R: the top relevance grade rel_t can take
    strategy_descriptions: tuple[str, ...] = ()  # one line per strategy, for prompts and prompted baselines

    @property
    def strategies(self) -> tuple[str, ...]:
        return self.sop.strategies

    @property
    def num_strategies(self) -> int:
        return self.sop.num_strategies


@flax.struct.dataclass
class TurnSignals:
    """Per-turn signals (GOPO.md §1) for one agent turn; batched/stacked over turns by the caller."""

    gain: Any  # g_t in [0,1]: task-progress increment on this turn
    cont: Any  # c_t in [0,1]: probability the customer stays engaged after this turn
    rel: Any  # rel_t in {0..R}: graded relevance of the chosen strategy (0 for an SOP violation); trains the EA
    # The same grade of the realised strategy k̂_t (0 for an SOP violation or an unrecognised reply): what the
    # customer got, so evaluation scores every method, with or without an Expert, on the same thing.
    rel_realised: Any
    quality: Any  # q_t: per-turn reply quality from the environment (0 if it has none)
    realised: Any  # k̂_t = R(y_t): strategy the reply carries out (sop.UNRECOGNISED if none)
    aligned: Any  # a_t = [k̂_t == k_t]
    sop_valid: Any  # v_t = M[σ_t][k̂_t]
    done: Any  # episode ended after this turn (completion or abandonment)


@flax.struct.dataclass
class EpisodeOutcome:
    outcome: Any  # o in {0,1}: purchase / resolution
    satisfaction: Any  # sat in [0,1]
    fcr: Any  # first-contact resolution in {0,1}


@flax.struct.dataclass
class JaxObs:
    """What the agents see at the start of an agent turn (after the customer spoke)."""

    customer: Any  # int32[Lc] customer utterance ids (role/eot tokens included), padded
    customer_valid: Any  # bool[Lc]
    stage: Any  # int32[] current SOP stage σ_t
    allowed: Any  # bool[n_k] = M[σ_t]
    done: Any  # bool[] episode already over (further turns are padding)


@runtime_checkable
class JaxEnv(Protocol):
    spec: EnvSpec
    customer_len: int  # Lc
    reply_len: int  # Lr
    context_len: int  # length of the business-context prefix

    def reset(self, key: jax.Array) -> tuple[Any, Any, Any, JaxObs]:
        """-> (state, context_ids int32[context_len], context_valid bool[context_len], first observation)."""

    def step(self, state: Any, strategy: jax.Array, reply: jax.Array, reply_valid: jax.Array
             ) -> tuple[Any, JaxObs, TurnSignals]:
        """One agent turn: realise the reply, react as the customer, emit signals. Pure; no-op once done."""

    def outcome(self, state: Any) -> EpisodeOutcome:
        """End-of-episode outcome of a finished (or truncated) episode."""

    def reference_turn(self, state: Any, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The scripted expert: -> (strategy int32[], reply int32[Lr], reply_valid bool[Lr])."""

    def scripted_reply(self, state: Any, strategy: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """A template reply that realises `strategy` with the best content for this state (used by the scripted
        random/greedy policies and by demonstrations): -> (reply int32[Lr], reply_valid bool[Lr])."""


@dataclasses.dataclass
class HostObs:
    context: str  # business context / scenario shown to the agents
    customer: str  # the customer's latest utterance
    stage: int
    allowed: np.ndarray  # bool[n_k]
    done: bool


@dataclasses.dataclass
class DemoTurn:
    """One demonstrated agent turn for SFT: the strategy and the reply a reference agent gave after `customer`."""

    customer: str
    strategy: str
    reply: str
    stage: int


@dataclasses.dataclass
class Demonstration:
    context: str
    turns: list[DemoTurn]

    def to_json(self) -> dict[str, Any]:
        return {"context": self.context, "turns": [dataclasses.asdict(t) for t in self.turns]}
