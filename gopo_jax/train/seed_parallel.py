"""Several seeds of one run config trained together in one process: purejaxrl's `jax.vmap(train)(keys)` for the
run pipeline of `gopo_jax.train.loop.Run`, on pure-JAX worlds.

Every phase is a pure per-seed function batched with `jax.vmap` over a leading seed axis and jitted once: the
reference-policy and held-out evaluations (rollout + per-episode metrics), the demonstrations, the warm start (a
`lax.scan` over SFT steps of the pure train step, one scan per held-out evaluation interval), and each GOPO
iteration (rollout → scores → `method.prepare_batch` → a `lax.scan` over epochs × minibatches of the pure train
step). The pieces are the seed's own `Run`'s: the world, method, losses, optimizers, rollouts and metrics of a
`Run` built for the first seed are reused, and every random draw is `Run.key`'s function of (seed, phase,
iteration). So seed s here trains what `Run(config with seed=s).run()` trains; the numbers agree up to the order
of float reductions (vmapped matmuls, and `Run`'s data-parallel mesh, reduce in other orders), which can change
a sampled token now and then and so the dialogues that follow it.

Each seed gets the directory a `Run` would write: `config.json`/`config.py`, `tokenizer/`, `metrics.jsonl` (+
TensorBoard), `summary.json` (plus a `seed_parallel` entry naming the group), `curves.png`, `samples.md` and
`judge_samples.jsonl`. The group's own checkpoints (the stacked train state, the reference agents and the
iteration) go to `group_dir/checkpoints` on `Run`'s schedule and when SIGTERM asks the group to stop; rerunning
the same group resumes there. A group whose seeds all have `summary.json` is read, not retrained (`train_seeds`).

Scope: pure-JAX worlds (`world.kind == "jax"`, the embedded synthetic shop) and the methods whose rollout,
`prepare_batch` and loss are pure array functions (`SEED_PARALLEL_METHODS`). Host worlds (mgshop, multiwoz,
tmallbrand) run their Python turn loop per dialogue and train one seed at a time. Not done here: the warm-start
cache (`sft.cache_dir` is neither read nor written; the warm start is computed, as its values would be equal).
"""
from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gopo_jax.models.tokenizer import save_tokenizer
from gopo_jax.train import checkpoint
from gopo_jax.train.logging import MetricsLogger, plot_curves, save_config, write_summary
from gopo_jax.train.loop import (_DEMO, _EVAL, _GOPO, _SFT, Run, episode_metrics, group_minibatches,
                                 model_fingerprint, write_judge_samples, write_samples)
from gopo_jax.train.state import TrainState, create_train_state
from gopo_jax.train.step import pure_train_step
from gopo_jax.train.world import HOST_ENVS, init_agents

_log = logging.getLogger(__name__)
# Methods whose whole iteration is a pure function of arrays (checked against separate `Run`s).
SEED_PARALLEL_METHODS = ("gopo", "sft", "grpo", "ppo", "dpo", "memento")
_SAMPLES = 4  # dialogues per agent pair in samples.md, as `Run.write_transcripts`
_HELDOUT_EVERY = 25  # SFT steps between held-out evaluations, as `Run.run`


