"""Throughput of KV-cached prefill and decode (gopo_jax.sampling), each against a side-by-side reference.

    python -m benchmarks.bench_sampling [--configs tiny small] [--batch 4] [--prompt 64] [--new 64]

Prefill (one forward over the whole prompt) is compared with feeding the prompt through the cache one token
at a time; cached decode is compared with decoding by full recomputation (every step re-runs the model over
the whole fixed-size buffer, no cache). Greedy, random weights; tokens/s counts batch * tokens. Times are the
median of a few runs after one compile run.
"""
import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from gopo_jax import sampling
from gopo_jax.models import qwen3


def _median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name, batch, prompt_len, new_tokens, repeats):
    cfg = qwen3.get_config(name)
    graphdef, state = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.random.randint(jax.random.key(1), (batch, prompt_len), 1, cfg.vocab_size, jnp.int32)
    valid = jnp.ones((batch, prompt_len), bool)
    total = prompt_len + new_tokens
    no_stop = jnp.zeros((0,), jnp.int32)

    @jax.jit
    def prefill(state, tokens):
        cache = qwen3.init_cache(cfg, batch, total)
        return sampling.prefill(nnx.merge(graphdef, state), cache, tokens, valid)

    @jax.jit
    def prefill_token_by_token(state, tokens):
        model = nnx.merge(graphdef, state)

        def step(cache, i):
            tok = jax.lax.dynamic_slice_in_dim(tokens, i, 1, axis=1)
            logits, cache = model(tok, jnp.full((batch, 1), i, jnp.int32), jnp.ones((batch, 1), bool), cache)
            return cache, logits[:, 0]

        cache, logits = jax.lax.scan(step, qwen3.init_cache(cfg, batch, total), jnp.arange(prompt_len))
        return logits[-1], cache

    last, positions, cache = prefill(state, tokens)

    @jax.jit
    def decode_cached(state, cache, last):
        return sampling.decode(nnx.merge(graphdef, state), cache, last, jax.random.key(0), max_new_tokens=new_tokens,
                               stop_tokens=no_stop, pad_id=0, temperature=0.0, start_positions=positions)[0]

    @jax.jit
    def decode_recompute(state, tokens):
        model = nnx.merge(graphdef, state)
        buf = jnp.zeros((batch, total), jnp.int32).at[:, :prompt_len].set(tokens)
        pos = jnp.broadcast_to(jnp.arange(total, dtype=jnp.int32), (batch, total))

        def step(buf, i):
            cur = prompt_len + i  # slots < cur are filled; later slots are masked out as pads
            logits, _ = model(buf, pos, pos < cur)
            ids, _ = sampling.sample_token(jax.random.key(0), logits[:, cur - 1], temperature=0.0)
            return jax.lax.dynamic_update_slice(buf, ids[:, None], (0, cur)), ids

        _, ids = jax.lax.scan(step, buf, jnp.arange(new_tokens))
        return ids.T

    same = bool(jnp.array_equal(decode_cached(state, cache, last), decode_recompute(state, tokens)))
    t_pre = _median_seconds(lambda: prefill(state, tokens), repeats)
    t_pre_ref = _median_seconds(lambda: prefill_token_by_token(state, tokens), repeats)
    t_dec = _median_seconds(lambda: decode_cached(state, cache, last), repeats)
    t_dec_ref = _median_seconds(lambda: decode_recompute(state, tokens), repeats)
    n_params = qwen3.count_params(nnx.merge(graphdef, state))
    print(f"[{name}] {n_params / 1e6:.2f}M params, batch {batch}, prompt {prompt_len}, new {new_tokens}, "
          f"device {jax.devices()[0].device_kind}")
    print(f"  prefill         {batch * prompt_len / t_pre:10.0f} tok/s   token-by-token reference "
          f"{batch * prompt_len / t_pre_ref:10.0f} tok/s   ratio {t_pre_ref / t_pre:6.1f}x")
    print(f"  decode (cache)  {batch * new_tokens / t_dec:10.0f} tok/s   full-recompute reference "
          f"{batch * new_tokens / t_dec_ref:10.0f} tok/s   ratio {t_dec_ref / t_dec:6.1f}x   "
          f"same greedy tokens: {same}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name in args.configs:
        bench(name, args.batch, args.prompt, args.new, args.repeats)


if __name__ == "__main__":
    main()
