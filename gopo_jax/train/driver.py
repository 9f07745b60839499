"""The trainer: warm start (SFT) → method iterations → held-out evaluation → report, for one seed or for several
seeds of one config vmapped in one process (purejaxrl's `jax.vmap(train)(keys)`).

One loop (`Trainer.run`) drives both; what differs is how the pure phase functions of `gopo_jax.train.phases` are
executed:
* `_OneSeed`: jitted with the mesh's layouts; the state has no seed axis. On a host world (a Python turn loop per
  dialogue) the rollouts run on the host and the jitted `update` follows.
* `_VmappedSeeds`: `jax.jit(jax.vmap(f))` over a leading seed axis; pure-JAX worlds only.

Exact resumption: every random draw is a function of (seed, phase, index) (`gopo_jax.train.schedule`), the
tokenizer is saved in the workdir, and a checkpoint holds the train state (agents, optimizer, extras, step, rng),
the reference parameters and the step. Rerunning the same command restores the newest checkpoint and continues;
the result is bitwise that of an uninterrupted run on CPU. SIGTERM saves at the next block or iteration boundary.
The train step skips a non-finite update (`gopo_jax.train.step`); `train.max_nonfinite_updates` consecutive skips in
one phase stop the run with `NonFiniteUpdatesError`, which saves nothing and leaves the newest checkpoint as it is.

Each seed's workdir receives `config.json`/`config.py`, `tokenizer/`, `metrics.jsonl` (+ TensorBoard),
`summary.json`, `curves.png`, `samples.md` and `judge_samples.jsonl`; a single run keeps its checkpoints in
`workdir/checkpoints`, a seed group in `group_dir/checkpoints`. With `sft.cache_dir` the warm start of each seed is
read from / written to the shared warm-start cache (`gopo_jax.train.warm_start`) by both executors.
"""
from __future__ import annotations

import contextlib
import functools

import json
import logging
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gopo_jax import parallel
from gopo_jax.envs.registry import is_pure_jax
from gopo_jax.models.tokenizer import save_tokenizer
from gopo_jax.train import checkpoint, report, schedule
from gopo_jax.train.build import Components, agent_params, build, demo_split, init_agent_params
from gopo_jax.train.metrics_log import MetricsLogger, WandbSettings, plot_curves, save_config, write_summary
from gopo_jax.train.phases import Phases
from gopo_jax.train.warm_start import WarmStartCache, tokenizer_digest, warm_start_key

_log = logging.getLogger(__name__)


def _copy(tree):
    # The updates donate the train state's buffers; the reference parameters must survive them.
    return jax.tree.map(jnp.copy, tree)


def _row(metrics: dict, i: int) -> dict:
    """Seed i's per-episode metrics from host metrics with a leading seed axis."""
    return {k: v[i] for k, v in metrics.items()}


def _to_host(tree) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


class _Executor:
    """How the phases run: subclasses set the compiled phase functions and `seed` (what they take for the seed);
    the driver calls only these methods, the same for one seed and for many."""

    seed: object

    def demonstrations(self):
        return self._demonstrations(self.seed)

    def sft_block(self, state, train_demo, steps, batch_size):
        return self._sft_block(state, train_demo, self.seed, steps, batch_size)

    def sft_heldout(self, params, held_demo):
        return self._sft_heldout(params, held_demo)

    def reference_eval(self):
        return self._reference_eval(self.seed)

    def start_method(self, sft_params):
        """(the method's initial parameters, the reference to keep): `Phases.start_method`, on fresh buffers."""
        params, kept = self._start_method(sft_params, self.seed)
        return _copy(params), _copy(kept)

    def reference(self, kept, params):
        return self._reference(kept, params)

    def evaluate(self, params, extras):
        return self._evaluate(params, extras, self.seed)

    def iteration(self, state, ref_params, it: int):
        # A host scalar argument travels with the call; `jnp.int32(it)` would be an eager conversion of its own.
        return self._iteration(state, ref_params, self.seed, np.int32(it))


