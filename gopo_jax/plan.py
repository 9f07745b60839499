"""Memory planner: the bytes PER DEVICE a run needs, before it runs.

    python -m gopo_jax.plan [--config configs/mgshop.py] [--mesh data=2,fsdp=4,tensor=1] [--config.model.preset=...]
    python -m gopo_jax.plan --config configs/mgshop.py --fit_8xh100   # + Qwen3-1.7B..14B on one 8 x H100 host

What is counted, and where each number comes from (the planner reads the code's own objects, so it follows the code
as the model and the methods change):

* params, optimizer state, reference, gradients: the abstract `TrainState` of the method (`jax.eval_shape` of
  `create_train_state` on `build`'s agents + the method's extra parameters, with the method's optimizer), each leaf
  split over the mesh by its partition annotation exactly as `parallel.param_shardings` places it. The reference is
  what the driver holds: a copy of the whole `state.params` (`driver._copy`), with the same layout. Gradients have
  the parameters' shapes, dtypes and layout.
* activations of the train step, the reference pass (`method.prepare_batch`) and the rollout: the peak of live
  intermediate bytes of the jaxpr of that phase (`_peak_live_bytes`: every equation's outputs are allocated when it
  runs and freed after their last use; nested jaxprs - jit, remat, scan, while, cond, custom_vjp - add their own
  peak while they run). The jaxpr is traced at ONE device's share: the batch split over data x fsdp, and the
  model's heads, KV heads, MLP width and vocabulary divided by the tensor axis where they divide (the Megatron
  split of `gopo_jax.models.qwen3`'s annotations). So the remat policy, the chunked heads, scan-over-layers, whatever
  the code does, is what is counted. What XLA does beyond the jaxpr is modelled coarsely: elementwise chains,
  reshapes and cache writes reuse their dying input (`_FUSED`), loops update their carry in place. How far this is
  from XLA's own accounting is measured by benchmarks/memory_plan.py (P6).
* KV caches of the rollout: `qwen3.init_cache` of each agent that acts, [layers, B, S, kv_heads, head_dim] x (k, v)
  in the compute dtype, the batch split over data x fsdp and kv heads over tensor.
* logits: how many fp32 bytes of vocabulary-wide logits the largest phase holds; read from the same jaxpr walk
  (the arrays whose last dimension is the vocabulary), shown on its own row because it is what the chunked heads
  bound.

A phase's peak = persistent (params + optimizer + reference) + that phase's own transient bytes. Arguments of the
phase's jit that are not persistent state (the trajectory batch) are counted in the phase.

Assumptions (printed with the table): the rollout, reference pass and scoring are sharded over (data, fsdp) like the
train step; the optimizer update is in place (the state is donated); one train minibatch is live at a time.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from ml_collections import config_flags

import configs
from gopo_jax import command_line, parallel
from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.rollout import SamplingConfig
from gopo_jax.metrics.episode import EpisodeMetricSettings
from gopo_jax.models import qwen3
from gopo_jax.train.build import agent_graphdefs, hyper_from_config, init_agent_params, validate_config
from gopo_jax.train.methods import MethodContext, make_method
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_optimizer
from gopo_jax.train.world import build_world, lora_agents

# --------------------------------------------------------------------------------------------------------------
# bytes of abstract trees
# --------------------------------------------------------------------------------------------------------------

def _aval_bytes(aval) -> int:
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    dtype = aval.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        itemsize = 8  # a threefry key's raw data: 2 x uint32
    else:
        itemsize = np.dtype(dtype).itemsize
    return int(math.prod(shape)) * itemsize


def tree_bytes(tree: Any) -> int:
    """Global bytes of every array (or ShapeDtypeStruct) leaf of `tree`."""
    return sum(_aval_bytes(x) for x in jax.tree.leaves(tree))


def abstract_mesh(sizes: Mapping[str, int]) -> AbstractMesh:
    """An abstract ("data", "fsdp", "tensor") mesh: shardings and shard shapes without any device."""
    return AbstractMesh(tuple(int(sizes.get(a, 1)) for a in parallel.AXES), parallel.AXES,
                        axis_types=(AxisType.Auto,) * len(parallel.AXES))


def sharded_bytes(tree: Any, mesh: AbstractMesh) -> int:
    """Bytes of ONE device's shard of `tree` placed by `parallel.param_shardings` (annotated leaves split by their
    partition names, everything else replicated)."""
    shardings = parallel.param_shardings(tree, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)
    total = 0
    for x, s in zip(jax.tree.leaves(tree, is_leaf=is_var), jax.tree.leaves(shardings, is_leaf=is_var)):
        value = x.get_value() if is_var(x) else x
        sharding = s.get_value() if is_var(s) else s
        if not hasattr(value, "shape"):
            continue
        total += _aval_bytes(jax.ShapeDtypeStruct(sharding.shard_shape(tuple(value.shape)), value.dtype))
    return total


# --------------------------------------------------------------------------------------------------------------
# peak live bytes of a jaxpr
# --------------------------------------------------------------------------------------------------------------

# Primitives whose output does not coexist with a dying input: XLA fuses elementwise maths, casts and selects into
# their consumer, makes reshapes views, and updates a dying buffer in place (dynamic_update_slice, scatter: the KV
# cache writes). See `_peak_live_bytes`.
_FUSED = frozenset({
    "add", "sub", "mul", "div", "neg", "max", "min", "exp", "log", "log1p", "expm1", "tanh", "logistic", "rsqrt",
    "sqrt", "integer_pow", "pow", "abs", "sign", "select_n", "convert_element_type", "eq", "ne", "lt", "le", "gt",
    "ge", "and", "or", "not", "reshape", "squeeze", "expand_dims", "square", "stop_gradient", "copy", "copy_p",
    "clamp", "sin", "cos", "floor", "ceil", "round", "is_finite", "nextafter", "erf", "add_any",
    "dynamic_update_slice", "scatter", "scatter-add",
})


_IN_PLACE_LOOPS = frozenset({"scan", "while"})


def _var_bytes(v) -> int:
    return 0 if isinstance(v, (jcore.Literal, jcore.DropVar)) else _aval_bytes(v.aval)


def _sub_jaxprs(eqn) -> list[tuple[jcore.Jaxpr, frozenset]]:
    """(nested jaxpr, its inputs whose buffers it may reuse) of an equation. XLA runs a loop on its carried buffers in
    place: the carry of a scan or while body is donated to the body (the KV caches a turn loop threads through are not
    copied each turn). A cond's branches are not: XLA gives a conditional's results their own buffers (seen in the
    CPU buffer assignment of the rollout: an early-exit cond around the turn holds a second copy of the caches). A
    jit/remat/custom_vjp call is inlined and its inputs stay the caller's."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        body = params["jaxpr"].jaxpr
        carry = body.invars[params["num_consts"]:params["num_consts"] + params["num_carry"]]
        return [(body, frozenset(carry))]
    if name == "while":
        body = params["body_jaxpr"].jaxpr
        return [(params["cond_jaxpr"].jaxpr, frozenset()), (body, frozenset(body.invars[params["body_nconsts"]:]))]
    return [(sub, frozenset()) for sub in jcore.jaxprs_in_params(params)]


