"""Token sampling for rollouts: prefill a prompt into the KV cache, then decode with a fixed-step `lax.scan`.

Everything here is a pure function of arrays and static Python numbers, so it runs inside another `jit` or
`lax.scan` (the rollout driver decodes one dialogue turn after another into the same cache). The model is
passed as an NNX module; under a transformation use the functional pattern:

    graphdef, state = nnx.split(model)                      # once, outside
    @jax.jit
    def rollout(state, ...):
        model = nnx.merge(graphdef, state)                  # inside: a module backed by traced arrays
        tokens, logprobs, lengths, cache = decode(model, cache, last_logits, key, ...)

`decode` itself splits/merges the module again inside its scan body, so callers never close over NNX
Variables across trace levels. `generate` wraps prefill + decode in one `jax.jit` with static shape
arguments: it compiles once per (batch, prompt length, max_new_tokens) bucket and model graph.

Log-probabilities. `sample_token` draws from the temperature-scaled, top-k/top-p filtered distribution
(`heads.SamplingDist`) and returns the drawn id's log-prob under that same distribution: the behaviour log-prob
that importance ratios need (GOPO.md §1). The trainers recompute it with the same `SamplingDist`
(`scoring.cs_token_log_probs`), so at θ = θ_old every ratio is 1; greedy decoding (temperature 0) records the
model's own log softmax(logits)[id], which is also what `qwen3.forward_logprobs` recomputes from the tokens.
"""
from __future__ import annotations

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax.models.heads import SamplingDist, check_filters
from gopo_jax.models.qwen3 import KVCache, Qwen3, init_cache


@flax.struct.dataclass
class GenerateOutput:
    tokens: jax.Array  # int32[B, N]: generated ids, pad_id after a sequence stopped
    logprobs: jax.Array  # float32[B, N]: log-probs of the ids under the sampled distribution, 0.0 on pads
    lengths: jax.Array  # int32[B]: generated tokens per sequence, the stop token included


