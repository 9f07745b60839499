"""bf16 compute vs fp32 compute on the SAME fp32 master weights: how far apart are the logits and log-probs?

For the "tiny" and "small" presets and a random 4-layer hidden-256 model, one set of float32 parameters is run
with `dtype="float32"` and with `dtype="bfloat16"` (param_dtype float32 in both: the dtype policy of training)
on padded token buffers (pads in the middle, like dialogue slots). Reported at the valid slots: max / mean
|logit difference|, max |token log-prob difference| (`forward_logprobs`, what every loss reads) and the fraction
of slots whose argmax agrees.

Weights are not the 0.02-std training init (that gives near-uniform logits, hiding the error): projections are
fan-in scaled and the embedding is scaled so the fp32 logits have a std of about 3, like a trained model's.

Goal: max |Δ log-prob| < 0.1. PPO/GRPO clip the probability ratio at 1 ± 0.2, i.e. |Δ log-prob| ≈ 0.18; keeping
the precision noise of one forward below about half of that means bf16 rounding alone cannot push a token to
the clip boundary. (RESULT's ratio is that max difference: lower is better.)

    python -m benchmarks.dtype_parity [--quick] [--batch B] [--seq L]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from gopo_jax import command_line
from gopo_jax.models import qwen3

GOAL = 0.1
LOGIT_STD = 3.0


def _configs(quick: bool) -> dict[str, qwen3.Qwen3Config]:
    configs = {"tiny": qwen3.get_config("tiny"), "small": qwen3.get_config("small")}
    if not quick:
        configs["random-4x256"] = qwen3.Qwen3Config(
            vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4,
            head_dim=32, tie_word_embeddings=False)
    return {name: cfg.replace(dtype="float32", param_dtype="float32") for name, cfg in configs.items()}


def _realistic_params(model: qwen3.Qwen3, key) -> nnx.State:
    """fan-in scaled kernels, norm scales near 1, output embedding scaled to logits of std ~LOGIT_STD."""
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    d = model.config.hidden_size

    def draw(path, x, k):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return 1.0 + 0.1 * jax.random.normal(k, x.shape, x.dtype)
        if "embedding" in name or "lm_head" in name:
            return jax.random.normal(k, x.shape, x.dtype) * (LOGIT_STD / np.sqrt(d))
        return jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[-2])

    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return jax.tree.unflatten(treedef, [draw(p, x, k) for p, x, k in zip(paths, leaves, keys)])


def _batch(cfg, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq)).astype(np.int32)
    valid = np.ones((batch, seq), bool)
    for row in range(batch):  # one pad block in the middle of each row, of random length
        start = rng.integers(1, seq // 2)
        valid[row, start:start + rng.integers(1, seq // 4)] = False
    return jnp.asarray(tokens), qwen3.positions_from_valid(jnp.asarray(valid)), jnp.asarray(valid)


def compare(cfg32: qwen3.Qwen3Config, batch: int, seq: int, seed: int = 0) -> dict[str, float]:
    m32 = qwen3.Qwen3(cfg32, rngs=nnx.Rngs(seed))
    nnx.update(m32, _realistic_params(m32, jax.random.key(seed)))
    graphdef16 = nnx.graphdef(qwen3.Qwen3(cfg32.replace(dtype="bfloat16"), rngs=nnx.Rngs(seed)))
    graphdef32, state = nnx.split(m32)
    tokens, positions, valid = _batch(cfg32, batch, seq, seed)

    @jax.jit
    def run(state):
        out = {}
        for name, graphdef in (("f32", graphdef32), ("bf16", graphdef16)):
            model = nnx.merge(graphdef, state)
            logits, _ = model(tokens, positions, valid)
            out[name] = (logits, qwen3.forward_logprobs(model, tokens, positions, valid))
        return out

    out = jax.device_get(run(state))
    v = np.asarray(valid)
    (l32, lp32), (l16, lp16) = out["f32"], out["bf16"]
    dlogit = np.abs(l16 - l32)[v]
    return dict(logit_std=float(l32[v].std()), max_logit=float(dlogit.max()), mean_logit=float(dlogit.mean()),
                max_logprob=float(np.abs(lp16 - lp32)[v].max()),
                argmax_agree=float((l16.argmax(-1) == l32.argmax(-1))[v].mean()))


def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "tiny and small presets only, short sequences")
    flags.DEFINE_integer("batch", 4, "rows")
    flags.DEFINE_integer("seq", 0, "slots per row (default 64 quick, 256 full)")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    seq = args.seq or (64 if args.quick else 256)
    print(f"same fp32 params, dtype float32 vs bfloat16; [{args.batch}, {seq}] tokens with pads; "
          f"backend={jax.default_backend()}")
    print(f"{'model':14s} {'logit std':>9s} {'max |dlogit|':>12s} {'mean |dlogit|':>13s} "
          f"{'max |dlogp|':>11s} {'argmax agree':>12s}")
    worst = 0.0
    for name, cfg in _configs(args.quick).items():
        r = compare(cfg, args.batch, seq)
        worst = max(worst, r["max_logprob"])
        print(f"{name:14s} {r['logit_std']:9.2f} {r['max_logit']:12.4f} {r['mean_logit']:13.5f} "
              f"{r['max_logprob']:11.4f} {r['argmax_agree']:12.4f}")
    print(f"RESULT dtype_parity ratio={worst:.4f} goal={GOAL}")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