class _OneSeed(_Executor):
    """One seed, jitted on the run's mesh. Host-side results get a leading seed axis of 1, as `_VmappedSeeds`'."""

    def __init__(self, c: Components, seed: int):
        self.c, self.seed = c, seed
        p = self.phases = Phases(c, mesh=c.mesh)

        def jit(f, **kwargs):
            # Traced and run with the run's mesh as the context mesh, so that inside the model the layer scan's
            # activations keep their batch split (`qwen3._batch_split`) rather than following fsdp-split weights.
            compiled = jax.jit(f, **kwargs)

            @functools.wraps(f)
            def on_mesh(*args):
                with jax.set_mesh(c.mesh):
                    return compiled(*args)

            on_mesh.compiled = compiled  # the jitted function (its cache, its lowering)
            return on_mesh

        self._sft_block = jit(p.sft_block, static_argnums=4, donate_argnums=0)
        self._sft_heldout = jit(p.sft_heldout)
        self._start_method = jit(p.start_method)
        self._reference = jit(p.reference)
        if c.pure_world:
            self._iteration = jit(p.iteration, donate_argnums=0)
        else:  # the rollout is a Python turn loop; only the update after it is jitted
            self._update = jit(p.update, donate_argnums=0)
            self._iteration = self._host_iteration
        # On a host world these roll out in Python (the agents' turns are jitted inside the world's rollout).
        jit_if_pure = jit if c.pure_world else (lambda f: f)
        self._evaluate = jit_if_pure(p.evaluate)
        self._reference_eval = jit_if_pure(p.reference_eval)
        self._demonstrations = jit_if_pure(p.demonstrations)

    def _host_iteration(self, state, ref_params, seed, it):
        acting, episodes, agents_key = self.phases.rollout_inputs(state, ref_params, seed, it)
        return self._update(state, ref_params, self.c.rollout(acting, episodes, agents_key), seed, it)

    def stack(self, trees: list):
        (tree,) = trees
        return tree

    def seed_slice(self, tree, i: int):
        del i
        return tree

    def host(self, tree) -> dict:
        return jax.tree.map(lambda x: x[None], _to_host(tree))

    def sft_state(self, params, extras):
        return parallel.shard_params(self.phases.sft_state(params, extras, self.seed), self.c.mesh)

    def method_state(self, params, extras):
        return parallel.shard_params(self.phases.method_state(params, extras, self.seed), self.c.mesh)


class _VmappedSeeds(_Executor):
    """Several seeds, each phase one `jax.jit(jax.vmap(...))` over a leading seed axis."""

    def __init__(self, c: Components, seeds: Sequence[int]):
        if not c.pure_world:
            raise ValueError(f"seed-parallel training needs a pure-JAX world; env.name={c.config.env.name} is a "
                             "host world (a Python turn loop per dialogue) and runs one seed at a time")
        self.c = c
        self.seed = jnp.asarray(seeds, jnp.int32)
        p = Phases(c)
        self._sft_state = jax.jit(jax.vmap(p.sft_state))
        self._method_state = jax.jit(jax.vmap(p.method_state))
        self._demonstrations = jax.jit(jax.vmap(p.demonstrations))
        self._sft_block = jax.jit(jax.vmap(p.sft_block, in_axes=(0, 0, 0, None, None)), static_argnums=4,
                                  donate_argnums=0)
        self._sft_heldout = jax.jit(jax.vmap(p.sft_heldout))
        self._start_method = jax.jit(jax.vmap(p.start_method))
        self._reference = jax.jit(jax.vmap(p.reference))
        self._reference_eval = jax.jit(jax.vmap(p.reference_eval))
        self._evaluate = jax.jit(jax.vmap(p.evaluate))
        self._iteration = jax.jit(jax.vmap(p.iteration, in_axes=(0, 0, 0, None)), donate_argnums=0)

    def stack(self, trees: list):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    def seed_slice(self, tree, i: int):
        return jax.tree.map(lambda x: x[i], tree)

    def host(self, tree) -> dict:
        return _to_host(tree)

    def sft_state(self, params, extras):
        return self._sft_state(params, extras, self.seed)

    def method_state(self, params, extras):
        return self._method_state(params, extras, self.seed)


class NonFiniteUpdatesError(ValueError):
    """Training stopped after `train.max_nonfinite_updates` consecutive skipped updates. A ValueError, so the command
    line prints its message as one `error:` line and exits non-zero."""


