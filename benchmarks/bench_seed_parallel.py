"""Wall time of S seeds of one config trained vmapped in one process (`gopo_jax.train.driver.train_seeds`) against
the same seeds trained one after another (`train_run`, as `experiments.sweep` does without `vmap_seeds`).

    python -m benchmarks.bench_seed_parallel [--seeds 4] [--config configs/mgshop.py] [--config.sft.steps=50 ...]

The run config is `--config` with the benchmark's small settings (`TINY`) for every key the command line does
not override.

Both variants run in this process, the vmapped group first (it pays the one-off cost of compiling eager
operations that the separate runs then reuse, so the ratio errs against it), on the visible devices (one CPU
device unless XLA_FLAGS says otherwise), without a persistent compilation cache. Compile time is the union of the
intervals JAX reports for tracing, lowering and compiling (`jax.monitoring` time spans; nested jits counted once);
"compile excluded" is wall time minus that union. Every run writes its full outputs (logs, checkpoints, plots) to a
temporary directory, as a sweep would.
"""
import pathlib
import tempfile
import time

import jax
from absl import flags
from ml_collections import config_flags

import configs
from experiments.common import apply_overrides
from gopo_jax import command_line
from gopo_jax.train.driver import train_run, train_seeds

# The equivalence test's config (tests/test_seed_parallel.py).
TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "sft.episodes": 64,
        "sft.steps": 50, "sft.batch_size": 16, "train.steps": 2, "train.groups": 8, "train.group_size": 2,
        "train.epochs": 2, "train.minibatches": 2, "train.eval_every": 1, "train.checkpoint_every": 1,
        "eval.episodes": 8, "method": "gopo"}
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """Collects the time spans of JAX's tracing/lowering/compilation events; `seconds(a, b)` is the length of
    their union inside [a, b]."""

    def __init__(self):
        self.spans = []
        jax.monitoring.register_event_time_span_listener(self._record)

    def _record(self, event, start, end, **kwargs):
        if event in _COMPILE_EVENTS:
            self.spans.append((start, end))

    def seconds(self, lo: float, hi: float) -> float:
        total, reach = 0.0, lo
        for start, end in sorted(self.spans):
            start, end = max(start, reach), min(end, hi)
            if end > start:
                total += end - start
                reach = end
        return total


def define_flags() -> None:
    config_flags.DEFINE_config_file("config", configs.config_path("mgshop.py"),
                                    "run config; its keys not overridden here take the benchmark's TINY values",
                                    lock_config=True)
    flags.DEFINE_integer("seeds", 4, "seeds trained each way", lower_bound=1)


def run_config(seed: int):
    """`--config` with TINY for the keys the command line leaves alone, and seed `seed`."""
    c = flags.FLAGS.config.copy_and_resolve_references()
    overridden = config_flags.get_override_values(flags.FLAGS["config"])
    apply_overrides(c, {k: v for k, v in TINY.items() if k not in overridden}, where="benchmark TINY")
    c.seed = seed
    return c


def main(argv) -> None:
    del argv
    seeds = list(range(flags.FLAGS.seeds))
    clock = CompileClock()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        start = time.time()
        train_seeds([run_config(s) for s in seeds], [root / "vmapped" / f"seed{s}" for s in seeds])
        results["vmapped"] = (start, time.time())
        start = time.time()
        for s in seeds:
            train_run(run_config(s), root / "separate" / f"seed{s}")
        results["one after another"] = (start, time.time())
    overrides = {**TINY, **config_flags.get_override_values(flags.FLAGS["config"])}
    print(f"{len(seeds)} seeds, devices: {jax.device_count()} x {jax.devices()[0].platform}, overrides: {overrides}")
    rows = {}
    for name, (start, end) in results.items():
        wall, compile_s = end - start, clock.seconds(start, end)
        rows[name] = (wall, wall - compile_s)
        print(f"  {name:>17}: {wall:7.1f} s wall, {compile_s:6.1f} s compiling, {wall - compile_s:7.1f} s excluding "
              "compilation")
    (sw, sx), (vw, vx) = rows["one after another"], rows["vmapped"]
    print(f"  one after another / vmapped: {sw / vw:.2f}x compile included, {sx / vx:.2f}x compile excluded")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