def _unrolled_copies(eqn) -> int:
    """How many iterations of a rematerialised loop body XLA holds at once: a scan unrolled u times runs u copies of
    its body per iteration, and their recomputed activations overlap (measured: remat="full" layers scanned 2 at a
    time keep ~2 layers' recomputation alive; `scan_unroll=num_layers` keeps them all, as a Python loop of layers
    would). Without remat the copies run one after another and the walk of one body already bounds them."""
    if eqn.primitive.name != "scan" or not any(e.primitive.name == "remat2" for e in eqn.params["jaxpr"].jaxpr.eqns):
        return 1
    unroll, length = eqn.params.get("unroll", 1), eqn.params["length"]
    return length if unroll is True else max(1, min(int(unroll), length))


def _peak_live_bytes(jaxpr: jcore.Jaxpr, vocab_size: int | None = None,
                     donated: frozenset = frozenset()) -> tuple[int, int]:
    """(peak bytes beyond its inputs, of which arrays whose last dimension is `vocab_size`) while `jaxpr` runs.

    Inputs and constants are the caller's and not counted, except `donated` inputs: they are live from the start and
    freed after their last use, so an in-place update of a donated buffer costs nothing extra. Every equation's
    outputs are live from the equation to their last use; a nested jaxpr adds its own peak on top of what is live
    when it runs; `_FUSED` primitives free their dying inputs before making their outputs."""
    last_use: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last_use[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last_use[v] = len(jaxpr.eqns)
    owned = (set(jaxpr.invars) | set(jaxpr.constvars)) - donated

    def is_vocab(v) -> bool:
        shape = getattr(getattr(v, "aval", None), "shape", ())
        return bool(vocab_size) and len(shape) >= 2 and shape[-1] == vocab_size

    start = sum(_var_bytes(v) for v in donated)
    start_vocab = sum(_var_bytes(v) for v in donated if is_vocab(v))
    live, live_vocab = start, start_vocab
    peak, peak_vocab = live, live_vocab
    for i, eqn in enumerate(jaxpr.eqns):
        inner = inner_vocab = 0
        copies = _unrolled_copies(eqn)
        for sub, sub_donated in _sub_jaxprs(eqn):
            p, pv = _peak_live_bytes(sub, vocab_size, sub_donated)
            inner, inner_vocab = max(inner, copies * p), max(inner_vocab, copies * pv)
        made = sum(_var_bytes(v) for v in eqn.outvars)
        made_vocab = sum(_var_bytes(v) for v in eqn.outvars if is_vocab(v))
        dying = [v for v in {x for x in eqn.invars if isinstance(x, jcore.Var)}
                 if last_use.get(v) == i and v not in owned]
        freed = sum(_var_bytes(v) for v in dying)
        freed_vocab = sum(_var_bytes(v) for v in dying if is_vocab(v))
        # In-place and fused ops (`_FUSED`, loops): their dying inputs never coexist with their outputs (a chain of
        # elementwise ops costs one buffer, not two; a cache write or a turn loop does not copy the cache).
        # A nested jaxpr's peak includes the outputs it makes, which are this equation's outputs.
        if eqn.primitive.name in _FUSED or eqn.primitive.name in _IN_PLACE_LOOPS:
            peak = max(peak, live + inner, live - freed + made)
            peak_vocab = max(peak_vocab, live_vocab + inner_vocab, live_vocab - freed_vocab + made_vocab)
        else:
            peak = max(peak, live + max(inner, made))
            peak_vocab = max(peak_vocab, live_vocab + max(inner_vocab, made_vocab))
        for v in eqn.outvars:
            if not isinstance(v, jcore.DropVar) and v in last_use:
                live += _var_bytes(v)
                live_vocab += _var_bytes(v) if is_vocab(v) else 0
        live -= freed
        live_vocab -= freed_vocab
    return max(0, peak - start), max(0, peak_vocab - start_vocab)


def phase_transient_bytes(fn, *abstract_args, vocab_size: int | None = None) -> tuple[int, int]:
    """(peak intermediate bytes, of which vocabulary-wide logits) of `fn(*abstract_args)`."""
    closed = jax.make_jaxpr(fn)(*abstract_args)
    return _peak_live_bytes(closed.jaxpr, vocab_size)


# --------------------------------------------------------------------------------------------------------------
# one device's share of the run
# --------------------------------------------------------------------------------------------------------------

def _divided(n: int, by: int) -> int:
    return n // by if by > 1 and n % by == 0 else n


def tensor_split_config(cfg: qwen3.Qwen3Config, tensor: int) -> qwen3.Qwen3Config:
    """The model one device computes with under a tensor axis of `tensor`: query/KV heads, MLP width and vocabulary
    divided where the annotations' split divides them (`parallel._fit_spec` replicates otherwise)."""
    if tensor == 1:
        return cfg
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    if (heads * cfg.head_dim) % tensor == 0 and (kv * cfg.head_dim) % tensor == 0 and heads % tensor == 0 \
            and kv % tensor == 0:
        heads, kv = heads // tensor, kv // tensor
    return cfg.replace(num_heads=heads, num_kv_heads=kv, intermediate_size=_divided(cfg.intermediate_size, tensor),
                       vocab_size=_divided(cfg.vocab_size, tensor))


def abstract_trajectory(layout: Layout, num_strategies: int, rows: int) -> Trajectory:
    """ShapeDtypeStructs of a rolled-out batch of `rows` dialogues (the shapes `Trajectory.check` asserts)."""
    f32, i32 = jnp.float32, jnp.int32
    length, turns = layout.length, layout.max_turns

    def s(shape, dtype):
        return jax.ShapeDtypeStruct((rows, *shape), dtype)

    return Trajectory(tokens=s((length,), i32), valid=s((length,), bool), ea_mask=s((length,), bool),
                      cs_mask=s((length,), bool), cs_logprob=s((length,), f32), strategy=s((turns,), i32),
                      allowed=s((turns, num_strategies), bool), ea_logprob=s((turns,), f32),
                      realised=s((turns,), i32), aligned=s((turns,), f32), sop_valid=s((turns,), f32),
                      gain=s((turns,), f32), cont=s((turns,), f32), rel=s((turns,), f32),
                      rel_realised=s((turns,), f32), quality=s((turns,), f32),
                      turn_mask=s((turns,), bool), outcome=s((), f32), satisfaction=s((), f32), fcr=s((), f32))


@dataclasses.dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of a run on a mesh. `items` by name; `phases` name the items live in each phase."""

    mesh: dict
    items: dict[str, Item]
    phases: dict[str, tuple[str, ...]]
    facts: dict[str, Any]

    def phase_bytes(self, phase: str) -> int:
        return sum(self.items[n].bytes for n in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.phase_bytes(self.peak_phase)

    def table(self) -> str:
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [f"memory plan per device · mesh {mesh} · " + " · ".join(f"{k} {v}" for k, v in self.facts.items()),
                 f"{'component':<22} {'MiB':>12}  note"]
        for item in self.items.values():
            lines.append(f"{item.name:<22} {item.bytes / 2**20:>12.2f}  {item.note}")
        for phase, names in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{'phase ' + phase:<22} {self.phase_bytes(phase) / 2**20:>12.2f}  = {' + '.join(names)}{mark}")
        lines.append("assumptions: rollout, reference pass and train step sharded over data x fsdp (batch) and tensor "
                     "(heads, MLP, vocabulary); optimizer update in place (state donated); activations = peak live "
                     "bytes of the phase's jaxpr (XLA's fusion modelled coarsely: see benchmarks/memory_plan.py)")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """The abstract objects a plan is computed from (also what benchmarks/memory_plan.py compiles to check it)."""

    config: Any
    mesh_sizes: dict
    model_config: qwen3.Qwen3Config  # the run's (global) model
    device_config: qwen3.Qwen3Config  # one device's share under the tensor axis
    layout: Layout
    method: Any  # built with the global model (its loss / prepare_batch for the XLA check)
    device_method: Any  # built with device_config (what the jaxpr walk traces)
    tx: Any
    state: Any  # abstract TrainState (global shapes, partition metadata)
    rollout_rows: int  # dialogues per rollout (global)
    minibatch_rows: int  # dialogues per train step (global)
    num_strategies: int
    world: Any


def _method_for(config, world, model_config):
    # The plan sizes both agents as `model_config` (the CS's; a smaller Expert only lowers the bytes).
    w = dataclasses.replace(world, model_config=model_config, expert_config=model_config)
    hyper = hyper_from_config(config)
    settings = EpisodeMetricSettings.from_config(config, spec_max_relevance=w.spec.max_relevance,
                                                 t_max=w.spec.max_turns)
    expert_gd, cs_gd = agent_graphdefs(w)
    return make_method(config.method, MethodContext(config=config, world=w, expert_gd=expert_gd, cs_gd=cs_gd,
                                                    hyper=hyper, metric_settings=settings)), expert_gd, cs_gd


def abstract_state(method, world, tx):
    """The method's TrainState as ShapeDtypeStructs inside nnx Variables (partition metadata kept), built by the
    trainer's own functions: `Components.init_params` (the agents + the method's extra parameters), then
    `create_train_state` with the method's optimizer."""
    def init():
        params = {**init_agent_params(world, 0), **method.init_extra_params(jax.random.key(0))}
        return create_train_state(params, tx, extras=method.init_extras(), rng=jax.random.key(0))

    return jax.eval_shape(init)