class NonFiniteStreak:
    """Each seed's run of consecutive skipped (non-finite) updates in one phase. Counted on the host from the train
    step's `nonfinite` flags in update order, so a run carries on across the scanned updates of one SFT block or
    method iteration and from one block or iteration to the next. `limit` 0 never stops."""

    def __init__(self, phase: str, limit: int, seeds: Sequence[int], start: int):
        self.phase, self.limit, self.seeds, self.start = phase, limit, list(seeds), start
        self.skipped = [0] * len(self.seeds)
        self.last_finite: list[int | None] = [None] * len(self.seeds)  # the step of each seed's newest finite update

    def add(self, nonfinite, steps: Sequence[int], checkpoint_step: int | None) -> None:
        """`nonfinite`: [seeds, ...] flags of the updates logged at `steps` (one step per update, in update order);
        raises NonFiniteUpdatesError when a seed's run reaches the limit."""
        for i, flags in enumerate(np.asarray(nonfinite).reshape(len(self.seeds), -1)):
            for flag, step in zip(flags, steps, strict=True):
                if not flag:
                    self.skipped[i], self.last_finite[i] = 0, step
                    continue
                self.skipped[i] += 1
                if self.limit and self.skipped[i] >= self.limit:
                    raise NonFiniteUpdatesError(self._message(i, step, checkpoint_step))

    def _message(self, i: int, step: int, checkpoint_step: int | None) -> str:
        seed = f" (seed {self.seeds[i]})" if len(self.seeds) > 1 else ""
        last = (f"the last finite update was at step {self.last_finite[i]}" if self.last_finite[i] is not None
                else f"no update since step {self.start} was finite")
        # Nothing is saved on the way out: the state in memory has the last finite update's parameters (a skip
        # changes none), but a checkpoint of it would let a rerun resume past the skipped batches as if they trained.
        kept = (f"nothing is saved on stopping: the newest checkpoint (step {checkpoint_step}) is kept and a rerun "
                "resumes from it" if checkpoint_step is not None
                else "no checkpoint has been written yet, so a rerun starts over")
        return (f"{self.phase}{seed} stopped at step {step}: {self.skipped[i]} consecutive updates were non-finite "
                f"(NaN/inf loss, gradient norm or extras, e.g. from NaN rewards) and skipped "
                f"(train.max_nonfinite_updates={self.limit}); {last}; {kept}. Find where it began in metrics.jsonl "
                "(*/nonfinite, */loss), then fix the NaN source or lower the learning rate")


