"""Memento baseline (GOPO.md §4): frozen SFT agents, an episodic case bank and a soft-Q case-selection policy.

No LLM gradient: the SFT Expert and CS stay as they are. What learns is a correction to the SFT Expert's choice of
strategy:

* **Policy** (`MementoAgents`): π(k | s) ∝ π_SFT(k | s) · exp(Q(s, k) / α) over the SOP-allowed strategies: Q/α is
  added to the frozen Expert's strategy logits before its SOP mask (`ModelAgents.act(strategy_bias=...)`), so the
  mask stays a hard constraint and the Expert's decision is sampled (or, in evaluation, taken greedily) from the
  mixed policy. This is the optimum of the KL-regularised objective E[Σ r] − α KL(π ‖ π_SFT) for that Q. The Q-MLP's
  output layer starts at zero, so Q ≡ 0 and an untrained Memento is exactly the SFT agents.
* **State embedding** of an agent turn (`state_embedding`): the mean of the frozen Expert's input-embedding rows
  over the customer's last utterance (unit-normalised), the SOP stage one-hot and the turn index / (T_max − 1).
* **Case bank** (`CaseBank`, fixed-size ring-buffer arrays kept in the train state's extras): one case per agent
  turn: (state embedding, memory features, strategy, target, iteration written). Written by the train step, once
  per rollout.
* **Retrieval** (`retrieve`): cosine similarity to the visible cases, the top-K, weighted by a softmax of their
  similarities; `memory_features` summarise them per strategy (weighted mean target, weight mass).
* **Q-function** (`q_values`): a small MLP on [state embedding, memory features] -> Q(s, k) for every strategy,
  regressed on the bank's (features, strategy, target) cases.

Targets as documented (what a case may use). A case's *features* are what the acting agent saw when it acted: its
own customer's utterance, stage and turn (its own dialogue so far), and memory features retrieved from the bank as
it stood at that rollout, i.e. only cases written by EARLIER iterations (`stamp < this iteration`). They are
computed once, when the case is written (`make_memento_loss`), and stored with it; the Q loss never re-retrieves.
So no case's features hold its siblings (the other G − 1 rollouts of the same customer, or other dialogues of the
same rollout) nor later turns of its own dialogue, whose outcomes the agent could not know when it acted. (With
several minibatches per iteration, cases older than this iteration that an earlier minibatch's writes evicted from
the ring buffer are missing from a later minibatch's features; `bank_size` ≥ an iteration's cases keeps that rare.)
A case's *target* is its own dialogue's KL-regularised soft Monte-Carlo return from that turn on
(`soft_q_targets`): y_t = r_t + γ (y_{t+1} − α log[π(k_{t+1}|s_{t+1}) / π_SFT(k_{t+1}|s_{t+1})]), with the same
per-turn rewards as PPO (`shaping · g_t`, R_B on the last turn). Siblings' returns enter only as other cases'
regression targets of the shared Q-MLP (ordinary learning), never as inputs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.layout import Layout, Trajectory

Array = chex.Array
BANK_KEYS = ("memento_emb", "memento_feat", "memento_strategy", "memento_return", "memento_stamp", "memento_valid",
             "memento_ptr")


@flax.struct.dataclass
class CaseBank:
    emb: Any  # f32[N, D] state embeddings
    feat: Any  # f32[N, 2 n_k] memory features as retrieved when the case was acted (`q_features`)
    strategy: Any  # int32[N]
    ret: Any  # f32[N] soft return (the Q target)
    stamp: Any  # int32[N]: the iteration that wrote the case
    valid: Any  # bool[N]
    ptr: Any  # int32[]: next slot to write

    @classmethod
    def empty(cls, size: int, dim: int, num_strategies: int) -> CaseBank:
        return cls(emb=jnp.zeros((size, dim), jnp.float32), feat=jnp.zeros((size, 2 * num_strategies), jnp.float32),
                   strategy=jnp.zeros((size,), jnp.int32), ret=jnp.zeros((size,), jnp.float32),
                   stamp=jnp.zeros((size,), jnp.int32), valid=jnp.zeros((size,), bool), ptr=jnp.zeros((), jnp.int32))

    def to_extras(self) -> dict[str, jax.Array]:
        # The train state's extras are a flat dict of arrays.
        return dict(zip(BANK_KEYS, (self.emb, self.feat, self.strategy, self.ret, self.stamp, self.valid, self.ptr)))

    @classmethod
    def from_extras(cls, extras: dict) -> CaseBank:
        return cls(*(extras[k] for k in BANK_KEYS))


@dataclasses.dataclass(frozen=True)
class MementoHyper:
    num_strategies: int
    num_stages: int
    max_turns: int
    top_k: int = 8
    retrieval_temperature: float = 0.1
    alpha: float = 0.5
    gamma: float = 1.0
    shaping: float = 1.0
    steps_per_iteration: int = 1  # train steps per rollout (epochs × minibatches)
    write_steps: int = 1  # the first `write_steps` of them (epoch 0) write their minibatch's cases


def state_embedding(customer: Array, customer_valid: Array, stage: Array, turn: Array, *, embed_table: Array,
                    num_stages: int, max_turns: int) -> Array:
    """f32[E + num_stages + 1] for one agent turn (see the module docstring)."""
    chex.assert_rank([customer, customer_valid, stage, turn, embed_table], [1, 1, 0, 0, 2])
    rows = embed_table[customer].astype(jnp.float32)
    mean = jnp.sum(jnp.where(customer_valid[:, None], rows, 0.0), 0) / jnp.maximum(jnp.sum(customer_valid), 1)
    mean = mean / (jnp.linalg.norm(mean) + 1e-8)
    return jnp.concatenate([mean, jax.nn.one_hot(stage, num_stages, dtype=jnp.float32),
                            (turn / max(max_turns - 1, 1)).astype(jnp.float32)[None]])


def stage_index(stage_token: Array, stage_ids: tuple[int, ...]) -> Array:
    """The SOP stage of a header's stage token (any shape); 0 for a pad."""
    return jnp.argmax(stage_token[..., None] == jnp.asarray(stage_ids, stage_token.dtype), axis=-1).astype(jnp.int32)


