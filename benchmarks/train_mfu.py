"""FLOP utilisation of the warm-start (SFT) and the GOPO train steps on real rollout batches.

    python -m benchmarks.train_mfu [--presets tiny --presets small] [--groups 16] [--group_size 4] [--minibatches 2]
                                   [--steps 5] [--dtype float32] [--quick]

For each model preset a run is built from configs/mgshop.py (the synthetic shop; `model.preset` with the preset's
own hidden size, depth and MLP width; the vocabulary is the world's tokenizer's, as in a run), so the batches are the run's own: the SFT step trains on a minibatch of the
scripted demonstrations, the GOPO step on minibatch 0 of the method's prepared batch (`prepare_batch`: scores and
reference log-probs) of one rollout by the run's `rollout`. Each step is the pure train step jitted on its own
(state donated) and timed as the best of `--steps` calls after compiling.

Useful FLOPs are counted analytically, for what the objective needs and nothing else:
  * every valid token (pads excluded) through every layer's projections and MLP: 2 · tokens · matmul params;
  * causal attention among a row's valid tokens only: 4 · heads · head_dim · n(n+1)/2 per layer for n tokens;
  * the logits that are used: the Expert's strategy rows (n_k columns) at the decisions that happened, the CS's full
    vocabulary at its reply tokens (cs_mask);
  * both agents, forward + backward = 3 × forward.
Hardware FLOPs are the matmul FLOPs the step executes as traced (its jaxpr: every dot_general, pads, masked
attention, unused logit columns and rematerialised forwards included; a `scan` body times its length). They are
cross-checked with XLA's own count, `compiled.cost_analysis()['flops']` (elementwise ops included), which counts a
loop body ONCE: with the layer scan unrolled (like a Python loop over layers) it is within ~5% of the traced count
(tiny preset, forward + backward), with the scan rolled it is about num_layers times too low. Useful and hardware FLOPs are divided by the step time and by this machine's matmul peak measured here
(benchmarks.peak, in the model's compute dtype).
"""
from __future__ import annotations

import dataclasses
import tempfile
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks.peak import matmul_peak_flops
from configs import mgshop
from gopo_jax import command_line
from gopo_jax.algorithms.sft import DemoBatch
from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.models import qwen3
from gopo_jax.train.build import build
from gopo_jax.train.phases import Phases, group_minibatches
from gopo_jax.train.step import pure_train_step


@dataclasses.dataclass(frozen=True)
class StepResult:
    name: str
    seconds: float
    valid_tokens: int  # per agent
    useful_flops: float
    hardware_flops: float  # the jaxpr's matmul FLOPs, loops counted in full
    xla_flops: float  # compiled.cost_analysis()['flops'], loop bodies counted once
    compile_seconds: float


def forward_flops(cfg: qwen3.Qwen3Config, valid: np.ndarray, logit_rows: int, logit_columns: int) -> float:
    """Useful FLOPs of one forward over rows with `valid` tokens (bool[B, L]) and `logit_rows` output rows of
    `logit_columns` vocabulary columns each."""
    d, hd, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    matmul_params = (d * cfg.num_heads * hd + 2 * d * cfg.num_kv_heads * hd + cfg.num_heads * hd * d
                     + 3 * d * cfg.intermediate_size)
    n = valid.sum(axis=1).astype(np.float64)
    projections = 2.0 * n.sum() * layers * matmul_params
    attention = layers * 4.0 * cfg.num_heads * hd * float((n * (n + 1) / 2).sum())
    head = 2.0 * d * logit_rows * logit_columns
    return projections + attention + head


def useful_train_flops(cfg: qwen3.Qwen3Config, traj: Trajectory, num_strategies: int, use_expert: bool) -> float:
    """Forward + backward (3 × forward) of both agents on `traj` (see the module docstring)."""
    valid = np.asarray(traj.valid)
    cs = forward_flops(cfg, valid, int(np.asarray(traj.cs_mask).sum()), cfg.vocab_size)
    expert = forward_flops(cfg, valid, int(np.asarray(traj.turn_mask).sum()), num_strategies) if use_expert else 0.0
    return 3.0 * (cs + expert)