def seed_key(seed: jax.Array, phase: int, i: jax.Array) -> jax.Array:
    """`Run.key(phase, i)` of the run with `config.seed = seed` (pure; vmap it over seeds)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), phase), i)


def check_supported(config: ml_collections.ConfigDict) -> None:
    """Raises one ValueError naming the key when `config` cannot train with its seeds vmapped."""
    if config.env.name in HOST_ENVS:
        raise ValueError(f"seed-parallel training needs a pure-JAX world; env.name={config.env.name} is a host "
                         "world (a Python turn loop per dialogue) and runs one seed at a time")
    if config.method not in SEED_PARALLEL_METHODS:
        raise ValueError(f"seed-parallel training is not available for method={config.method!r} (config.method); "
                         f"it covers {SEED_PARALLEL_METHODS}; train its seeds one at a time")


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _seed_slice(tree, i: int):
    return jax.tree.map(lambda x: x[i], tree)


def _host(tree) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


class SeedParallelRun:
    """The run pipeline of `Run` for the seeds of `configs` (equal configs but for `seed`), one vmapped process.

    `workdirs[i]` receives what `Run(configs[i], workdirs[i]).run()` would write; `group_dir` (default: next to the
    first workdir) holds the group's checkpoints.
    """

    def __init__(self, configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | pathlib.Path],
                 group_dir: str | pathlib.Path | None = None):
        if not configs or len(configs) != len(workdirs):
            raise ValueError(f"SeedParallelRun: give one workdir per config ({len(configs)} configs, "
                             f"{len(workdirs)} workdirs)")
        check_supported(configs[0])
        self.seeds = [int(c.seed) for c in configs]
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"SeedParallelRun: the configs' seeds {self.seeds} repeat; give each seed once")
        first = _without_seed(configs[0])
        for c in configs[1:]:
            if _without_seed(c) != first:
                diff = sorted(k for k in first.keys() | _without_seed(c).keys()
                              if first.get(k) != _without_seed(c).get(k))
                raise ValueError(f"SeedParallelRun: the configs differ in more than `seed` ({diff[:6]}); a seed "
                                 "group is one setting trained for several seeds")
        self.configs = list(configs)
        self.workdirs = [pathlib.Path(d) for d in workdirs]
        self.group_dir = (pathlib.Path(group_dir) if group_dir is not None else
                          self.workdirs[0].parent / ("seeds" + "-".join(map(str, self.seeds))))
        # The first seed's Run: world, method, losses, optimizers and jitted rollouts, shared by the group (none of
        # them depends on the seed; the seed enters through the initial parameters and the keys).
        self.run = run = Run(configs[0], self.workdirs[0])
        if run.world.kind != "jax":
            raise ValueError(f"seed-parallel training needs a pure-JAX world; env.name={configs[0].env.name} "
                             "runs one seed at a time")
        self.config = cfg = configs[0]
        self.method = method = run.method
        self._seeds = jnp.asarray(self.seeds, jnp.int32)
        init = [run.init_params]
        for s in self.seeds[1:]:
            _, _, params = init_agents(run.world, s)
            params.update(method.extra_params(jax.random.key(s + 7)))
            init.append(params)
        self.init_params = _stack(init)
        self.init_extras = _stack([method.init_extras() for _ in self.seeds])
        metric_kwargs = run.metric_kwargs
        eval_keys = run.eval_env_keys()
        # The first held-out dialogues, for samples.md and judge_samples.jsonl (greedy: a row of the batch is the
        # dialogue `Run.write_transcripts` rolls out alone).
        n_head = min(max(_SAMPLES, cfg.eval.judge_dialogues), cfg.eval.episodes)
        sft_update = pure_train_step(run.warm_start_loss, run.sft_tx)
        gopo_update = pure_train_step(run.gopo_loss, run.tx)
        t = cfg.train

        def new_state(params, extras, tx, seed, phase):
            return create_train_state(params, tx, extras=extras, rng=seed_key(seed, phase, 1_000_000))

        def reference_eval(seed):
            traj = run.reference_rollout({}, eval_keys, seed_key(seed, _EVAL, 1))
            return episode_metrics(traj, **metric_kwargs)

        def evaluate(params, extras, seed):
            traj = run.eval_rollout(method.acting_params(params, extras), eval_keys, seed_key(seed, _EVAL, 0))
            return episode_metrics(traj, **metric_kwargs), jax.tree.map(lambda x: x[:n_head], traj)

        def demonstrations(seed):
            n = cfg.sft.episodes
            traj = run.demo_rollout({}, run.world.episodes(seed_key(seed, _DEMO, 0), n), seed_key(seed, _DEMO, 1))
            n_held = max(1, round(n * cfg.sft.heldout_fraction))
            return jax.tree.map(lambda x: x[n_held:], traj), jax.tree.map(lambda x: x[:n_held], traj)

        def sft_steps(state, train_demo, seed, steps, batch_size):
            n_train = jax.tree.leaves(train_demo)[0].shape[0]

            def one(state, i):
                perm = jax.random.permutation(seed_key(seed, _SFT, i), n_train)[:batch_size]
                return sft_update(state, {"traj": jax.tree.map(lambda x: x[perm], train_demo)})

            return jax.lax.scan(one, state, steps)

        def sft_heldout(params, held_demo):
            _, (metrics, _) = run.warm_start_loss(params, {}, {"traj": held_demo}, None)
            return metrics

        def gopo_iteration(state, ref_params, seed, it):
            env_keys = run.world.group_episodes(seed_key(seed, _GOPO, 2 * it), t.groups, t.group_size)
            acting = method.acting_params(method.rollout_params(state.params, ref_params), state.extras)
            traj = run.rollout(acting, env_keys, seed_key(seed, _GOPO, 2 * it + 1))
            batch = method.prepare_batch(traj, ref_params, state.params)

            def epoch(state, e):
                perm = jax.random.permutation(seed_key(seed, _GOPO, 10_000 + it * 100 + e), t.groups)
                return jax.lax.scan(gopo_update, state, group_minibatches(batch, perm, t.group_size, t.minibatches))

            state, stats = jax.lax.scan(epoch, state, jnp.arange(t.epochs))
            return state, stats, episode_metrics(traj, **metric_kwargs)

        self._sft_state = jax.jit(jax.vmap(lambda p, x, s: new_state(p, x, run.sft_tx, s, _SFT)))
        self._gopo_state = jax.jit(jax.vmap(lambda p, x, s: new_state(p, x, run.tx, s, _GOPO)))
        self._reference_eval = jax.jit(jax.vmap(reference_eval))
        self._evaluate = jax.jit(jax.vmap(evaluate))
        self._demonstrations = jax.jit(jax.vmap(demonstrations))
        self._sft_steps = jax.jit(jax.vmap(sft_steps, in_axes=(0, 0, 0, None, None)), static_argnums=4,
                                  donate_argnums=0)
        self._sft_heldout = jax.jit(jax.vmap(sft_heldout))
        self._gopo_iteration = jax.jit(jax.vmap(gopo_iteration, in_axes=(0, 0, 0, None)), donate_argnums=0)

    # --- helpers ------------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return model_fingerprint(self.run.world) | {"seeds": self.seeds}

    def _log_eval(self, loggers, step: int, ep: dict, reference: dict) -> None:
        for i, logger in enumerate(loggers):
            self.run._log_eval(logger, step, _seed_slice(ep, i), _seed_slice(reference, i))

    def _save(self, it: int, state: TrainState, ref_params) -> None:
        checkpoint.save_checkpoint(self.group_dir / "checkpoints", it,
                                   {"state": state, "ref": ref_params, "iteration": np.int64(it)},
                                   metadata=self._fingerprint(), keep=self.config.train.keep_checkpoints)

    # --- the pipeline -------------------------------------------------------------------------------------------
    def run_group(self) -> list[dict]:
        """Trains the group (resuming from its checkpoint) and returns each seed's summary, in `seeds` order; a
        group stopped by SIGTERM returns `{"stopped": True, "iteration": i}` for every seed."""
        cfg, run, method = self.config, self.run, self.method
        t_start = time.time()
        for c, d in zip(self.configs, self.workdirs):
            save_config(d, c)
            if not (d / "tokenizer" / "tokenizer.json").exists():
                save_tokenizer(run.world.tokenizer, d / "tokenizer")
        total = cfg.sft.steps + (cfg.train.steps if method.trains else 0)
        # One console progress line (the first seed's); every seed's metrics go to its own metrics.jsonl.
        loggers = [MetricsLogger(d, total_steps=total, console=i == 0) for i, d in enumerate(self.workdirs)]
        state = self._sft_state(jax.tree.map(jnp.copy, self.init_params), self.init_extras, self._seeds)
        ref_params = self.init_params
        iteration = 0
        restored = checkpoint.restore_checkpoint(self.group_dir / "checkpoints",
                                                 {"state": state, "ref": ref_params, "iteration": np.int64(0)},
                                                 expected_metadata=self._fingerprint())
        if restored is not None:
            payload, _ = restored
            state, ref_params, iteration = payload["state"], payload["ref"], int(payload["iteration"])
            for logger in loggers:
                logger.truncate_after(iteration)
            _log.info("seed group %s resumed from %s at iteration %d", self.seeds, self.group_dir, iteration)

        reference = _host(self._reference_eval(self._seeds))
        train_demo, held_demo = self._demonstrations(self._seeds)
        batch_size = run.sft_batch_size(jax.tree.leaves(train_demo)[0].shape[1])
        with checkpoint.install_sigterm_handler() as should_stop:
            # ---- warm start: one scan per held-out interval ----
            while iteration < cfg.sft.steps:
                end = min((iteration // _HELDOUT_EVERY + 1) * _HELDOUT_EVERY, cfg.sft.steps)
                state, sft_metrics = self._sft_steps(state, train_demo, self._seeds,
                                                     jnp.arange(iteration, end, dtype=jnp.int32), batch_size)
                held = _host(self._sft_heldout(state.params, held_demo))
                sft_metrics = _host(sft_metrics)
                for k, step in enumerate(range(iteration + 1, end + 1)):
                    for i, logger in enumerate(loggers):
                        if step == end:
                            logger.log(step, {n: float(v[i]) for n, v in held.items()}, prefix="sft_heldout")
                        logger.log(step, {n: float(v[i, k]) for n, v in sft_metrics.items()}, prefix="sft")
                iteration = end
                if iteration == cfg.sft.steps:
                    # The SFT agents become the reference policy; the method starts with a fresh optimizer.
                    ref_params = jax.tree.map(jnp.copy, state.params)
                    state = self._gopo_state(jax.tree.map(jnp.copy, ref_params), self.init_extras, self._seeds)
                    self._save(iteration, state, ref_params)
                elif should_stop():
                    self._save(iteration, state, ref_params)
                    return self._stopped(loggers, iteration)
            if cfg.sft.steps == 0 and iteration == 0:
                # As `Run`: without a warm start the method keeps the SFT-phase state (its optimizer state is the
                # same shape; only its rng key differs from a fresh one).
                ref_params = jax.tree.map(jnp.copy, state.params)

            sft_eval, sft_head = self._evaluate(ref_params, self.init_extras, self._seeds)
            sft_eval = _host(sft_eval)
            self._log_eval(loggers, cfg.sft.steps, sft_eval, reference)
            # ---- method iterations ----
            while iteration < total:
                it = iteration - cfg.sft.steps
                state, stats, rollout = self._gopo_iteration(state, ref_params, self._seeds, jnp.int32(it))
                stats, rollout = _host(stats), _host(rollout)
                iteration += 1
                for i, logger in enumerate(loggers):
                    metrics = {k: float(v[i].mean()) for k, v in stats.items()}
                    metrics.update({f"rollout_{k}": float(v[i].mean()) for k, v in rollout.items()})
                    logger.log(iteration, metrics, prefix="train")
                if (it + 1) % cfg.train.eval_every == 0 or iteration == total:
                    self._log_eval(loggers, iteration, _host(self._evaluate(state.params, state.extras,
                                                                            self._seeds)[0]), reference)
                if (it + 1) % cfg.train.checkpoint_every == 0 or iteration == total or should_stop():
                    self._save(iteration, state, ref_params)
                if should_stop() and iteration < total:
                    return self._stopped(loggers, iteration)

        final, final_head = self._evaluate(state.params, state.extras, self._seeds)
        final = _host(final)
        wall = time.time() - t_start
        summaries = []
        for i, (d, logger) in enumerate(zip(self.workdirs, loggers)):
            summary = run._summary(_seed_slice(sft_eval, i), _seed_slice(final, i), _seed_slice(reference, i), wall,
                                   _seed_slice(state, i))
            summary["seed_parallel"] = {"seeds": self.seeds, "group_dir": str(self.group_dir)}
            write_summary(d, summary)
            logger.close()
            plot_curves(d, run.curve_names())
            final_traj = _seed_slice(final_head, i)
            write_samples(d, run.world, [("sft", _seed_slice(sft_head, i)), (method.name, final_traj)],
                          min(_SAMPLES, cfg.eval.episodes))
            write_judge_samples(d, run.world, final_traj, cfg.eval.judge_dialogues)
            summaries.append(summary)
        return summaries

    def _stopped(self, loggers, iteration: int) -> list[dict]:
        for logger in loggers:
            logger.close()
        return [{"stopped": True, "iteration": iteration} for _ in self.seeds]


def _without_seed(config: ml_collections.ConfigDict) -> dict:
    flat = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(json.loads(config.to_json_best_effort()))
    flat.pop("seed")
    return flat


def train_seeds(configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str | pathlib.Path],
                group_dir: str | pathlib.Path | None = None) -> list[dict]:
    """Each seed's summary: read from `workdirs[i]/summary.json` when every seed of the group has one (a finished
    group is not retrained), else the group is trained (or resumed) with `SeedParallelRun`."""
    paths = [pathlib.Path(d) / "summary.json" for d in workdirs]
    if paths and all(p.exists() for p in paths):
        return [json.loads(p.read_text()) for p in paths]
    return SeedParallelRun(configs, workdirs, group_dir).run_group()