def embedding_table(expert_params) -> jax.Array:
    return expert_params["embed_tokens"]["embedding"][...]


def trajectory_state_embeddings(traj: Trajectory, layout: Layout, stage_ids: tuple[int, ...], embed_table: Array,
                                *, num_stages: int) -> Array:
    """f32[B, T, D]: `state_embedding` of every turn of a rolled-out batch, read back from the token buffer (the
    customer slot and the header's stage token), so it equals what the agents computed while acting."""
    cust = np.asarray([layout.turn_start(t) for t in range(layout.max_turns)])[:, None] + np.arange(
        layout.customer_len)
    stage_pos = np.asarray([layout.header_start(t) + layout.header_len - 1 for t in range(layout.max_turns)])
    stages = stage_index(traj.tokens[:, stage_pos], stage_ids)
    turns = jnp.broadcast_to(jnp.arange(layout.max_turns, dtype=jnp.int32), stages.shape)
    emb = functools.partial(state_embedding, embed_table=embed_table, num_stages=num_stages,
                            max_turns=layout.max_turns)
    return jax.vmap(jax.vmap(emb))(traj.tokens[:, cust], traj.valid[:, cust], stages, turns)


def retrieve(query: Array, bank: CaseBank, visible: Array, *, top_k: int, temperature: float
             ) -> tuple[Array, Array]:
    """Top-K cases among the valid, `visible` (bool[N]) ones by cosine similarity to `query` f32[D]. Returns
    (indices int32[K], weights f32[K]): softmax(similarity / temperature) over the cases found, 0 for slots without
    a case."""
    chex.assert_rank([query, bank.emb, visible], [1, 2, 1])
    n = bank.emb.shape[0]
    norms = jnp.linalg.norm(bank.emb, axis=-1) * jnp.linalg.norm(query) + 1e-8
    sims = bank.emb @ query / norms
    ok = bank.valid & visible
    top, idx = jax.lax.top_k(jnp.where(ok, sims, -2.0), min(top_k, n))  # cosine >= -1: -2 marks "no case"
    found = ok[idx]
    logits = jnp.where(found, top / temperature, -jnp.inf)
    w = jnp.where(found, jnp.exp(logits - jnp.max(jnp.where(found, logits, -1e30))), 0.0)
    return idx, w / jnp.maximum(jnp.sum(w), 1e-12)


