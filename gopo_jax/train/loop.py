"""The GOPO run on a pure-JAX world: warm start (SFT) → GOPO iterations → evaluation → report.

Each GOPO iteration: rollout of `groups × group_size` dialogues (one jitted `lax.scan`) → scores S = ESNDCG +
λ_B·R_B (pure, vmapped) → reference log-probs when a KL/preference reference is on → `epochs × minibatches`
updates of the one sharded hierarchical train step → logging; held-out evaluation and checkpoints on a schedule.

Exact resumption: every random draw is a function of (config.seed, phase, iteration), the tokenizer is saved in
the workdir, and a checkpoint holds the train state (both agents, optimizer, μ, step, rng), the reference
parameters and the iteration. Rerunning the same command on the workdir restores the newest checkpoint and
continues; the result is bitwise the same as an uninterrupted run on CPU.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gopo_jax import parallel
from gopo_jax.algorithms.hierarchical import GOPOHyper, make_warm_start_loss, trajectory_scores_from
from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.dialogue.render import judge_samples, render_dialogue
from gopo_jax.dialogue.rollout import SamplingConfig
from gopo_jax.metrics.business import BusinessWeights, business_reward
from gopo_jax.metrics.esndcg import esndcg
from gopo_jax.metrics.reporting import mean_ci, paired_difference
from gopo_jax.metrics.tse import tse
from gopo_jax.train import checkpoint
from gopo_jax.train.methods import get_method, reference_log_probs
from gopo_jax.train.logging import MetricsLogger, plot_curves, save_config, write_summary
from gopo_jax.train.state import TrainState, create_train_state
from gopo_jax.train.step import make_optimizer, make_train_step
from gopo_jax.train.warm_start import WarmStartCache, tokenizer_digest, warm_start_key
from gopo_jax.train.world import World, build_world, init_agents

_log = logging.getLogger(__name__)
_SFT, _GOPO, _EVAL, _DEMO = 1, 2, 3, 4  # phase tags folded into PRNG keys
_AGENTS = ("expert", "cs")  # the parameters the warm start trains
JUDGE_SAMPLES = "judge_samples.jsonl"  # the trained agents' held-out turns, for a G-Eval judge


def hyper_from_config(config) -> GOPOHyper:
    g = config.gopo
    return GOPOHyper(group_size=config.train.group_size, expert_loss=g.expert_loss, beta_pref=g.beta_pref,
                     pref_margin=g.pref_margin, expert_reference=g.expert_reference, beta_expert=g.beta_expert,
                     clip_eps=g.clip_eps, lambda_b=g.lambda_b, lambda_s=g.lambda_s, alpha=g.alpha, beta_cs=g.beta_cs,
                     kl_clamp=g.kl_clamp, aggregation=g.aggregation, constraint=g.constraint, mu_lr=g.mu_lr,
                     delta=g.delta, use_esndcg=g.use_esndcg, esndcg_p=g.esndcg_p, sop_mask=g.sop_mask,
                     use_expert=g.use_expert)


def validate_config(config) -> None:
    """Bad values fail before anything is built, each with the key and the fix."""
    t = config.train
    checks = [
        (t.steps >= 0, "train.steps must be >= 0"),
        (t.groups >= 1 and t.group_size >= 2, "train.groups >= 1 and train.group_size >= 2 (a group needs pairs)"),
        ((t.groups * t.group_size) % t.minibatches == 0 and t.groups % t.minibatches == 0,
         "train.groups must be a multiple of train.minibatches (minibatches hold whole groups)"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (config.sft.steps >= 0 and config.sft.batch_size >= 1, "sft.steps >= 0 and sft.batch_size >= 1"),
        (0.0 <= config.sft.noise <= 1.0, "sft.noise must be in [0, 1]"),
        (0.0 < config.sft.heldout_fraction < 1.0, "sft.heldout_fraction must be in (0, 1)"),
        (config.gopo.expert_loss in ("preference", "clipped_pg"), "gopo.expert_loss: 'preference' or 'clipped_pg'"),
        (config.gopo.aggregation in ("token-mean", "seq-mean-token-mean"),
         "gopo.aggregation: 'token-mean' or 'seq-mean-token-mean'"),
        (0.0 < config.gopo.esndcg_p <= 1.0, "gopo.esndcg_p must be in (0, 1]"),
        (config.eval.episodes >= 1, "eval.episodes must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"bad config: {msg}")


def model_fingerprint(world: World) -> dict:
    """What a checkpoint must agree with to be restored into this run."""
    return {"model_config": dataclasses.asdict(world.model_config), "env": world.spec.name,
            "layout": dataclasses.asdict(world.layout), "strategies": list(world.spec.strategies)}


def episode_metrics(traj: Trajectory, *, max_relevance: float, t_max: int, weights: BusinessWeights,
                    esndcg_p: float) -> dict[str, jax.Array]:
    """TSE, ESNDCG, R_B, alignment, SOP validity and outcome of every dialogue (pure; f32[B] each)."""
    m = traj.turn_mask
    return {
        "tse": jax.vmap(tse)(traj.gain, traj.cont, m),
        "esndcg": jax.vmap(lambda r, mm: esndcg(r, mm, p=esndcg_p, max_rel=max_relevance))(traj.rel, m),
        "gre": jax.vmap(lambda o, s, f, v, mm: business_reward(o, s, f, v, mm, t_max=t_max, weights=weights))(
            traj.outcome, traj.satisfaction, traj.fcr, traj.sop_valid, m),
        "alignment": jnp.sum(traj.aligned * m, -1) / jnp.maximum(jnp.sum(m, -1), 1),
        "sop_validity": jnp.sum(traj.sop_valid * m, -1) / jnp.maximum(jnp.sum(m, -1), 1),
        "outcome": traj.outcome,
        "turns": jnp.sum(m, -1).astype(jnp.float32),
    }


def metric_settings(config, world: World) -> dict:
    """The keyword arguments of `per_episode_metrics` for a run config and its world: R (the config's, else the
    world's), T_max, the business weights and ESNDCG's continuation probability."""
    max_rel = config.env.max_relevance if config.env.max_relevance > 0 else world.spec.max_relevance
    return {"max_relevance": float(max_rel), "t_max": world.spec.max_turns,
            "weights": BusinessWeights.from_config(config.business.to_dict()), "esndcg_p": config.gopo.esndcg_p}


def per_episode_metrics(traj: Trajectory, *, max_relevance: float, t_max: int, weights: BusinessWeights,
                        esndcg_p: float) -> dict[str, np.ndarray]:
    """`episode_metrics` as float64 host arrays (what means and intervals are taken over)."""
    out = episode_metrics(traj, max_relevance=max_relevance, t_max=t_max, weights=weights, esndcg_p=esndcg_p)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


class Run:
    """One training run; `run()` is the whole pipeline. Holds the jitted pieces so they compile once."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
        validate_config(config)
        self.config = config
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.world = build_world(config, self.workdir)
        self.mesh = parallel.make_mesh(config.mesh)
        self.hyper = hyper_from_config(config)
        w = self.world
        self.metric_kwargs = metric_settings(config, w)
        self.max_rel, self.weights = self.metric_kwargs["max_relevance"], self.metric_kwargs["weights"]
        self.expert_gd, self.cs_gd, params = init_agents(w, config.seed)
        self.strategy_ids = w.vocab.strategy_ids
        self.method = get_method(config.method, self)
        params.update(self.method.extra_params(jax.random.key(config.seed + 7)))
        self.init_params = params
        use_expert = self.method.use_expert
        train_sampling = SamplingConfig(temperature=config.sampling.temperature, top_k=config.sampling.top_k,
                                        top_p=config.sampling.top_p, sop_mask=self.hyper.sop_mask,
                                        use_expert=use_expert)
        eval_sampling = dataclasses.replace(train_sampling, temperature=0.0, expert_greedy=True)
        self.rollout = w.make_rollout(self.method.make_agents(train_sampling))
        self.eval_rollout = w.make_rollout(self.method.make_agents(eval_sampling))
        self.demo_rollout = w.make_rollout(w.demo_agents(config.sft.noise, emit_decision=use_expert,
                                                         kind=config.sft.noise_kind))
        self.reference_rollout = w.make_rollout(w.reference_agents())
        self.scores = jax.jit(lambda traj: trajectory_scores_from(traj, max_relevance=self.max_rel,
                                                                  t_max=w.spec.max_turns, weights=self.weights,
                                                                  hyper=self.hyper))
        self.reference_logps = jax.jit(lambda ref, traj: reference_log_probs(
            self, ref, traj, expert=self.hyper.needs_expert_reference and use_expert,
            cs=self.hyper.needs_cs_reference))
        self.tx = make_optimizer(self.method.learning_rates(), clip_norm=config.train.clip_norm)
        # The warm start trains the two agents only (a method's extra parameters keep their initial values), so
        # it is the same for every method and can be shared (`gopo_jax.train.warm_start`).
        self.sft_tx = make_optimizer({k: config.sft.learning_rate if k in ("expert", "cs") else 0.0 for k in params},
                                     clip_norm=config.train.clip_norm)
        # The pure losses are kept for `gopo_jax.train.seed_parallel`, which vmaps them over seeds.
        self.gopo_loss = self.method.make_loss()
        self.gopo_step = make_train_step(self.gopo_loss, self.tx, mesh=self.mesh)
        warm_start = make_warm_start_loss(self.expert_gd, self.cs_gd, w.layout, self.strategy_ids,
                                          use_expert=use_expert, sop_mask=self.hyper.sop_mask)
        self.warm_start_loss = warm_start
        self.sft_step = make_train_step(warm_start, self.sft_tx, mesh=self.mesh)
        self.sft_eval = jax.jit(lambda params, batch: warm_start(params, {}, batch, None))
        self.base_key = jax.random.key(config.seed)

    def key(self, phase: int, i: int) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(self.base_key, phase), i)

    def eval_env_keys(self):
        return self.world.eval_episodes(self.config.eval.seed, self.config.eval.episodes)

    # --- phases ------------------------------------------------------------------------------------------------
    def demonstrations(self) -> tuple[Trajectory, Trajectory]:
        """Scripted demonstrations split by episode into SFT train / held-out sets."""
        n = self.config.sft.episodes
        traj = self.demo_rollout({}, self.world.episodes(self.key(_DEMO, 0), n), self.key(_DEMO, 1))
        n_held = max(1, int(round(n * self.config.sft.heldout_fraction)))
        held = jax.tree.map(lambda x: x[:n_held], traj)
        train = jax.tree.map(lambda x: x[n_held:], traj)
        return train, held

    def evaluate(self, params) -> dict[str, np.ndarray]:
        traj = self.eval_rollout(params, self.eval_env_keys(), self.key(_EVAL, 0))
        return per_episode_metrics(traj, **self.metric_kwargs)

    def reference_eval(self) -> dict[str, np.ndarray]:
        traj = self.reference_rollout({}, self.eval_env_keys(), self.key(_EVAL, 1))
        return per_episode_metrics(traj, **self.metric_kwargs)

    def sft_batch_size(self, n_train: int) -> int:
        """sft.batch_size, at most the demonstrations, rounded down to a multiple of the mesh (even shards)."""
        bs = min(self.config.sft.batch_size, n_train)
        return bs - (bs % max(1, self.mesh.size) if bs >= self.mesh.size else 0)

    def method_state(self, ref_params) -> TrainState:
        """The method's train state, starting from the warm-start agents with a fresh optimizer. A separate copy:
        the step donates the train state's buffers, the reference must survive."""
        return parallel.shard_params(create_train_state(
            jax.tree.map(jnp.copy, ref_params), self.tx, extras=self.method.init_extras(),
            rng=self.key(_GOPO, 1_000_000)), self.mesh)

    def warm_start_cache(self) -> WarmStartCache | None:
        if not self.config.sft.cache_dir:
            return None
        fingerprint = model_fingerprint(self.world) | {"tokenizer": tokenizer_digest(self.world.tokenizer)}
        return WarmStartCache(self.config.sft.cache_dir,
                              warm_start_key(self.config, use_expert=self.method.use_expert), fingerprint)

    def checkpoint_target(self, state: TrainState, ref_params) -> dict:
        return {"state": state, "ref": ref_params, "iteration": np.zeros((), np.int64)}

    def run(self) -> dict:
        cfg = self.config
        w = self.world
        t_start = time.time()
        save_config(self.workdir, cfg)
        ckpt_dir = self.workdir / "checkpoints"
        fingerprint = model_fingerprint(w)
        total = cfg.sft.steps + (cfg.train.steps if self.method.trains else 0)
        logger = MetricsLogger(self.workdir, total_steps=total)
        state = create_train_state(jax.tree.map(jnp.copy, self.init_params), self.sft_tx,
                                   extras=self.method.init_extras(), rng=self.key(_SFT, 1_000_000))
        state = parallel.shard_params(state, self.mesh)
        ref_params = self.init_params
        iteration = 0  # global: SFT steps first, then GOPO iterations
        restored = checkpoint.restore_checkpoint(ckpt_dir, self.checkpoint_target(state, ref_params),
                                                 expected_metadata=fingerprint)
        if restored is not None:
            payload, _ = restored
            state, ref_params, iteration = payload["state"], payload["ref"], int(payload["iteration"])
            logger.truncate_after(iteration)
            _log.info("resumed from %s at iteration %d", ckpt_dir, iteration)

        reference = self.reference_eval()
        train_demo, held_demo = self.demonstrations()
        n_train = train_demo.tokens.shape[0]
        bs = self.sft_batch_size(n_train)

        def save(it: int, state, ref):
            checkpoint.save_checkpoint(ckpt_dir, it, {"state": state, "ref": ref, "iteration": np.int64(it)},
                                       metadata=fingerprint, keep=cfg.train.keep_checkpoints)

        warm_cache = self.warm_start_cache()
        with checkpoint.install_sigterm_handler() as should_stop:
            # ---- warm start ----
            if iteration == 0 and cfg.sft.steps > 0 and warm_cache is not None:
                hit = warm_cache.load({k: state.params[k] for k in _AGENTS})
                if hit is not None:
                    agents, records = hit
                    for record in records:
                        logger.log(record["step"], {k: v for k, v in record.items()
                                                    if k not in ("step", "time") and v is not None}, prefix="")
                    ref_params = {**state.params, **agents}
                    state = self.method_state(ref_params)
                    iteration = cfg.sft.steps
                    save(iteration, state, ref_params)
            while iteration < cfg.sft.steps:
                perm = jax.random.permutation(self.key(_SFT, iteration), n_train)[:bs]
                batch = parallel.shard_batch({"traj": jax.tree.map(lambda x: np.asarray(x)[np.asarray(perm)],
                                                                   train_demo)}, self.mesh)
                state, m = self.sft_step(state, batch)
                iteration += 1
                if iteration % 25 == 0 or iteration == cfg.sft.steps:
                    _, (held_m, _) = self.sft_eval(state.params, {"traj": held_demo})
                    logger.log(iteration, {k: float(v) for k, v in held_m.items()}, prefix="sft_heldout")
                logger.log(iteration, {k: float(v) for k, v in m.items()}, prefix="sft")
                if iteration == cfg.sft.steps:
                    # The SFT agents become the reference policy; GOPO starts with a fresh optimizer.
                    ref_params = jax.tree.map(jnp.copy, state.params)
                    state = self.method_state(ref_params)
                    save(iteration, state, ref_params)
                    if warm_cache is not None:
                        warm_cache.store(iteration, {k: ref_params[k] for k in _AGENTS}, logger.records(iteration))
                elif should_stop():
                    save(iteration, state, ref_params)
                    return {"stopped": True, "iteration": iteration}
            if cfg.sft.steps == 0 and iteration == 0:
                ref_params = jax.tree.map(jnp.copy, state.params)

            sft_eval = self.evaluate(self.method.acting_params(ref_params, self.method.init_extras()))
            self._log_eval(logger, cfg.sft.steps, sft_eval, reference)
            # ---- GOPO ----
            while iteration < total:
                it = iteration - cfg.sft.steps
                env_keys = w.group_episodes(self.key(_GOPO, 2 * it), cfg.train.groups, cfg.train.group_size)
                acting = self.method.acting_params(self.method.rollout_params(state.params, ref_params),
                                                   state.extras)
                traj = self.rollout(acting, env_keys, self.key(_GOPO, 2 * it + 1))
                batch = self.method.prepare_batch(traj, ref_params, state.params)
                stats = []
                for epoch in range(cfg.train.epochs):
                    perm = jax.random.permutation(self.key(_GOPO, 10_000 + it * 100 + epoch), cfg.train.groups)
                    mbs = group_minibatches(batch, perm, cfg.train.group_size, cfg.train.minibatches)
                    for j in range(cfg.train.minibatches):
                        mb = parallel.shard_batch(jax.tree.map(lambda x: x[j], mbs), self.mesh)
                        state, m = self.gopo_step(state, mb)
                        stats.append(m)
                iteration += 1
                metrics = {k: float(np.mean([float(s[k]) for s in stats])) for k in stats[0]}
                ep = per_episode_metrics(traj, **self.metric_kwargs)
                metrics.update({f"rollout_{k}": float(v.mean()) for k, v in ep.items()})
                logger.log(iteration, metrics, prefix="train")
                if (it + 1) % cfg.train.eval_every == 0 or iteration == total:
                    self._log_eval(logger, iteration,
                                   self.evaluate(self.method.acting_params(state.params, state.extras)), reference)
                if (it + 1) % cfg.train.checkpoint_every == 0 or iteration == total or should_stop():
                    save(iteration, state, ref_params)
                if should_stop() and iteration < total:
                    return {"stopped": True, "iteration": iteration}

        final_params = self.method.acting_params(state.params, state.extras)
        final = self.evaluate(final_params)
        summary = self._summary(sft_eval, final, reference, time.time() - t_start, state)
        write_summary(self.workdir, summary)
        logger.close()
        plot_curves(self.workdir, self.curve_names())
        self.write_transcripts(final_params, ref_params)
        return summary

    def curve_names(self) -> list[str]:
        """The metrics drawn into curves.png."""
        curves = ["tse", "gre", "esndcg", "alignment"]
        if self.method.trains:
            curves += ["expert_kl_ref", "cs_kl_ref", "mu"]
        return curves

    def write_transcripts(self, final_params, ref_params, num: int = 4) -> None:
        """samples.md: the same held-out customers served by the SFT agents and by the trained agents; and the
        trained agents' turns with the first `eval.judge_dialogues` customers as G-Eval samples."""
        episodes = self.eval_env_keys()[:max(num, self.config.eval.judge_dialogues)]
        trajs = [(name, self.eval_rollout(params, episodes, self.key(_EVAL, 0)))
                 for name, params in (("sft", self.method.acting_params(ref_params, self.method.init_extras())),
                                      (self.method.name, final_params))]
        write_samples(self.workdir, self.world, trajs, min(num, len(episodes)))
        write_judge_samples(self.workdir, self.world, trajs[-1][1], self.config.eval.judge_dialogues)

    def _log_eval(self, logger, iteration, ep, reference):
        m = {k: float(v.mean()) for k, v in ep.items()}
        m["ntse"] = float(ep["tse"].mean() / max(reference["tse"].mean(), 1e-9))
        logger.log(iteration, m, prefix="eval")

    def _summary(self, sft, final, reference, wall, state) -> dict:
        return {
            "env": self.world.spec.name, "method": self.config.method,
            "eval_episodes": int(self.config.eval.episodes),
            "reference": summary_block(reference, reference), "sft": summary_block(sft, reference),
            self.method.name: summary_block(final, reference),
            f"{self.method.name}_minus_sft": {k: paired_difference(final[k], sft[k])
                                              for k in ("tse", "gre", "esndcg", "alignment")},
            "wall_seconds": wall,
            "final_params_sha256": params_hash(state.params),
        }


