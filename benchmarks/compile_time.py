"""Compile time of a Qwen3-0.6B-shaped decoder: the layer scan (unroll=1) against the same scan fully unrolled
(unroll=num_layers, which compiles like the old Python loop over layers).

Nothing is allocated: parameters come from `nnx.eval_shape` (ShapeDtypeStructs) and each function is timed as
`jax.jit(f).lower(*abstract_args).compile()` — tracing/lowering and XLA compilation reported separately. Two
functions:

  (a) train: value_and_grad of a loss on `hidden()` plus a few output-embedding rows (the Expert-head shape)
      over [batch, seq] tokens, bf16 compute / fp32 master weights;
  (b) decode: one cached step (1 new token per row) with a KV cache of `seq` slots, logits over the vocabulary.

Run on an older checkout (whose Qwen3Config has no `scan_unroll`), the script times that code's own layer loop
as "python loop"; `--json FILE` saves rows and `--before FILE` adds such rows to this run's table. The persistent
compilation cache is disabled so every number is a cold compile.

    python -m benchmarks.compile_time [--quick] [--layers N] [--seq L] [--json F] [--before F]
"""
from __future__ import annotations

import dataclasses
import json
import math
import time

import jax

jax.config.update("jax_enable_compilation_cache", False)

import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402

from gopo_jax import command_line  # noqa: E402
from gopo_jax.models import qwen3  # noqa: E402

HEAD_ROWS = 8  # output-embedding rows the training loss reads (the Expert's strategy tokens)


def _config(args) -> qwen3.Qwen3Config:
    if args.quick:
        base = qwen3.Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=args.layers or 8,
                                 num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    else:  # Qwen3-0.6B: 28 layers, hidden 1024, intermediate 3072, 16 heads, 8 kv heads, head_dim 128, V 151936
        base = qwen3.get_config("qwen3-0.6b")
        if args.layers:
            base = base.replace(num_layers=args.layers)
    return base.replace(dtype="bfloat16", param_dtype="float32")


def _abstract_model(cfg):
    model = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _train_fn(graphdef):
    def step(params, rest, tokens, positions, valid):
        def loss(p):
            model = nnx.merge(graphdef, p, rest)
            h, _ = model.hidden(tokens, positions, valid)
            rows = model.output_embedding()[:HEAD_ROWS].astype(h.dtype)
            logits = jnp.einsum("bld,vd->blv", h, rows, preferred_element_type=jnp.float32)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

        return jax.value_and_grad(loss)(params)

    return step


def _decode_fn(graphdef):
    def step(params, rest, cache, tokens, positions, valid):
        logits, cache = nnx.merge(graphdef, params, rest)(tokens, positions, valid, cache)
        return logits[:, -1], cache

    return step


def _time_compile(fn, *args) -> tuple[float, float]:
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1


def measure(cfg, name: str, batch: int, seq: int) -> list[dict]:
    graphdef, params, rest = _abstract_model(cfg)
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    rows = []
    lower, comp = _time_compile(_train_fn(graphdef), params, rest, tok, tok, valid)
    rows.append(dict(variant=name, fn="train", layers=cfg.num_layers, lower_s=lower, compile_s=comp))
    cache = jax.eval_shape(lambda: qwen3.init_cache(cfg, batch, seq))
    one = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    lower, comp = _time_compile(_decode_fn(graphdef), params, rest, cache, one, one,
                                jax.ShapeDtypeStruct((batch, 1), jnp.bool_))
    rows.append(dict(variant=name, fn="decode", layers=cfg.num_layers, lower_s=lower, compile_s=comp))
    return rows


def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "toy-size model (for tests)")
    flags.DEFINE_integer("layers", 0, "override the number of layers")
    flags.DEFINE_integer("seq", 256, "tokens per row (train) / cache slots (decode)")
    flags.DEFINE_integer("batch", 1, "rows")
    flags.DEFINE_string("json", None, "write the measured rows to this file")
    flags.DEFINE_string("before", None, "rows from a run on the old code (--json there) to show alongside")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    cfg = _config(args)
    jax.jit(lambda x: x + 1).lower(1).compile()  # backend start-up is not part of any row

    has_scan = "scan_unroll" in {f.name for f in dataclasses.fields(qwen3.Qwen3Config)}
    if has_scan:
        variants = [("scan (unroll=1)", cfg.replace(scan_unroll=1)),
                    (f"unrolled (unroll={cfg.num_layers})", cfg.replace(scan_unroll=cfg.num_layers))]
    else:
        variants = [("python loop", cfg)]
    rows = [row for name, c in variants for row in measure(c, name, args.batch, args.seq)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    shown = rows + ([dict(r, variant=r["variant"] + " [before]") for r in json.load(open(args.before))]
                    if args.before else [])

    print(f"Qwen3 decoder {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"[{args.batch}, {args.seq}] tokens, dtype={cfg.dtype} param_dtype={cfg.param_dtype}, "
          f"backend={jax.default_backend()}")
    print(f"{'variant':34s} {'fn':7s} {'lower s':>9s} {'compile s':>10s} {'total s':>9s}")
    for r in shown:
        print(f"{r['variant']:34s} {r['fn']:7s} {r['lower_s']:9.2f} {r['compile_s']:10.2f} "
              f"{r['lower_s'] + r['compile_s']:9.2f}")

    def total(variant_prefix, fn):
        return next(r["lower_s"] + r["compile_s"] for r in rows
                    if r["variant"].startswith(variant_prefix) and r["fn"] == fn)

    if has_scan:
        for fn in ("train", "decode"):
            print(f"{fn}: unrolled / scan = {total('unrolled', fn) / total('scan', fn):.2f}x")
        ratio = total("unrolled", "train") / total("scan", "train")
    else:
        ratio = math.nan  # the old code has no scan to compare with; its rows go to --before
    print(f"RESULT compile_time ratio={ratio:.2f} goal=5")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
