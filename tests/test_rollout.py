"""Rollout drivers: the record of a rollout is exactly what the training forward pass sees.

* token-in-token-out: the log-probs sampled during the rollout (EA masked softmax and CS tokens, produced with KV
  caches turn by turn) equal those of one forward pass over the assembled buffer;
* disallowed strategies are never chosen; masks and roles are consistent with the layout;
* the pure-JAX scan driver and the Python turn loop give the same trajectory for the same keys;
* the agents' used-rows heads give the trajectory of the full-logits agents they replaced (same keys);
* the turn scan's early exit (every dialogue ended) records what running the ended turns recorded.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax import sampling
from gopo_jax.dialogue import rollout, scoring
from gopo_jax.dialogue.rollout import (ModelAgents, ModelAgentsState, SamplingConfig, TurnAction, _positions,
                                       python_loop_rollout)
from gopo_jax.dialogue.sop import UNRECOGNISED, masked_strategy_log_softmax
from gopo_jax.models import qwen3


def _rollout(world, ge, gc, params, sampling, n=4, seed=0):
    agents = ModelAgents(ge, gc, world.vocab, world.layout, sampling)
    fn = world.make_rollout(agents)
    return fn(params, world.episodes(jax.random.key(seed), n), jax.random.key(seed + 1)), agents


def test_rollout_logprobs_match_training_forward(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(temperature=1.0))
    traj.check(world.layout, world.spec.num_strategies)
    expert = nnx.merge(ge, params["expert"])
    cs = nnx.merge(gc, params["cs"])
    logp_all = scoring.expert_strategy_log_probs(expert, traj, world.layout, world.vocab.strategy_ids)
    ea = scoring.chosen(logp_all, traj.strategy, traj.turn_mask)
    np.testing.assert_allclose(np.asarray(ea), np.asarray(traj.ea_logprob), atol=2e-4)
    cs_logp, _ = scoring.cs_token_log_probs(cs, traj, world.layout)
    m = np.asarray(traj.cs_mask)
    assert m.sum() > 0
    np.testing.assert_allclose(np.asarray(cs_logp)[m], np.asarray(traj.cs_logprob)[m], atol=2e-4)


def test_rollout_respects_sop_and_layout(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(temperature=1.0), n=8, seed=3)
    tm = np.asarray(traj.turn_mask)
    chosen_allowed = np.take_along_axis(np.asarray(traj.allowed), np.asarray(traj.strategy)[..., None], -1)[..., 0]
    assert chosen_allowed[tm].all()
    # exactly one EA decision token per active turn, CS tokens only in reply slots, masks only on valid tokens
    assert (np.asarray(traj.ea_mask).sum(-1) == tm.sum(-1)).all()
    assert not (np.asarray(traj.ea_mask) & np.asarray(traj.cs_mask)).any()
    assert (np.asarray(traj.valid) | ~np.asarray(traj.cs_mask)).all()
    dec = np.asarray(traj.tokens)[np.asarray(traj.ea_mask)]
    assert set(dec.tolist()) <= set(world.vocab.strategy_ids)


def test_no_expert_rollout_has_no_decisions(tiny_world):
    world, ge, gc, params = tiny_world
    traj, _ = _rollout(world, ge, gc, params, SamplingConfig(use_expert=False), n=4)
    assert not np.asarray(traj.ea_mask).any()
    assert np.asarray(traj.cs_mask).any()


def test_scan_driver_equals_python_turn_loop(tiny_world):
    world, ge, gc, params = tiny_world
    sampling = SamplingConfig(temperature=1.0)
    traj, agents = _rollout(world, ge, gc, params, sampling, n=4, seed=5)
    loop = python_loop_rollout(world.env, world.layout, world.vocab, agents)
    other = loop(params, world.episodes(jax.random.key(5), 4), jax.random.key(6))
    for f in dataclasses.fields(traj):
        np.testing.assert_allclose(np.asarray(getattr(traj, f.name), np.float32),
                                   np.asarray(getattr(other, f.name), np.float32), atol=1e-5, err_msg=f.name)


@dataclasses.dataclass(frozen=True)
class _FullLogitsAgents(ModelAgents):
    """The model agents as they were before the used-rows heads (full [B, L, V] logits at every call, the
    strategy columns and the reply-start row picked from them), kept as the reference of the new `ModelAgents`."""

    def init(self, params, context, context_valid):
        b = context.shape[0]
        cs = nnx.merge(self.cs_graphdef, params["cs"])
        pos = _positions(jnp.zeros((b,), jnp.int32), context_valid)
        cs_cache = qwen3.init_cache(cs.config, b, self.layout.length)
        _, cs_cache = cs(context, pos, context_valid, cs_cache)
        expert = nnx.merge(self.expert_graphdef, params["expert"])
        expert_cache = qwen3.init_cache(expert.config, b, self.layout.length)
        _, expert_cache = expert(context, pos, context_valid, expert_cache)
        return ModelAgentsState(expert_cache=expert_cache, cs_cache=cs_cache,
                                num_valid=context_valid.sum(-1).astype(jnp.int32))

    def act(self, params, carry, inp, key):
        cfg, vocab = self.sampling, self.vocab
        k_expert, k_cs = jax.random.split(key)
        chunk = jnp.concatenate([inp.customer, inp.header], axis=1)
        chunk_valid = jnp.concatenate([inp.customer_valid, inp.header_valid], axis=1)
        n_after_chunk = carry.num_valid + chunk_valid.sum(-1).astype(jnp.int32)
        strategy_ids = jnp.asarray(vocab.strategy_ids, jnp.int32)
        expert = nnx.merge(self.expert_graphdef, params["expert"])
        logits, expert_cache = expert(chunk, _positions(carry.num_valid, chunk_valid), chunk_valid,
                                      carry.expert_cache)
        logp_all = masked_strategy_log_softmax(logits[:, -1, :][:, strategy_ids], inp.allowed)
        strategy = jax.random.categorical(k_expert, logp_all / cfg.expert_temperature).astype(jnp.int32)
        strategy_logp = jnp.take_along_axis(logp_all, strategy[:, None], axis=1)[:, 0]
        decision_valid = inp.active
        decision_tok = jnp.where(decision_valid, strategy_ids[jnp.clip(strategy, 0)], vocab.pad)
        cs = nnx.merge(self.cs_graphdef, params["cs"])
        cs_chunk = jnp.concatenate([chunk, decision_tok[:, None]], axis=1)
        cs_valid = jnp.concatenate([chunk_valid, decision_valid[:, None]], axis=1)
        logits, cs_cache = cs(cs_chunk, _positions(carry.num_valid, cs_valid), cs_valid, carry.cs_cache)
        last_logits = jnp.where(decision_valid[:, None], logits[:, -1, :], logits[:, -2, :])
        n_before_reply = n_after_chunk + decision_valid.astype(jnp.int32)
        reply, reply_logp, lengths, cs_cache = _full_logits_decode(
            cs, cs_cache, last_logits, k_cs, max_new_tokens=self.layout.reply_len, eot=vocab.eot, pad_id=vocab.pad,
            temperature=cfg.temperature, start_positions=n_before_reply,
            max_lengths=jnp.where(inp.active, self.layout.reply_len, 0))
        reply_valid = jnp.arange(self.layout.reply_len)[None, :] < lengths[:, None]
        tail = jnp.concatenate([decision_tok[:, None], reply], axis=1)
        tail_valid = jnp.concatenate([decision_valid[:, None], reply_valid], axis=1)
        _, expert_cache = expert(tail, _positions(n_after_chunk, tail_valid), tail_valid, expert_cache)
        carry = ModelAgentsState(expert_cache=expert_cache, cs_cache=cs_cache,
                                 num_valid=n_before_reply + lengths.astype(jnp.int32))
        return carry, TurnAction(strategy=strategy, strategy_logp=strategy_logp, decision_valid=decision_valid,
                                 reply=reply, reply_valid=reply_valid,
                                 reply_logp=jnp.where(reply_valid, reply_logp, 0.0))


def _full_logits_decode(model, cache, last_logits, key, *, max_new_tokens, eot, pad_id, temperature,
                        start_positions, max_lengths):
    """`sampling.decode` before the heads: sample from the previous step's full logits, run the model every step."""
    b = last_logits.shape[0]

    def step(carry, _):
        cache, logits, key, done, lengths, positions = carry
        key, sub = jax.random.split(key)
        ids, logp = sampling.sample_token(sub, logits, temperature=temperature)
        active = ~done
        ids = jnp.where(active, ids, pad_id).astype(jnp.int32)
        logp = jnp.where(active, logp, 0.0)
        lengths = lengths + active.astype(jnp.int32)
        done = done | (active & (ids == eot)) | (lengths >= max_lengths)
        logits, cache = model(ids[:, None], positions[:, None], active[:, None], cache)
        return (cache, logits[:, 0], key, done, lengths, positions + active.astype(jnp.int32)), (ids, logp)

    init = (cache, last_logits, key, max_lengths <= 0, jnp.zeros((b,), jnp.int32), start_positions)
    (cache, _, _, _, lengths, _), (tokens, logprobs) = jax.lax.scan(step, init, None, length=max_new_tokens)
    return tokens.T, logprobs.T, lengths, cache


