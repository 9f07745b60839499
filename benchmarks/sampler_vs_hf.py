"""Greedy generation throughput: our sampler (gopo_jax.sampling.generate) against Hugging Face transformers.

    python -m benchmarks.sampler_vs_hf [--batch 32] [--prompt 32] [--new 128] [--repeats 3] [--quick] [--profile]

One random Qwen3 (hidden 256, 4 layers, vocab 8192, 4 heads / 2 kv heads, head_dim 64, intermediate 768) is built
in our code, written with our `hf_io.save_pretrained` and read by `transformers.Qwen3ForCausalLM.from_pretrained`
from that folder, so both sides run the same weights. Both decode the same random prompts greedily for exactly
`--new` tokens (no stop token; HF with min_new_tokens) and must emit identical tokens. PyTorch runs on the CPU with
2 threads (the CPU share of one benchmark on the 2-core development machines); our side runs on JAX's default
backend. tokens/s = batch * new tokens / seconds of a whole generate call (prefill included), the median of
`--repeats` runs after a first, untimed run (our compile, HF's warm-up); the compile time is printed separately.
`--profile` adds a breakdown of our time: the whole generate call, prefill, the decode loop against a scan of the
bare model calls, one model call and the sampler head (static and traced greedy temperature) alone.
"""
from __future__ import annotations

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from gopo_jax import command_line, sampling
from gopo_jax.models import hf_io, qwen3

MODEL = qwen3.Qwen3Config(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                          num_kv_heads=2, head_dim=64, tie_word_embeddings=False, max_position_embeddings=2048)
TORCH_THREADS = 2


def _timed(fn, repeats: int) -> tuple[float, float, object]:
    """(first call seconds, median of `repeats` later calls, the first call's result)."""
    start = time.perf_counter()
    first = fn()
    first_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first_s, statistics.median(times), first


def ours_generate(model, prompts: np.ndarray, new_tokens: int):
    valid = np.ones(prompts.shape, bool)

    def run():
        # Full float32 matmuls, as PyTorch does on the CPU: on GPUs JAX's default lets float32 matmuls run in TF32,
        # whose rounding flips near-tied greedy choices of a random model.
        with jax.default_matmul_precision("highest"):
            out = sampling.generate(model, prompts, valid, jax.random.key(0), max_new_tokens=new_tokens,
                                    temperature=0.0)
        return np.asarray(jax.block_until_ready(out.tokens))

    return run


def hf_generate(hf_model, prompts: np.ndarray, new_tokens: int):
    import torch

    ids = torch.from_numpy(prompts.astype(np.int64))
    mask = torch.ones_like(ids)  # no padding here; the mask is explicit so that HF does not guess one

    def run():
        with torch.no_grad():
            out = hf_model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        return out[:, prompts.shape[1]:].numpy()

    return run


