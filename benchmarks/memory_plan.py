"""P6: the memory planner (`gopo_jax.plan`) against XLA's own accounting, and what fits one 8 x H100 80 GB host.

    python -m benchmarks.memory_plan [--quick] [--skip_fit]

Part 1 (check): for tiny/small GOPO configs on fake-CPU-device meshes, each of the three jits of an iteration is
compiled from abstract arguments laid out like the trainer lays them out (parameters by `parallel.param_shardings`,
batches over ("data", "fsdp")) and `compiled.memory_analysis()` (per device: argument, output, temp, alias bytes)
is set beside the plan:
  train step      arguments = params + optimizer + minibatch        temp = gradients + activations
  reference pass  arguments = reference + params + trajectory       temp = prepare_batch's intermediates
  rollout         arguments = the acting params (+ episode keys)    temp + output = KV caches + trajectory
total = argument + output + temp - alias. The last line is the worst max(p/m, m/p) over every case's totals.

Part 2 (fit): GOPO with Qwen3-1.7B/4B/8B/14B on one 8 x H100 80 GB host, full fine-tune and LoRA, planned only.
"""
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import math
import time

import jax
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from experiments.common import apply_overrides, load_config_file
from gopo_jax import command_line, parallel, plan
from gopo_jax.train.step import pure_train_step
from gopo_jax.train.world import build_world

MiB = 2 ** 20
GB = 1e9
# Small enough to compile 12 times on 2 CPU cores; 16 dialogues so every device of 8 holds whole groups.
TINY = {"model.preset": "tiny", "model.hidden_size": 64, "model.intermediate_size": 128, "model.num_layers": 2,
        "train.groups": 8, "train.group_size": 2, "train.minibatches": 1, "method": "gopo"}
SMALL = {"model.preset": "small", "model.hidden_size": 128, "model.intermediate_size": 384, "model.num_layers": 4,
         "train.groups": 8, "train.group_size": 2, "train.minibatches": 1, "method": "gopo"}
# tensor=2: the tiny/small models have 2 KV heads, so a wider tensor axis would leave attention replicated.
MESHES = ({"data": 1}, {"data": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2})


def config_of(overrides: dict):
    c = load_config_file("configs/mgshop.py", where="benchmark")
    apply_overrides(c, overrides, where="benchmark")
    return c


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def measure(inp: plan.PlanInputs, world, mesh) -> dict[str, dict]:
    """memory_analysis of the train step, the reference pass and the rollout on `mesh` (abstract arguments)."""
    method, cfg = inp.method, inp.config
    state_sh = parallel.param_shardings(inp.state, mesh)
    params_sh = state_sh.params
    rows_sh = parallel.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    out = {}

    mb = plan.abstract_trajectory(inp.layout, inp.num_strategies, inp.minibatch_rows)
    batch = jax.eval_shape(method.prepare_batch, mb, inp.state.params, inp.state.params)
    step = jax.jit(pure_train_step(method.loss, inp.tx), in_shardings=(state_sh, rows_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    out["train_step"] = _memory(step.lower(inp.state, batch).compile())

    traj = plan.abstract_trajectory(inp.layout, inp.num_strategies, inp.rollout_rows)
    # keep_unused: in the trainer's iteration jit the reference and the params are live whether or not this method's
    # prepare_batch reads both.
    ref = jax.jit(method.prepare_batch, in_shardings=(rows_sh, params_sh, params_sh), keep_unused=True)
    out["reference_pass"] = _memory(ref.lower(traj, inp.state.params, inp.state.params).compile())

    t = cfg.train
    rollout = plan.make_train_rollout(cfg, world, method)
    episodes = jax.eval_shape(lambda: world.group_episodes(jax.random.key(0), t.groups, t.group_size))
    acting = method.acting_params(inp.state.params, inp.state.extras)
    roll = jax.jit(rollout, in_shardings=(params_sh, rows_sh, replicated))
    out["rollout"] = _memory(roll.lower(acting, episodes, jax.eval_shape(lambda: jax.random.key(0))).compile())
    return out


def predict(p: plan.MemoryPlan) -> dict[str, dict]:
    """The plan's items grouped as XLA reports each jit (see the module docstring)."""
    b = {name: item.bytes for name, item in p.items.items()}
    return {
        "train_step": {"argument": b["params"] + b["optimizer"] + b["train_batch"],
                       "temp": b["gradients"] + b["train_activations"]},
        "reference_pass": {"argument": b["reference"] + b["params"] + b["trajectory"], "temp": b["reference_pass"]},
        "rollout": {"argument": b["params"], "temp": b["kv_caches"] + b["trajectory"] + b.get("rollout_other", 0)},
    }


def check(quick: bool) -> float:
    worst = 1.0
    cases = [("tiny", TINY, MESHES[:2] if quick else MESHES)]
    if not quick:
        cases += [("small", SMALL, MESHES), ("tiny remat=full", TINY | {"model.remat": "full"}, MESHES[1:2])]
    print(f"{'case':<34} {'jit':<15} {'arg p/m MiB':>17} {'temp p/m MiB':>17} {'total p/m MiB':>19} {'ratio':>6}")
    for name, overrides, meshes in cases:
        config = config_of(overrides)
        world = build_world(config, None)
        for sizes in meshes:
            sizes = {a: sizes.get(a, 1) for a in parallel.AXES}
            n = math.prod(sizes.values())
            mesh = parallel.make_mesh(sizes, devices=jax.devices()[:n])
            t0 = time.time()
            p = plan.make_plan(config, sizes, world)
            t_plan = time.time() - t0
            inp = plan.plan_inputs(config, sizes, world)
            with jax.set_mesh(mesh):  # the trainer traces on its mesh (the model keeps activations batch-split)
                measured = measure(inp, world, mesh)
            predicted = predict(p)
            label = f"{name} " + ",".join(f"{k}={v}" for k, v in sizes.items())
            for jit_name, m in measured.items():
                pr = predicted[jit_name]
                total = pr["argument"] + pr["temp"]
                ratio = max(total / m["total"], m["total"] / total)
                worst = max(worst, ratio)
                print(f"{label:<34} {jit_name:<15} {pr['argument'] / MiB:>8.2f}/{m['argument'] / MiB:<8.2f} "
                      f"{pr['temp'] / MiB:>8.2f}/{(m['temp'] + m['output'] - m['alias']) / MiB:<8.2f} "
                      f"{total / MiB:>9.2f}/{m['total'] / MiB:<9.2f} {ratio:>6.2f}")
            print(f"{'':<34} (plan {t_plan:.1f} s; peak phase {p.peak_phase} {p.peak_bytes / MiB:.1f} MiB)")
    return worst


# --------------------------------------------------------------------------------------------------------------
# Part 2: Qwen3 on one 8 x H100 80 GB host
# --------------------------------------------------------------------------------------------------------------

def define_flags() -> None:
    flags.DEFINE_bool("quick", False, "tiny config on two meshes only")
    flags.DEFINE_bool("skip_fit", False, "leave out the Qwen3 8 x H100 table")


def main(argv) -> None:
    del argv
    worst = check(flags.FLAGS.quick)
    if not flags.FLAGS.skip_fit:
        print()
        print(plan.fit_table(config_of({})))
    print(f"RESULT memory_plan ratio={worst:.3f} goal=1.1")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