def _plain_scan_rollout(world, agents, params, env_keys, agent_key):
    """`rollout_jax` without the early exit: every turn runs the agents and the environment."""
    env, layout = world.env, world.layout
    state, context, context_valid, obs, carry = rollout._start(env, agents, params, env_keys)
    turn = functools.partial(rollout._turn, env, world.vocab, agents, params, agent_key)
    (state, _, _), (turns, signals) = jax.lax.scan(turn, (state, obs, carry), jnp.arange(layout.max_turns))
    return rollout.assemble(layout, context, context_valid, turns, signals, jax.vmap(env.outcome)(state))


def _assert_same_trajectory(traj, other, atol):
    for f in dataclasses.fields(traj):
        a, b = np.asarray(getattr(traj, f.name)), np.asarray(getattr(other, f.name))
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, atol=atol, err_msg=f.name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)


def test_used_rows_agents_equal_full_logits_agents(tiny_world):
    """Same keys, same trajectory: identical tokens, strategies and masks, log-probs to 1e-5."""
    world, ge, gc, params = tiny_world
    sampling_cfg = SamplingConfig(temperature=1.0)
    traj, _ = _rollout(world, ge, gc, params, sampling_cfg, n=4, seed=7)
    reference = _FullLogitsAgents(ge, gc, world.vocab, world.layout, sampling_cfg)
    ref = jax.jit(functools.partial(_plain_scan_rollout, world, reference))(
        params, world.episodes(jax.random.key(7), 4), jax.random.key(8))
    assert np.asarray(traj.cs_mask).sum() > 0
    _assert_same_trajectory(traj, ref, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class _ModelAgentsScriptedMoves:
    """Model agents (KV caches, sampling, log-probs) whose moves are replaced by the env's reference turn: the
    reference ends every tiny-world dialogue before the last turn, so the turn scan's early exit runs."""

    inner: ModelAgents
    env: object

    def init(self, params, context, context_valid):
        return self.inner.init(params, context, context_valid)

    def act(self, params, carry, inp, key):
        carry, act = self.inner.act(params, carry, inp, key)
        b = inp.active.shape[0]
        strategy, reply, reply_valid = jax.vmap(self.env.reference_turn)(inp.env_state, jax.random.split(key, b))
        reply_valid = reply_valid & inp.active[:, None]
        return carry, act.replace(strategy=strategy.astype(jnp.int32), reply_valid=reply_valid,
                                  reply=jnp.where(reply_valid, reply, self.inner.vocab.pad))


def test_turn_scan_early_exit_gives_the_same_trajectory(tiny_world):
    world, ge, gc, params = tiny_world
    agents = _ModelAgentsScriptedMoves(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()), world.env)
    keys, agent_key = world.episodes(jax.random.key(11), 6), jax.random.key(12)
    early = world.make_rollout(agents)(params, keys, agent_key)
    plain = jax.jit(functools.partial(_plain_scan_rollout, world, agents))(params, keys, agent_key)
    tm = np.asarray(early.turn_mask)
    assert tm[:, 0].all() and not tm[:, -1].any(), "every dialogue must end early for the early exit to run"
    _assert_same_trajectory(early, plain, atol=0.0)
    assert (np.asarray(early.strategy)[~tm] == UNRECOGNISED).all()  # ended turns record no strategy