def sample_token(key: jax.Array, logits: jax.Array, *, temperature=1.0, top_k: int = 0,
                 top_p: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Draws one id per row from softmax(filter(logits / temperature)). Returns (ids int32[B], logprob float32[B]):
    each id's log-prob under the distribution it was drawn from (`SamplingDist`).

    temperature == 0 is greedy (argmax of the raw logits, so top-k/top-p do not matter) and its log-prob is the
    model's log_softmax(logits)[id]; temperature may be a traced scalar.
    """
    chex.assert_rank(logits, 2)
    logits = logits.astype(jnp.float32)

    def log_prob_of(ids, dist_logits):
        return jnp.take_along_axis(jax.nn.log_softmax(dist_logits, axis=-1), ids[:, None], axis=-1)[:, 0]

    def greedy(logits):
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return ids, log_prob_of(ids, logits)

    def draw(logits, t):
        dist_logits = SamplingDist(temperature=t, top_k=top_k, top_p=top_p).logits(logits)
        ids = jax.random.categorical(key, dist_logits, axis=-1).astype(jnp.int32)
        return ids, log_prob_of(ids, dist_logits)

    if isinstance(temperature, (int, float)):
        return greedy(logits) if temperature == 0 else draw(logits, temperature)
    # A traced temperature: branch at run time, so a greedy call (temperature 0) skips the sort, filter and
    # draw of a sampling step rather than computing them and masking them out (~6x the greedy step's cost).
    temperature = jnp.asarray(temperature, jnp.float32)
    safe_t = jnp.where(temperature > 0, temperature, 1.0)  # the draw branch's division, also traced at t == 0
    return jax.lax.cond(temperature > 0, lambda x: draw(x, safe_t), greedy, logits)


def prefill(model: Qwen3, cache: KVCache, tokens: jax.Array, valid: jax.Array,
            start_positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array, KVCache]:
    """Writes a (possibly padded) chunk into the cache.

    Returns (last_logits float32[B, V] at each row's last valid slot, next_positions int32[B], cache).
    Positions continue from `start_positions` (default 0) and skip pads. Each row needs >= 1 valid token.
    """
    chex.assert_rank([tokens, valid], 2)
    b, length = tokens.shape
    if start_positions is None:
        start_positions = jnp.zeros((b,), jnp.int32)
    counts = jnp.cumsum(valid.astype(jnp.int32), axis=1)
    positions = start_positions[:, None] + jnp.maximum(counts - 1, 0)
    h, cache = model.hidden(tokens, positions.astype(jnp.int32), valid, cache)
    last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    # Only the row that predicts the next token becomes logits: [B, V], not [B, L, V].
    last_logits = model.logits(h[jnp.arange(b), last])
    return last_logits, (start_positions + counts[:, -1]).astype(jnp.int32), cache


def decode(model: Qwen3, cache: KVCache, last_logits: jax.Array, key: jax.Array, *, max_new_tokens: int,
           stop_tokens: jax.Array, pad_id: int, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
           start_positions: jax.Array, max_lengths: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array, jax.Array, KVCache]:
    """Generates exactly `max_new_tokens` steps (static), each written to the cache.

    Returns (tokens int32[B, N], logprobs float32[B, N], lengths int32[B], cache with index advanced by N).
    A sequence stops after emitting any of `stop_tokens` (that token is output and counted) or after
    `max_lengths[b]` tokens; its later slots hold pad_id, log-prob 0 and are written with valid=False so the
    cache's reply slots stay aligned and the pads are invisible to later turns. Once every sequence has
    stopped the remaining steps skip both the sampling and the model call (they only advance the cache).
    """
    chex.assert_rank([last_logits, start_positions, stop_tokens], [2, 1, 1])
    b = last_logits.shape[0]
    graphdef, state = nnx.split(model)
    if max_lengths is None:
        max_lengths = jnp.full((b,), max_new_tokens, jnp.int32)
    stop_tokens = jnp.asarray(stop_tokens, jnp.int32)

    def live_step(cache, logits, sub, done, lengths, positions):
        ids, logp = sample_token(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p)
        active = ~done
        ids = jnp.where(active, ids, pad_id).astype(jnp.int32)
        logp = jnp.where(active, logp, 0.0)
        lengths = lengths + active.astype(jnp.int32)
        stopped = active & jnp.any(ids[:, None] == stop_tokens[None, :], axis=-1)
        done = done | stopped | (lengths >= max_lengths)
        model = nnx.merge(graphdef, state)
        h, cache = model.hidden(ids[:, None], positions[:, None], active[:, None], cache)
        positions = positions + active.astype(jnp.int32)
        return (cache, model.logits(h[:, 0]), done, lengths, positions), (ids, logp)

    def stopped_step(cache, logits, sub, done, lengths, positions):
        # Every sequence has stopped: no sampling and no model call; the slot becomes an invisible pad.
        zero = jnp.zeros((), jnp.int32)
        valid = jax.lax.dynamic_update_slice(cache.valid, jnp.zeros((b, 1), bool), (zero, cache.index))
        cache = cache.replace(valid=valid, index=cache.index + 1)
        return (cache, logits, done, lengths, positions), (jnp.full((b,), pad_id, jnp.int32),
                                                           jnp.zeros((b,), jnp.float32))

    def step(carry, _):
        cache, logits, key, done, lengths, positions = carry
        key, sub = jax.random.split(key)  # outside the cond: the key stream does not depend on early stops
        (cache, logits, done, lengths, positions), out = jax.lax.cond(
            jnp.any(~done), live_step, stopped_step, cache, logits, sub, done, lengths, positions)
        return (cache, logits, key, done, lengths, positions), out

    init = (cache, last_logits.astype(jnp.float32), key, max_lengths <= 0, jnp.zeros((b,), jnp.int32),
            start_positions.astype(jnp.int32))
    (cache, _, _, _, lengths, _), (tokens, logprobs) = jax.lax.scan(step, init, None, length=max_new_tokens)
    return tokens.T, logprobs.T, lengths, cache


def _generate(graphdef, state, prompt_tokens, prompt_valid, key, stop_tokens, temperature, max_lengths, *,
              max_new_tokens, pad_id, top_k, top_p, cache_len):
    model = nnx.merge(graphdef, state)
    b, p = prompt_tokens.shape
    cache = init_cache(model.config, b, cache_len or p + max_new_tokens)
    last_logits, positions, cache = prefill(model, cache, prompt_tokens, prompt_valid)
    tokens, logprobs, lengths, _ = decode(
        model, cache, last_logits, key, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, pad_id=pad_id,
        temperature=temperature, top_k=top_k, top_p=top_p, start_positions=positions, max_lengths=max_lengths)
    return GenerateOutput(tokens=tokens, logprobs=logprobs, lengths=lengths)


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "max_new_tokens", "pad_id", "top_k", "top_p",
                                                    "cache_len"))


def generate(model: Qwen3, prompt_tokens: jax.Array, prompt_valid: jax.Array, key: jax.Array, *,
             max_new_tokens: int, stop_tokens=(), pad_id: int = 0, temperature=1.0, top_k: int = 0,
             top_p: float = 1.0, max_lengths: jax.Array | None = None, cache_len: int | None = None
             ) -> GenerateOutput:
    """Prefill + decode, jitted. prompt_tokens/prompt_valid: [B, P] (pads anywhere, >= 1 valid per row).

    Shapes, pad_id, top_k, top_p and cache_len are static (one compile per bucket); temperature,
    stop_tokens' values and max_lengths are traced. cache_len defaults to P + max_new_tokens.
    """
    chex.assert_rank([prompt_tokens, prompt_valid], 2)
    check_filters(top_k, top_p)
    b = prompt_tokens.shape[0]
    if max_lengths is None:
        max_lengths = jnp.full((b,), max_new_tokens, jnp.int32)
    graphdef, state = nnx.split(model)
    return _generate_jit(graphdef, state, jnp.asarray(prompt_tokens, jnp.int32), jnp.asarray(prompt_valid, bool),
                         key, jnp.asarray(stop_tokens, jnp.int32).reshape(-1), jnp.asarray(temperature, jnp.float32),
                         jnp.asarray(max_lengths, jnp.int32), max_new_tokens=max_new_tokens, pad_id=pad_id,
                         top_k=top_k, top_p=float(top_p), cache_len=cache_len)