def memory_features(idx: Array, weights: Array, bank: CaseBank, num_strategies: int) -> Array:
    """f32[2 n_k]: per strategy, the weighted mean return of the retrieved cases that chose it, then their weight
    mass (0 and 0 for a strategy no retrieved case chose)."""
    chex.assert_rank([idx, weights], [1, 1])
    w = jax.nn.one_hot(bank.strategy[idx], num_strategies, dtype=jnp.float32) * weights[:, None]
    mass = jnp.sum(w, 0)
    mean_ret = jnp.sum(w * bank.ret[idx][:, None], 0) / jnp.maximum(mass, 1e-12)
    return jnp.concatenate([jnp.where(mass > 0, mean_ret, 0.0), mass])


def q_features(query: Array, bank: CaseBank, visible: Array, hyper: MementoHyper) -> Array:
    """f32[2 n_k]: the memory features of one state, retrieved from the bank's valid, `visible` cases."""
    idx, w = retrieve(query, bank, visible, top_k=hyper.top_k, temperature=hyper.retrieval_temperature)
    return memory_features(idx, w, bank, hyper.num_strategies)


def init_q_params(key: jax.Array, in_dim: int, hidden: int, num_strategies: int) -> dict[str, jax.Array]:
    """The Q-MLP's parameters; the output layer starts at zero (Q ≡ 0), so the first policy is the SFT Expert's."""
    return {"w1": jax.random.normal(key, (in_dim, hidden), jnp.float32) / np.sqrt(in_dim),
            "b1": jnp.zeros((hidden,), jnp.float32),
            "w2": jnp.zeros((hidden, num_strategies), jnp.float32),
            "b2": jnp.zeros((num_strategies,), jnp.float32)}


def q_values(params: dict, emb: Array, memory: Array) -> Array:
    """f32[n_k]: Q(s, ·) for one state's embedding f32[D] and memory features f32[2 n_k]."""
    chex.assert_rank([emb, memory], [1, 1])
    x = jnp.concatenate([emb, memory])
    return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def soft_q_targets(rewards: Array, log_ratio: Array, mask: Array, *, gamma: float, alpha: float) -> Array:
    """KL-regularised soft Monte-Carlo returns of one dialogue: y_t = r_t + γ (y_{t+1} − α ρ_{t+1}) with
    ρ = log π(k|s) − log π_SFT(k|s) of the strategy taken, the next terms only while t+1 is a valid turn (valid turns
    are a prefix). f32[T] x2, bool[T] -> f32[T], 0 off the mask."""
    chex.assert_rank([rewards, log_ratio, mask], [1, 1, 1])
    chex.assert_equal_shape([rewards, log_ratio, mask])

    def back(carry, x):
        r, lp, m = x
        y = r + gamma * carry
        return jnp.where(m, y - alpha * lp, carry), jnp.where(m, y, 0.0)

    _, y = jax.lax.scan(back, jnp.zeros((), jnp.float32),
                        (rewards.astype(jnp.float32), log_ratio.astype(jnp.float32), mask), reverse=True)
    return y


def write_cases(bank: CaseBank, emb: Array, feat: Array, strategy: Array, ret: Array, valid: Array, stamp: Array
                ) -> CaseBank:
    """Appends the valid rows of (emb f32[M, D], feat f32[M, 2 n_k], strategy, ret, valid), stamped with iteration
    `stamp` int32[], at the ring buffer's pointer, overwriting the oldest cases. The caller keeps M <= N (one write
    must not wrap onto itself)."""
    chex.assert_rank([emb, feat, strategy, ret, valid, stamp], [2, 2, 1, 1, 1, 0])
    n = bank.emb.shape[0]
    offset = jnp.cumsum(valid.astype(jnp.int32)) - 1
    slot = jnp.where(valid, (bank.ptr + offset) % n, n)  # slot n is out of range: dropped
    return CaseBank(emb=bank.emb.at[slot].set(emb.astype(jnp.float32), mode="drop"),
                    feat=bank.feat.at[slot].set(feat.astype(jnp.float32), mode="drop"),
                    strategy=bank.strategy.at[slot].set(strategy.astype(jnp.int32), mode="drop"),
                    ret=bank.ret.at[slot].set(ret.astype(jnp.float32), mode="drop"),
                    stamp=bank.stamp.at[slot].set(stamp.astype(jnp.int32), mode="drop"),
                    valid=bank.valid.at[slot].set(True, mode="drop"),
                    ptr=(bank.ptr + jnp.sum(valid.astype(jnp.int32))) % n)