class Trainer:
    """Trains the seeds `seeds` of the components' config; `workdirs[i]` receives seed i's files and `ckpt_dir`
    the (stacked) checkpoints. `configs[i]` is seed i's config (they differ in `seed` only)."""

    def __init__(self, c: Components, configs: Sequence[ml_collections.ConfigDict],
                 workdirs: Sequence[pathlib.Path], ckpt_dir: pathlib.Path, *, vmapped: bool):
        self.c, self.configs, self.workdirs, self.ckpt_dir = c, list(configs), list(workdirs), ckpt_dir
        self.seeds = [int(cfg.seed) for cfg in configs]
        self.ex = _VmappedSeeds(c, self.seeds) if vmapped else _OneSeed(c, self.seeds[0])
        self.fingerprint = c.fingerprint() | ({"seeds": self.seeds} if vmapped else {})
        self.checkpoint_step: int | None = None  # the newest checkpoint's step (what a stopped run leaves)

    def _save(self, step: int, state, ref_params) -> None:
        payload = {"state": state, "ref": ref_params, "iteration": np.int64(step)}
        checkpoint.save_checkpoint(self.ckpt_dir, step, payload, metadata=self.fingerprint,
                                   keep=self.c.config.train.keep_checkpoints)
        self.checkpoint_step = step

    def _streak(self, phase: str, start: int) -> NonFiniteStreak:
        return NonFiniteStreak(phase, self.c.config.train.max_nonfinite_updates, self.seeds, start)

    def _warm_start_caches(self) -> list[WarmStartCache] | None:
        cfg = self.c.config
        if not cfg.sft.cache_dir or cfg.sft.steps == 0:
            return None
        fingerprint = self.c.fingerprint() | {"tokenizer": tokenizer_digest(self.c.world.tokenizer)}
        return [WarmStartCache(cfg.sft.cache_dir, warm_start_key(seed_cfg, use_expert=self.c.method.use_expert),
                               fingerprint) for seed_cfg in self.configs]

    def _log_eval(self, loggers, step: int, ep: dict, reference: dict) -> None:
        for i, logger in enumerate(loggers):
            logger.log(step, report.eval_record(_row(ep, i), _row(reference, i),
                                                use_expert=self.c.method.use_expert), prefix="eval")

    def run(self) -> list[dict]:
        """Each seed's summary; `{"stopped": True, "iteration": step}` for each seed when SIGTERM stopped it."""
        c, sched = self.c, self.c.schedule
        t_start = time.time()
        for cfg, d in zip(self.configs, self.workdirs):
            save_config(d, cfg)
            if not (d / "tokenizer" / "tokenizer.json").exists():
                save_tokenizer(c.world.tokenizer, d / "tokenizer")
        # One progress display, the first seed's: a bar for the warm start and one for the method's iterations, with
        # the held-out evaluations as lines. Every seed's metrics go to its own metrics.jsonl (and W&B run).
        phases = [("warm start", sched.sft_steps), (c.method.name, sched.method_steps)]
        with contextlib.ExitStack() as open_loggers:
            loggers = [open_loggers.enter_context(
                MetricsLogger(d, total_steps=sched.total, phases=phases, console=i == 0,
                              evaluation_prefixes=("eval", "sft_heldout"), wandb=WandbSettings.from_config(cfg)))
                for i, (cfg, d) in enumerate(zip(self.configs, self.workdirs))]
            return self._train(loggers, t_start)

    def _train(self, loggers: list[MetricsLogger], t_start: float) -> list[dict]:
        c, ex, sched, method = self.c, self.ex, self.c.schedule, self.c.method
        init_params = ex.stack([c.init_params(s) for s in self.seeds])

        def init_extras():  # fresh arrays each time: the updates donate the state's
            return ex.stack([method.init_extras() for _ in self.seeds])

        state = ex.sft_state(_copy(init_params), init_extras())
        ref_params, step = Phases(c).kept_reference(init_params), 0
        restored = checkpoint.restore_checkpoint(self.ckpt_dir, {"state": state, "ref": ref_params,
                                                                 "iteration": np.int64(0)},
                                                 expected_metadata=self.fingerprint)
        if restored is not None:
            payload, _ = restored
            state, ref_params, step = payload["state"], payload["ref"], int(payload["iteration"])
            self.checkpoint_step = step
            for logger in loggers:
                logger.truncate_after(step)
            _log.info("resumed from %s at step %d", self.ckpt_dir, step)

        reference = ex.host(ex.reference_eval())
        train_demo, held_demo = ex.demonstrations()
        batch_size = c.sft_batch_size(demo_split(c.config)[0])
        caches = self._warm_start_caches()
        with checkpoint.install_sigterm_handler() as should_stop:
            # ---- warm start ----
            if step == 0 and caches is not None:
                hits = [cache.load(agent_params(ex.seed_slice(state.params, i))) for i, cache in enumerate(caches)]
                if all(hit is not None for hit in hits):
                    for logger, (_, records) in zip(loggers, hits):
                        for record in records:
                            logger.log(record["step"], {k: v for k, v in record.items()
                                                        if k not in ("step", "time") and v is not None}, prefix="")
                    start, ref_params = ex.start_method({**state.params,
                                                         **ex.stack([agents for agents, _ in hits])})
                    state = ex.method_state(start, init_extras())
                    step = sched.sft_steps
                    self._save(step, state, ref_params)
            sft_streak = self._streak("warm start (SFT)", step)
            while step < sched.sft_steps:
                end = sched.sft_block_end(step)
                state, sft_metrics = ex.sft_block(state, train_demo, jnp.arange(step, end, dtype=jnp.int32),
                                                  batch_size)
                # One copy to the host per block (the device waits for nothing else of the block).
                held, sft_metrics = ex.host((ex.sft_heldout(state.params, held_demo), sft_metrics))
                for k, s in enumerate(range(step + 1, end + 1)):
                    for i, logger in enumerate(loggers):
                        if s == end:
                            logger.log(s, {n: float(v[i]) for n, v in held.items()}, prefix="sft_heldout")
                        logger.log(s, {n: float(v[i, k]) for n, v in sft_metrics.items()}, prefix="sft")
                sft_streak.add(sft_metrics["nonfinite"], range(step + 1, end + 1), self.checkpoint_step)
                step = end
                if step == sched.sft_steps:
                    # The SFT agents become the reference policy; the method starts with a fresh optimizer.
                    for i, cache in enumerate(caches or []):
                        cache.store(step, agent_params(ex.seed_slice(state.params, i)), loggers[i].records(step))
                    start, ref_params = ex.start_method(state.params)
                    state = ex.method_state(start, init_extras())
                    self._save(step, state, ref_params)
                elif should_stop():
                    self._save(step, state, ref_params)
                    return self._stopped(step)
            if sched.sft_steps == 0 and step == 0:
                # No warm start: the initial agents are the reference, and the method has its own optimizer.
                start, ref_params = ex.start_method(state.params)
                state = ex.method_state(start, init_extras())

            sft_eval, sft_head = ex.evaluate(ex.reference(ref_params, state.params), init_extras())
            sft_eval = ex.host(sft_eval)
            self._log_eval(loggers, sched.sft_steps, sft_eval, reference)
            # ---- method iterations ----
            last_eval = (None, None, None)  # (step, metrics, head) of the newest held-out evaluation
            method_streak = self._streak(method.name, step)
            while step < sched.total:
                state, stats, rollout = ex.iteration(state, ref_params, step - sched.sft_steps)
                # The iteration is one jitted call on a pure-JAX world; this single copy of its (small) statistics
                # is the only time the host waits for it.
                stats, rollout = ex.host((stats, rollout))
                step += 1
                for i, logger in enumerate(loggers):
                    metrics = {k: float(v[i].mean()) for k, v in stats.items()}
                    metrics.update({f"rollout_{k}": float(v[i].mean())
                                    for k, v in report.defined_metrics(rollout, use_expert=method.use_expert).items()})
                    logger.log(step, metrics, prefix="train")
                # stats are [seeds, epochs, minibatches]: every update of this iteration is logged at `step`.
                updates = stats["nonfinite"][0].size
                method_streak.add(stats["nonfinite"], [step] * updates, self.checkpoint_step)
                if sched.evaluates_after(step):
                    last_eval = (step, *ex.evaluate(state.params, state.extras))
                    self._log_eval(loggers, step, ex.host(last_eval[1]), reference)
                if sched.saves_after(step) or should_stop():
                    self._save(step, state, ref_params)
                if should_stop() and step < sched.total:
                    return self._stopped(step)

        # The last iteration's evaluation is the final one; a run resumed at its end evaluates once more.
        final, final_head = (last_eval[1:] if last_eval[0] == sched.total
                             else ex.evaluate(state.params, state.extras))
        return self._finish(loggers, state, sft_eval, ex.host(final), reference, sft_head, final_head,
                            time.time() - t_start)

    def _finish(self, loggers, state, sft_eval, final, reference, sft_head, final_head, wall) -> list[dict]:
        c, ex, method = self.c, self.ex, self.c.method
        curves = report.curve_names(use_expert=method.use_expert, trains=method.trains)
        summaries = []
        for i, (d, logger) in enumerate(zip(self.workdirs, loggers)):
            summary = report.run_summary(env=c.world.spec.name, method=method.name, use_expert=method.use_expert,
                                         eval_episodes=c.config.eval.episodes, sft=_row(sft_eval, i),
                                         final=_row(final, i), reference=_row(reference, i), wall=wall,
                                         params=ex.seed_slice(state.params, i))
            if isinstance(self.ex, _VmappedSeeds):
                summary["seed_parallel"] = {"seeds": self.seeds, "group_dir": str(self.ckpt_dir.parent)}
            write_summary(d, summary)
            logger.close()
            plot_curves(d, curves)
            final_traj = jax.device_get(ex.seed_slice(final_head, i))
            num = min(schedule.SAMPLE_DIALOGUES, c.config.eval.episodes)
            report.write_samples(d, c.world, [("sft", jax.device_get(ex.seed_slice(sft_head, i))),
                                              (method.name, final_traj)], num)
            report.write_judge_samples(d, c.world, final_traj, c.config.eval.judge_dialogues)
            summaries.append(summary)
        return summaries

    def _stopped(self, step: int) -> list[dict]:
        return [{"stopped": True, "iteration": step} for _ in self.seeds]