def _cudnn_attention_flops(eqn) -> float:
    """cuDNN's fused attention is one primitive, not dot_generals: QK^T and PV over dense [T, S] (forward), and
    2.5 times that backward (flash attention recomputes P, then dV, dP, dQ, dK)."""
    b, t, n, h = eqn.invars[0].aval.shape
    s = eqn.invars[1].aval.shape[1]
    forward = 4.0 * b * n * t * s * h
    return 2.5 * forward if "bwd" in eqn.primitive.name else forward


def jaxpr_matmul_flops(jaxpr) -> float:
    """Matmul FLOPs of a (closed) jaxpr: dot_general 2·|out|·|contracted|; `scan` bodies times their length,
    `cond` its costliest branch, any other nested jaxpr (pjit, remat, custom_jvp/vjp, shard_map) once. A
    `while_loop` has no static trip count: its body is counted once (there is none in a train step)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs_shape[i] for i in lhs_contract])
        elif name.startswith("dot_product_attention") and "fp8" not in name:
            total += _cudnn_attention_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max(jaxpr_matmul_flops(branch) for branch in eqn.params["branches"])
        else:
            for value in eqn.params.values():
                if isinstance(value, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    total += jaxpr_matmul_flops(value)
    return total


def _xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one entry per computation in some jax versions
        analysis = analysis[0]
    return float(analysis["flops"])


def time_step(name: str, loss_fn, tx, state, batch, steps: int, useful: float, valid_tokens: int) -> StepResult:
    step = jax.jit(pure_train_step(loss_fn, tx), donate_argnums=0)
    hardware = jaxpr_matmul_flops(step.trace(state, batch).jaxpr)  # before the donating calls consume `state`
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    state, _ = compiled(state, batch)  # first run: allocations, not timed
    jax.block_until_ready(state)
    best = float("inf")
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        best = min(best, time.perf_counter() - start)
    return StepResult(name, best, valid_tokens, useful, hardware, _xla_flops(compiled), compile_seconds)


def run_config(preset: str, args) -> dict:
    base = qwen3.PRESETS[preset]
    config = mgshop.get_config()
    with config.unlocked():  # the same values as the command-line overrides --config.model.preset=... etc.
        config.model.preset = preset  # the preset's sizes (model.hidden_size etc. stay -1)
        # A published model keeps its own vocabulary (the head's real cost); the toy presets take the tokenizer's.
        config.model.vocab_size = base.vocab_size if preset.startswith("qwen3") else -1
        config.model.dtype = args.dtype
        config.train.groups = args.groups
        config.train.group_size = args.group_size
        config.train.minibatches = args.minibatches
        config.sft.batch_size = args.groups * args.group_size // args.minibatches
        config.sft.episodes = 2 * config.sft.batch_size
    with tempfile.TemporaryDirectory() as workdir:
        c = build(config, workdir)
    phases, seed = Phases(c), int(config.seed)
    cfg, n_k = c.world.model_config, len(c.world.vocab.strategy_ids)
    params = c.init_params(seed)

    # SFT: a minibatch of the demonstrations the warm start trains on.
    train_demo, _ = jax.jit(phases.demonstrations, static_argnums=0)(seed)
    demo = jax.tree.map(lambda x: x[:config.sft.batch_size], train_demo)
    sft_state = phases.sft_state(jax.tree.map(jnp.copy, params), c.method.init_extras(), seed)
    sft = time_step("SFT", c.warm_start_loss, c.sft_tx, sft_state, DemoBatch(traj=demo), args.steps,
                    useful_train_flops(cfg, demo, n_k, c.method.use_expert), int(np.asarray(demo.valid).sum()))

    # GOPO: minibatch 0 of the prepared batch of one rollout by the run's agents.
    ref_params = params
    state = phases.method_state(jax.tree.map(jnp.copy, params), c.method.init_extras(), seed)
    acting, episodes, agents_key = phases.rollout_inputs(state, ref_params, seed, 0)
    traj = jax.jit(c.rollout)(acting, episodes, agents_key)
    batch = jax.jit(c.method.prepare_batch)(traj, ref_params, state.params)
    minibatch = jax.tree.map(lambda x: x[0], group_minibatches(batch, jnp.arange(args.groups), args.group_size,
                                                                args.minibatches))
    gopo = time_step("GOPO", c.method.loss, c.tx, state, minibatch, args.steps,
                     useful_train_flops(cfg, minibatch.traj, n_k, c.method.use_expert),
                     int(np.asarray(minibatch.traj.valid).sum()))
    return {"cfg": cfg, "rows": config.sft.batch_size, "length": c.world.layout.length, "steps": (sft, gopo)}


def define_flags() -> None:
    flags.DEFINE_multi_enum("presets", ["tiny", "small"], sorted(qwen3.PRESETS), "model presets (repeat the flag)")
    flags.DEFINE_integer("groups", 16, "dialogue groups per step")
    flags.DEFINE_integer("group_size", 4, "dialogues per group")
    flags.DEFINE_integer("minibatches", 2, "minibatches per step")
    flags.DEFINE_integer("steps", 5, "timed steps")
    flags.DEFINE_string("dtype", "float32", "the model's compute dtype (and the peak's)")
    flags.DEFINE_bool("quick", False, "tiny preset, 4 groups of 2, one minibatch, 2 steps")


def main(argv) -> None:
    del argv
    args = flags.FLAGS
    if args.quick:
        args.presets, args.groups, args.group_size, args.minibatches, args.steps = ["tiny"], 4, 2, 1, 2

    repeats = 3 if args.quick else 5
    peak_before = matmul_peak_flops(dtype=args.dtype, repeats=repeats)
    runs = {preset: run_config(preset, args) for preset in args.presets}
    # Measured before and after the steps, the best kept: on a shared machine load only ever lowers a rate, and
    # the step times are best-of too.
    peak = max(peak_before, matmul_peak_flops(dtype=args.dtype, repeats=repeats))
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; measured {args.dtype} matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s (benchmarks.peak; {peak_before / 1e9:.1f} before the steps)")
    print(f"{'preset':10s} {'vocab':>6s} {'step':5s} {'rows x L':>9s} {'valid tok':>9s} {'ms/step':>9s} "
          f"{'tok/s':>9s} {'useful GF':>9s} {'hw GF':>9s} {'XLA GF':>9s} {'useful/hw':>9s} {'useful util':>11s} "
          f"{'hw util':>8s} {'compile s':>9s}")
    gopo_util = {}
    for preset, out in runs.items():
        for r in out["steps"]:
            useful_util = r.useful_flops / r.seconds / peak
            print(f"{preset:10s} {out['cfg'].vocab_size:6d} {r.name:5s} {out['rows']:4d}x{out['length']:<4d} "
                  f"{r.valid_tokens:9d} {r.seconds * 1e3:9.1f} {r.valid_tokens / r.seconds:9.0f} "
                  f"{r.useful_flops / 1e9:9.3f} {r.hardware_flops / 1e9:9.3f} {r.xla_flops / 1e9:9.3f} "
                  f"{r.useful_flops / r.hardware_flops:9.2f} {useful_util:11.3f} "
                  f"{r.hardware_flops / r.seconds / peak:8.3f} {r.compile_seconds:9.1f}")
            if r.name == "GOPO":
                gopo_util[preset] = useful_util
    print("useful util = analytic useful FLOPs / step time / peak; hw util = the traced matmul FLOPs (hw GF) / step "
          "time / peak; XLA GF = compiled.cost_analysis()['flops'] (a scan body counted once); tok/s = valid tokens "
          "per agent per second (forward + backward + update, both agents)")
    # The goal is stated at the small preset; a run without it (--quick, GPU sizes) reports its last preset.
    result_preset = "small" if "small" in gopo_util else args.presets[-1]
    print(f"RESULT train_mfu ratio={gopo_util[result_preset]:.3f} goal=0.4")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