def q_loss(q_params: dict, bank: CaseBank) -> tuple[Array, dict[str, Array]]:
    """0.5 (Q(s_c, k_c) − y_c)² over the bank's valid cases, on the features each case was acted with."""
    q = jax.vmap(lambda e, f: q_values(q_params, e, f))(bank.emb, bank.feat)
    taken = jnp.take_along_axis(q, bank.strategy[:, None], axis=1)[:, 0]
    count = jnp.maximum(jnp.sum(bank.valid), 1)
    err = jnp.where(bank.valid, taken - bank.ret, 0.0)
    return 0.5 * jnp.sum(err ** 2) / count, {"q_mean": jnp.sum(jnp.where(bank.valid, taken, 0.0)) / count,
                                             "q_abs_error": jnp.sum(jnp.abs(err)) / count}


@flax.struct.dataclass
class MementoBatch:
    """The cases of a rollout: state embeddings f32[B, T, D], the strategy taken int32[B, T], its soft-Q target
    f32[B, T] (`soft_q_targets`) and the turns that happened bool[B, T]."""

    emb: jax.Array
    strategy: jax.Array
    target: jax.Array
    turn_mask: jax.Array


def make_memento_loss(hyper: MementoHyper):
    """The loss over a `MementoBatch`. The first `write_steps` train steps of an iteration (`memento_updates`
    counts the train steps) write their minibatch's cases into the bank, each with the memory features the acting
    agent saw (retrieved from cases of earlier iterations only); then the Q-MLP is fitted on the whole bank."""

    def loss_fn(params, extras, batch, rng):
        del rng
        count = extras["memento_updates"]
        iteration = count // hyper.steps_per_iteration
        write = (count % hyper.steps_per_iteration) < hyper.write_steps
        d = batch.emb.shape[-1]
        bank = CaseBank.from_extras(extras)
        emb = batch.emb.reshape(-1, d)
        seen_when_acting = bank.stamp < iteration
        feat = jax.vmap(lambda e: q_features(e, bank, seen_when_acting, hyper))(emb)
        bank = write_cases(bank, emb, feat, batch.strategy.reshape(-1), batch.target.reshape(-1),
                           batch.turn_mask.reshape(-1) & write, iteration)
        loss, metrics = q_loss(params["q"], bank)
        metrics.update(bank_fill=jnp.mean(bank.valid.astype(jnp.float32)),
                       target_mean=jnp.sum(jnp.where(batch.turn_mask, batch.target, 0.0)) / jnp.maximum(
                           jnp.sum(batch.turn_mask), 1))
        return loss, (metrics, {**extras, **bank.to_extras(), "memento_updates": count + 1})

    return loss_fn


@flax.struct.dataclass
class MementoCarry:
    inner: Any  # the wrapped ModelAgents' state
    turn: Any  # int32[B]: agent turns taken so far


@dataclasses.dataclass(frozen=True)
class MementoAgents:
    """Rollout policy: the wrapped frozen `ModelAgents` act with Q(s, ·)/α added to their Expert's strategy logits
    (π ∝ π_SFT · exp(Q/α), under the inner agents' own SOP mask and greedy/sampling setting). `params` = the run's
    params plus `bank` (the case-bank extras, see `Memento.acting_params`)."""

    inner: Any
    hyper: MementoHyper
    stage_ids: tuple[int, ...]

    def init(self, params, context, context_valid) -> MementoCarry:
        return MementoCarry(inner=self.inner.init(params, context, context_valid),
                            turn=jnp.zeros((context.shape[0],), jnp.int32))

    def strategy_bias(self, params, carry: MementoCarry, inp) -> Array:
        """f32[B, n_k]: Q(s, ·)/α of this turn's states, every bank case visible (all are from earlier rollouts)."""
        h = self.hyper
        emb = jax.vmap(functools.partial(state_embedding, embed_table=embedding_table(params["expert"]),
                                         num_stages=h.num_stages, max_turns=h.max_turns))(
            inp.customer, inp.customer_valid, stage_index(inp.header[:, -1], self.stage_ids), carry.turn)
        bank = CaseBank.from_extras(params["bank"])
        memory = jax.vmap(lambda e: q_features(e, bank, bank.valid, h))(emb)
        return jax.vmap(lambda e, m: q_values(params["q"], e, m))(emb, memory) / h.alpha

    def act(self, params, carry: MementoCarry, inp, key):
        inner_carry, action = self.inner.act(params, carry.inner, inp, key,
                                             strategy_bias=self.strategy_bias(params, carry, inp))
        return MementoCarry(inner=inner_carry, turn=carry.turn + 1), action