def check_supported(config: ml_collections.ConfigDict) -> None:
    """Raises one ValueError naming the key when `config`'s seeds cannot train vmapped in one process."""
    if not is_pure_jax(config.env.name):
        raise ValueError(f"seed-parallel training needs a pure-JAX world; env.name={config.env.name} is a host "
                         "world (a Python turn loop per dialogue) and runs one seed at a time")
    if config.method == "prompted":
        raise ValueError("seed-parallel training is not available for method='prompted' (config.method): a "
                         "prompted chat model is evaluated, not trained")


def train_run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Trains one run (resuming from `workdir/checkpoints`) and returns its summary."""
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    c = build(config, workdir)
    return Trainer(c, [config], [workdir], workdir / "checkpoints", vmapped=False).run()[0]


def _without_seed(config: ml_collections.ConfigDict) -> dict:
    flat = checkpoint.flatten_json(json.loads(config.to_json_best_effort()))
    flat.pop("seed")
    return flat


def train_seeds(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | pathlib.Path],
                group_dir: str | pathlib.Path | None = None) -> list[dict]:
    """The seeds of one config (equal but for `seed`) trained vmapped in one process; each seed's summary, in
    order. A group whose seeds all have `summary.json` is read, not retrained; `group_dir` (default: beside the
    first workdir) holds the group's checkpoints, and rerunning the same group resumes there."""
    paths = [pathlib.Path(d) / "summary.json" for d in workdirs]
    if paths and all(p.exists() for p in paths):
        return [json.loads(p.read_text()) for p in paths]
    if not configs or len(configs) != len(workdirs):
        raise ValueError(f"train_seeds: give one workdir per config ({len(configs)} configs, {len(workdirs)} "
                         "workdirs)")
    check_supported(configs[0])
    seeds = [int(c.seed) for c in configs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"train_seeds: the configs' seeds {seeds} repeat; give each seed once")
    first = _without_seed(configs[0])
    for cfg in configs[1:]:
        other = _without_seed(cfg)
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise ValueError(f"train_seeds: the configs differ in more than `seed` ({diff[:6]}); a seed group is one "
                             "setting trained for several seeds")
    workdirs = [pathlib.Path(d) for d in workdirs]
    for d in workdirs:
        d.mkdir(parents=True, exist_ok=True)
    group_dir = (pathlib.Path(group_dir) if group_dir is not None
                 else workdirs[0].parent / ("seeds" + "-".join(map(str, seeds))))
    # The components do not depend on the seed (it enters through the initial parameters and the keys).
    c = build(configs[0], workdirs[0])
    return Trainer(c, configs, workdirs, group_dir / "checkpoints", vmapped=True).run()