def _best_seconds(fn, repeats: int) -> float:
    """Best of `repeats` calls after a compiling one: on a shared machine noise only adds time."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def profile_ours(model, prompts: np.ndarray, new_tokens: int, repeats: int) -> None:
    """Where our time goes: pieces of `generate` jitted alone on its shapes. The decode loop is compared with a
    `lax.scan` of the bare model calls over the same cache, so the difference is the loop's own cost (sampling,
    the early-exit `cond`, carried buffers)."""
    b, p = prompts.shape
    graphdef, state = nnx.split(model)
    tokens, valid = jnp.asarray(prompts), jnp.ones(prompts.shape, bool)
    cache_len = p + new_tokens

    @jax.jit
    def prefill(state):
        m = nnx.merge(graphdef, state)
        return sampling.prefill(m, qwen3.init_cache(m.config, b, cache_len), tokens, valid)

    last_logits, positions, cache = prefill(state)
    ids = jnp.argmax(last_logits, -1).astype(jnp.int32)

    def model_call(state, cache, ids, positions):
        logits, cache = nnx.merge(graphdef, state)(ids[:, None], positions[:, None], jnp.ones((b, 1), bool), cache)
        return logits[:, 0], cache

    @jax.jit
    def model_calls_scanned(state, cache):
        def one(cache, i):
            logits, cache = model_call(state, cache, ids, positions + i)
            return cache, jnp.max(logits, axis=-1)  # consumes every column: the lm_head is not pruned
        return jax.lax.scan(one, cache, jnp.arange(new_tokens))

    @jax.jit
    def decode_only(state, cache, last_logits, positions):
        m = nnx.merge(graphdef, state)
        return sampling.decode(m, cache, last_logits, jax.random.key(0), max_new_tokens=new_tokens,
                               stop_tokens=jnp.zeros((0,), jnp.int32), pad_id=0, temperature=0.0,
                               start_positions=positions)[0]

    head = jax.jit(lambda logits: sampling.sample_token(jax.random.key(0), logits, temperature=0.0))
    # `generate` passes the temperature as a traced array, so its greedy steps run the sampling branch as well.
    traced_head = jax.jit(lambda logits, t: sampling.sample_token(jax.random.key(0), logits, temperature=t))
    one_call = jax.jit(model_call)
    seconds = {
        "generate, whole (prefill + decode)": _best_seconds(ours_generate(model, prompts, new_tokens), repeats),
        "prefill (one forward over the prompt)": _best_seconds(lambda: prefill(state), repeats),
        "decode loop (sampling.decode), all steps": _best_seconds(
            lambda: decode_only(state, cache, last_logits, positions), repeats),
        "scan of bare model calls, all steps": _best_seconds(lambda: model_calls_scanned(state, cache), repeats),
        "one model call (1 token, cache), alone": _best_seconds(lambda: one_call(state, cache, ids, positions),
                                                                repeats),
        "one sampler head, temperature static 0, alone": _best_seconds(lambda: head(last_logits), repeats),
        "one sampler head, temperature traced 0, alone": _best_seconds(
            lambda: traced_head(last_logits, jnp.float32(0.0)), repeats),
    }
    print(f"\nprofile of ours (best of {repeats}, compile excluded; decode alone runs with a static temperature 0):")
    for label, s in seconds.items():
        print(f"  {label:50s} {s * 1e3:9.2f} ms")
    loop = seconds["decode loop (sampling.decode), all steps"] / new_tokens
    bare = seconds["scan of bare model calls, all steps"] / new_tokens
    print(f"  per decode step: loop {loop * 1e3:.2f} ms = model {bare * 1e3:.2f} ms + loop's own "
          f"{(loop - bare) * 1e3:.2f} ms (sampling, cond, carries)")


def define_flags() -> None:
    flags.DEFINE_integer("batch", 32, "prompts decoded together")
    flags.DEFINE_integer("prompt", 32, "prompt tokens")
    flags.DEFINE_integer("new", 128, "new tokens decoded greedily")
    flags.DEFINE_integer("repeats", 3, "timed repetitions")
    flags.DEFINE_bool("quick", False, "toy sizes (batch 4, prompt 8, 16 new tokens, 1 repeat)")
    flags.DEFINE_bool("profile", False, "also break our time down by phase")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    if args.quick:
        args.batch, args.prompt, args.new, args.repeats = 4, 8, 16, 1

    import torch
    import transformers

    torch.set_num_threads(TORCH_THREADS)
    ours = qwen3.Qwen3(MODEL, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as folder:
        hf_io.save_pretrained(ours, folder)
        hf_model = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = np.random.RandomState(0).randint(1, MODEL.vocab_size, (args.batch, args.prompt)).astype(np.int32)

    ours_compile, ours_s, ours_tokens = _timed(ours_generate(ours, prompts, args.new), args.repeats)
    hf_first, hf_s, hf_tokens = _timed(hf_generate(hf_model, prompts, args.new), args.repeats)
    mismatch = np.argwhere(ours_tokens != hf_tokens)
    assert mismatch.size == 0, (f"greedy tokens differ from Hugging Face's at {len(mismatch)} places, first "
                                f"(row, step) {tuple(mismatch[0])}")

    generated = args.batch * args.new
    ours_rate, hf_rate = generated / ours_s, generated / hf_s
    print(f"Qwen3 {qwen3.count_params(ours) / 1e6:.1f}M params (hidden {MODEL.hidden_size}, {MODEL.num_layers} "
          f"layers, vocab {MODEL.vocab_size}); batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, "
          f"greedy; ours on {jax.devices()[0].device_kind}, HF transformers {transformers.__version__} "
          f"(torch {torch.__version__}, {TORCH_THREADS} threads)")
    print(f"identical greedy tokens: {generated} of {generated}")
    print(f"{'':28s} {'tokens/s':>10s} {'s/generate':>11s} {'first call s':>13s}")
    print(f"{'ours (sampling.generate)':28s} {ours_rate:10.0f} {ours_s:11.3f} {ours_compile:13.2f}  (compile)")
    print(f"{'HF Qwen3ForCausalLM':28s} {hf_rate:10.0f} {hf_s:11.3f} {hf_first:13.2f}  (warm-up)")
    if args.profile:
        with jax.default_matmul_precision("highest"):  # as in ours_generate
            profile_ours(ours, prompts, args.new, args.repeats)
    print(f"RESULT sampler_vs_hf ratio={ours_rate / hf_rate:.3f} goal=3")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