def write_samples(workdir: pathlib.Path, world: World, trajs: list[tuple[str, Trajectory]], num: int) -> None:
    """samples.md: the first `num` dialogues of each (name, batch), rendered as text."""
    parts = []
    for name, traj in trajs:
        parts.append(f"## {name}\n")
        for i in range(num):
            parts.append("```\n" + render_dialogue(traj, i, tokenizer=world.tokenizer, layout=world.layout,
                                                    strategies=world.spec.strategies) + "\n```\n")
    (pathlib.Path(workdir) / "samples.md").write_text("\n".join(parts))


def write_judge_samples(workdir: pathlib.Path, world: World, traj: Trajectory, dialogues: int) -> None:
    """judge_samples.jsonl: the agent turns of the first `dialogues` dialogues as G-Eval samples (one JSON object
    per line: episode, turn, context, response, strategy), read by the comparison's judge."""
    samples = judge_samples(traj, range(min(dialogues, traj.tokens.shape[0])), tokenizer=world.tokenizer,
                            layout=world.layout, strategies=world.spec.strategies,
                            descriptions=world.spec.strategy_descriptions)
    (pathlib.Path(workdir) / JUDGE_SAMPLES).write_text("".join(json.dumps(s) + "\n" for s in samples))


def summary_block(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Mean and 95% interval of every per-episode metric, and TSE normalised by the reference policy's."""
    d = {k: mean_ci(v) for k, v in ep.items()}
    d["ntse"] = float(ep["tse"].mean() / max(reference["tse"].mean(), 1e-9))
    return d


def group_minibatches(batch, perm, group_size: int, num: int):
    """[B, ...] -> [num, B / num, ...] minibatches of whole groups (a group's rows stay contiguous), with the
    groups shuffled by `perm`."""
    # Host indices for the run loop; traced ones inside the seed-parallel pipeline (gopo_jax.train.seed_parallel).
    xp = jnp if isinstance(perm, jax.core.Tracer) else np
    perm = xp.asarray(perm)
    per_mb = perm.reshape(perm.shape[0] // num, num).T  # minibatch k: groups perm[k], perm[k + num], ...
    rows = (per_mb[..., None] * group_size + xp.arange(group_size)).reshape(num, -1)
    return jax.tree.map(lambda x: x[rows], batch)


def params_hash(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def train(config, workdir) -> dict:
    if config.method == "prompted":  # nothing to train: a chat model behind an endpoint serves the held-out customers
        from gopo_jax.clients.prompted_eval import evaluate_prompted  # noqa: PLC0415
        return evaluate_prompted(config, workdir)
    return Run(config, workdir).run()