def restore_agents(workdir: str | pathlib.Path, config: ml_collections.ConfigDict, step: int | None = None):
    """(components, acting parameters, iteration) of checkpoint `step` (default: the newest) of a single run's
    workdir, for serving or export; None when the run has no checkpoint yet. Nothing is trained or compiled."""
    workdir = pathlib.Path(workdir)
    c = build(config, workdir)
    phases, seed = Phases(c), int(config.seed)

    def initial():
        # The agents as their configs shape them (a pretrained run's are shaped like its checkpoint's), never
        # loaded: the checkpoint fills them.
        params = {**init_agent_params(c.world, seed), **c.method.init_extra_params(schedule.extra_params_key(seed))}
        return {"state": phases.method_state(params, c.method.init_extras(), seed),
                "ref": phases.kept_reference(params)}

    # Restored into abstract arrays: nothing is initialised, no optimizer moments or pretrained weights are built
    # only to be overwritten (the server and the export of a large model hold the restored state alone).
    restored = checkpoint.restore_checkpoint(workdir / "checkpoints",
                                             {**jax.eval_shape(initial), "iteration": np.int64(0)},
                                             expected_metadata=c.fingerprint(), step=step)
    if restored is None:
        return None
    payload, _ = restored
    state = payload["state"]
    return c, c.method.acting_params(state.params, state.extras), int(payload["iteration"])