def plan_inputs(config, mesh_sizes: Mapping[str, int], world=None) -> PlanInputs:
    validate_config(config)
    world = world if world is not None else build_world(config, None)
    sizes = {a: int(mesh_sizes.get(a, 1)) for a in parallel.AXES}
    method, _, _ = _method_for(config, world, world.model_config)
    device_cfg = tensor_split_config(world.model_config, sizes["tensor"])
    device_method = method if device_cfg == world.model_config else _method_for(config, world, device_cfg)[0]
    tx = make_optimizer(dict(method.learning_rates), clip_norm=config.train.clip_norm,
                        lora_groups=lora_agents(config))
    t = config.train
    rows = t.groups * t.group_size
    return PlanInputs(config=config, mesh_sizes=sizes, model_config=world.model_config, device_config=device_cfg,
                      layout=world.layout, method=method, device_method=device_method, tx=tx,
                      state=abstract_state(method, dataclasses.replace(world, expert_config=world.model_config), tx),
                      rollout_rows=rows,
                      minibatch_rows=rows // t.minibatches, num_strategies=world.spec.sop.num_strategies, world=world)


def per_device_rows(rows: int, mesh_sizes: Mapping[str, int]) -> int:
    """One device's rows of a batch of `rows` split over data x fsdp (rounded up: an uneven split pads)."""
    return -(-rows // (mesh_sizes.get("data", 1) * mesh_sizes.get("fsdp", 1)))


def traced_rows(per_device: int, group_size: int) -> int:
    """The rows a device's share is traced with: whole groups (the losses reshape rows into groups), at least one.
    Activations are per row, so a trace of more rows than a device holds is scaled back by per_device / traced."""
    return -(-per_device // group_size) * group_size


def device_state(inp: PlanInputs):
    """The abstract state with the device (tensor-split) model's parameter shapes, for tracing one device's share."""
    if inp.device_config == inp.model_config:
        return inp.state
    world = dataclasses.replace(inp.world, model_config=inp.device_config, expert_config=inp.device_config)
    return abstract_state(inp.device_method, world, inp.tx)


def kv_cache_bytes(cfg: qwen3.Qwen3Config, rows: int, max_len: int, agents: int) -> int:
    """`agents` KV caches of `rows` dialogues (`qwen3.init_cache`; k, v in the compute dtype + the valid mask)."""
    cache = jax.eval_shape(lambda: qwen3.init_cache(cfg, rows, max_len))
    return agents * tree_bytes(cache)


def make_plan(config, mesh_sizes: Mapping[str, int], world=None, *, trace_rollout: bool = True) -> MemoryPlan:
    inp = plan_inputs(config, mesh_sizes, world)
    sizes, method, cfg = inp.mesh_sizes, inp.device_method, inp.device_config
    mesh = abstract_mesh(sizes)
    g = config.train.group_size
    state = inp.state
    params_b = sharded_bytes(state.params, mesh)
    opt_b = sharded_bytes(state.opt_state, mesh) + sharded_bytes((state.step, state.extras, state.rng), mesh)
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
    # A LoRA agent's reference is its base with the adapters off (only B zeros, made in the step); the trained
    # parameters (and so the gradients) of a LoRA agent are its adapters.
    lora_groups = lora_agents(config)
    trained = {k: (nnx.state(v, nnx.LoRAParam) if k in lora_groups else v) for k, v in state.params.items()}
    reference_b = (sharded_bytes({k: v for k, v in state.params.items() if k not in lora_groups}, mesh)
                   + sharded_bytes({k: nnx.state(state.params[k], nnx.PathContains("lora_b")) for k in lora_groups},
                                   mesh))
    reference_note = ("frozen copy of state.params held by the driver" if not lora_groups else
                      f"copy of the fully trained agents; {', '.join(lora_groups)}: base with adapters off (B zeros)")
    grads_b = sharded_bytes(trained, mesh)
    items = {
        "params": Item("params", params_b, f"{' + '.join(state.params)} ({n_params / 1e6:.2f}M parameters, "
                                           f"{inp.model_config.param_dtype})"),
        "optimizer": Item("optimizer", opt_b, "AdamW mu + nu per group (+ counters, step, extras, rng)"),
        "reference": Item("reference", reference_b, reference_note),
    }
    phases = {}
    dstate = device_state(inp)
    roll_rows = per_device_rows(inp.rollout_rows, sizes)
    roll_traced = traced_rows(roll_rows, g)
    if method.trains:
        mb_rows = per_device_rows(inp.minibatch_rows, sizes)
        mb_traced = traced_rows(mb_rows, g)
        traj = abstract_trajectory(inp.layout, inp.num_strategies, mb_traced)
        batch = jax.eval_shape(method.prepare_batch, traj, dstate.params, dstate.params)

        def loss_grads(params, extras, batch, key):
            return jax.grad(method.loss, has_aux=True)(params, extras, batch, key)

        act, act_logits = phase_transient_bytes(loss_grads, dstate.params, dstate.extras, batch,
                                                jax.random.key(0), vocab_size=cfg.vocab_size)
        # The walk counts the gradients it produces; they are their own row (sharded like the params).
        act = max(act - tree_bytes(dstate.params), act_logits)
        scale = mb_rows / mb_traced
        items["gradients"] = Item("gradients", grads_b, "same shapes, dtypes and layout as the trained params"
                                  + (" (LoRA: adapters)" if lora_groups else ""))
        items["train_batch"] = Item("train_batch", round(tree_bytes(batch) * scale),
                                    f"one minibatch, {mb_rows} rows per device")
        items["train_activations"] = Item(
            "train_activations", round(act * scale),
            f"peak live intermediates of grad(loss), remat={inp.model_config.remat!r}, {mb_rows} rows x "
            f"{inp.layout.length} slots")
        items["train_logits"] = Item("train_logits", round(act_logits * scale),
                                     "of which vocabulary-wide logits (fp32/compute)")
        phases["train_step"] = ("params", "optimizer", "reference", "gradients", "train_batch", "train_activations")

        traj_ref = abstract_trajectory(inp.layout, inp.num_strategies, roll_traced)
        ref_act, ref_logits = phase_transient_bytes(method.prepare_batch, traj_ref, dstate.params, dstate.params,
                                                    vocab_size=cfg.vocab_size)
        scale = roll_rows / roll_traced
        items["reference_pass"] = Item("reference_pass", round(ref_act * scale),
                                       "peak live intermediates of prepare_batch")
        items["reference_logits"] = Item("reference_logits", round(ref_logits * scale),
                                         "of which vocabulary-wide logits")
        phases["reference_pass"] = ("params", "optimizer", "reference", "trajectory", "reference_pass")

    items["trajectory"] = Item("trajectory", tree_bytes(abstract_trajectory(inp.layout, inp.num_strategies, roll_rows)),
                               f"rollout batch, {roll_rows} rows per device")
    acting_agents = 2 if method.use_expert else 1
    kv = kv_cache_bytes(cfg, roll_rows, inp.layout.length, acting_agents)
    items["kv_caches"] = Item("kv_caches", kv, f"{acting_agents} agent(s) x [layers={cfg.num_layers}, B={roll_rows}, "
                                               f"S={inp.layout.length}, kv_heads={cfg.num_kv_heads}, "
                                               f"head_dim={cfg.head_dim}] x (k, v), {cfg.dtype}")
    phases["rollout"] = ("params", "optimizer", "reference", "kv_caches", "trajectory")
    # A host world's rollout is a Python turn loop (nothing to trace); `trace_rollout=False` skips the walk where the
    # world's environment does not match the layout being planned.
    if trace_rollout and inp.world.kind == "jax":
        rollout = make_train_rollout(config, inp.world, method)
        episodes = jax.ShapeDtypeStruct((roll_rows,), jax.eval_shape(lambda: jax.random.key(0)).dtype)
        walk, _ = phase_transient_bytes(rollout, method.acting_params(dstate.params, dstate.extras), episodes,
                                        jax.random.key(0))
        # The walk holds the caches and the assembled trajectory: the rest is decode logits, env state, turn outputs.
        items["rollout_other"] = Item("rollout_other", max(0, walk - kv - items["trajectory"].bytes),
                                      "rollout intermediates besides caches and trajectory (jaxpr walk)")
        phases["rollout"] = (*phases["rollout"], "rollout_other")
    facts = {"method": config.method, "model": f"{config.model.preset} (L={inp.model_config.num_layers}, "
                                               f"D={inp.model_config.hidden_size}, V={inp.model_config.vocab_size})",
             "dialogue slots": inp.layout.length, "rollout rows": inp.rollout_rows,
             "minibatch rows": inp.minibatch_rows}
    return MemoryPlan(mesh=sizes, items=items, phases=phases, facts=facts)


# --------------------------------------------------------------------------------------------------------------
# what fits one 8 x H100 80 GB host
# --------------------------------------------------------------------------------------------------------------
GB = 1e9
H100_BYTES = 80 * GB
USABLE = 0.95  # XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX preallocates 75% by default: set it for big runs)
FIT_MESH = {"data": 1, "fsdp": 8, "tensor": 1}
FIT_TRAIN = {"groups": 16, "group_size": 4, "minibatches": 2}  # 64 dialogues per rollout, 32 per train step
LORA_RANK = 16
LORA_TARGETS = qwen3.LORA_TARGETS
LORA_BASE_DTYPE = "bfloat16"  # the published checkpoints' dtype, which hf_io.from_pretrained keeps by default
FIT_REMAT = "full"  # Qwen3Config.remat of the planned runs


def fit_world(base_config, preset: str):
    """(config, world) of GOPO with the published model (fp32 master weights and AdamW, bf16 compute and KV cache,
    remat `FIT_REMAT`) on the MG-ShopDial text layout of configs/mgshop.py (what a real Qwen3 run trains on); the
    synthetic shop supplies the SOP and strategy tokens."""
    config = _fit_config(base_config)
    config.method = "gopo"
    config.model.update(preset=preset, dtype="bfloat16", param_dtype="float32", remat=FIT_REMAT, hidden_size=-1,
                        num_layers=-1, intermediate_size=-1)
    world = build_world(config, None)
    lay = config.layout
    layout = Layout(context_len=lay.context_len, customer_len=lay.customer_len, header_len=world.vocab.header_len,
                    reply_len=lay.reply_len, max_turns=lay.max_turns)
    model = world.model_config.replace(vocab_size=qwen3.PRESETS[preset].vocab_size)
    return config, dataclasses.replace(world, layout=layout, model_config=model, expert_config=model)


def lora_config(cfg: qwen3.Qwen3Config) -> qwen3.Qwen3Config:
    """The planned LoRA run's model: `cfg` with rank-`LORA_RANK` adapters on `LORA_TARGETS` (fp32, the
    Qwen3Config default) over a frozen base kept in the checkpoint's dtype (`LORA_BASE_DTYPE`)."""
    return cfg.replace(lora_rank=LORA_RANK, lora_targets=LORA_TARGETS, param_dtype=LORA_BASE_DTYPE)


def lora_bytes(cfg: qwen3.Qwen3Config, mesh_sizes: Mapping[str, int], *, agents: tuple[str, ...] = ("expert", "cs"),
               shared_base: bool = False) -> dict[str, int]:
    """Bytes per device of what a LoRA run (cfg.lora_rank > 0) holds besides activations, from the code's own
    objects: the abstract agent (`qwen3.Qwen3(cfg)`) and the trainer's optimizer with every agent in `lora_groups`
    (`step.make_optimizer`), placed on the mesh by `parallel.param_shardings`.

    * base: each agent's frozen base in cfg.param_dtype (one for all agents when `shared_base`);
    * adapters: each agent's A and B (cfg.lora_param_dtype);
    * optimizer: AdamW's state of the adapters only (the base gets `optax.set_to_zero()`: no state);
    * reference: the B zeros of `lora.adapters_off`: the reference is the base with its adapters off, so the
      weights are not copied;
    * gradients: the adapters' only (the train step keeps the base behind `stop_gradient`).
    Activations and KV caches are the full fine-tune's: the same forward, and the backward through the base."""
    if not cfg.lora_rank:
        raise ValueError("lora_bytes: cfg.lora_rank is 0 (no adapters); plan it with lora_config(cfg)")
    mesh = abstract_mesh(mesh_sizes)
    abstract = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
    agent = nnx.state(abstract, nnx.Param)
    adapters = sharded_bytes(nnx.state(abstract, nnx.LoRAParam), mesh)
    tx = make_optimizer({a: 1e-5 for a in agents}, lora_groups=agents)
    opt_state = jax.eval_shape(tx.init, {a: agent for a in agents})
    b_zeros = sharded_bytes(nnx.state(abstract, nnx.PathContains("lora_b")), mesh)
    return {"base": (1 if shared_base else len(agents)) * (sharded_bytes(agent, mesh) - adapters),
            "adapters": len(agents) * adapters, "optimizer": sharded_bytes(opt_state, mesh),
            "reference": len(agents) * b_zeros, "gradients": len(agents) * adapters}


def _fit_config(base_config):
    config = copy.deepcopy(base_config)
    config.train.update(FIT_TRAIN)
    return config


def fit_table(base_config) -> str:
    """How GOPO with Qwen3-1.7B/4B/8B/14B fits one 8 x H100 80 GB host (full fine-tune and LoRA): the plan of
    `base_config`'s layout and training batch with each published model."""
    config = _fit_config(base_config)
    lines = []
    budget = USABLE * H100_BYTES
    t = config.train
    lines.append(f"GOPO on one 8 x H100 80 GB host: mesh {FIT_MESH}; {t.groups} groups x {t.group_size} = "
          f"{t.groups * t.group_size} dialogues per rollout, {t.groups * t.group_size // t.minibatches} per train "
          f"step; MG-ShopDial layout (configs/mgshop.py layout.*); fp32 master weights + AdamW, bf16 compute and KV "
          f"cache; remat={FIT_REMAT!r}; budget {USABLE:.0%} of 80 GB = {budget / GB:.1f} GB per GPU; "
          f"LoRA: rank {LORA_RANK} fp32 adapters on {','.join(LORA_TARGETS)} of each agent over its own frozen "
          f"{LORA_BASE_DTYPE} base, AdamW and gradients of the adapters only, reference = adapters off (no copy)")
    lines.append(f"{'model':<12} {'mode':<6} {'params':>8} {'optim':>8} {'ref':>8} {'grads':>8} {'act':>8} {'kv':>8} "
          f"{'peak GB':>8}  verdict")
    for preset in ("qwen3-1.7b", "qwen3-4b", "qwen3-8b", "qwen3-14b"):
        config, world = fit_world(base_config, preset)
        # The synthetic shop's rollout does not fill the text layout: its KV caches are planned, not traced.
        p = make_plan(config, FIT_MESH, world, trace_rollout=False)
        b = {k: v.bytes for k, v in p.items.items()}
        act = max(b["train_activations"] + b["train_batch"], b["reference_pass"] + b["trajectory"],
                  b["kv_caches"] + b["trajectory"])
        full_peak = p.peak_bytes
        lo = lora_bytes(lora_config(world.model_config), FIT_MESH)
        # LoRA: the persistent part is the bases + adapters + their optimizer state + the reference's B zeros; the
        # phases' own bytes are the full fine-tune's except the full-size gradients, which become adapter gradients.
        lora_phase = max(b["train_activations"] + b["train_batch"] + lo["gradients"],
                         b["reference_pass"] + b["trajectory"], b["kv_caches"] + b["trajectory"])
        lora_peak = lo["base"] + lo["adapters"] + lo["reference"] + lo["optimizer"] + lora_phase
        for mode, peak, row in (
                ("full", full_peak, (b["params"], b["optimizer"], b["reference"], b["gradients"])),
                ("lora", lora_peak, (lo["base"] + lo["adapters"], lo["optimizer"], lo["reference"],
                                     lo["gradients"]))):
            verdict = (f"FITS (headroom {(budget - peak) / GB:.1f} GB)" if peak <= budget
                       else f"DOES NOT FIT (short by {(peak - budget) / GB:.1f} GB)")
            lines.append(f"{preset:<12} {mode:<6} " + " ".join(f"{x / GB:>8.2f}" for x in row)
                  + f" {act / GB:>8.2f} {b['kv_caches'] / GB:>8.2f} {peak / GB:>8.2f}  {verdict} ({p.peak_phase})")
    lines.append("(act = the largest phase's own bytes: train activations + minibatch, reference pass + trajectory, or "
          "KV caches + trajectory; GB = 1e9 bytes)")
    return "\n".join(lines)


def make_train_rollout(config, world, method):
    """`rollout(acting params, episodes, key) -> Trajectory` of the method's training rollout (as `build` makes it)."""
    sampling = SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                              top_p=config.sampling.top_p, sop_mask=config.gopo.sop_mask, use_expert=method.use_expert)
    return world.make_rollout(method.make_agents(sampling))


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=4,tensor=1" -> {"data": 2, "fsdp": 4, "tensor": 1} (missing axes are 1)."""
    out = {a: 1 for a in parallel.AXES}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in out or not value.strip().lstrip("-").isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {text!r}: each entry is AXIS=N with AXIS in {list(parallel.AXES)} and N >= 1, "
                             f"got {part!r}")
        out[name] = int(value)
    return out


def mesh_from_config(config, num_devices: int) -> dict[str, int]:
    """The config's mesh (one axis may be -1 = the rest of `num_devices`)."""
    return dict(zip(parallel.AXES, parallel._axis_sizes(dict(config.mesh), num_devices)))


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.config_path("mgshop.py"),
                                    "run config (a configs/*.py file); override its keys with --config.KEY=VALUE",
                                    lock_config=True)
    flags.DEFINE_string("mesh", "", "data=N,fsdp=N,tensor=N (default: the config's mesh over --devices)")
    flags.DEFINE_integer("devices", 8, "devices the config's mesh is resolved over when --mesh is not given")
    flags.DEFINE_bool("fit_8xh100", False, "also plan GOPO with Qwen3-1.7B/4B/8B/14B on one 8 x H100 80 GB host "
                      "(full fine-tune and LoRA) on this config's text layout and batch")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    try:
        sizes = parse_mesh(f.mesh) if f.mesh else mesh_from_config(f.config, f.devices)
        print(make_plan(f.config, sizes).table())
        if f.fit_8xh100:
            print()
            print(fit_table(f.config))
    except ValueError as e:
        command_line.fail(str(e))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
