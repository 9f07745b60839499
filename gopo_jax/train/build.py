"""`build(config, workdir)`: everything a run is made of, built once and frozen.

The world (environment, tokenizer, layout, agent vocabulary), the device mesh, the agents' graph definitions, the
method's bundle of pure functions, the optimizers, the rollouts and the metric settings. Nothing here trains and
nothing holds state: the drivers (`gopo_jax.train.driver`) and the server read these components, and the pure
phase functions (`gopo_jax.train.phases`) are built from them. Initial parameters are a function of the seed
(`init_params`), so the seeds of a vmapped group share one `Components`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gopo_jax import parallel
from gopo_jax.algorithms.gopo import GOPOHyper
from gopo_jax.algorithms.sft import make_warm_start_loss
from gopo_jax.dialogue.rollout import SamplingConfig
from gopo_jax.envs import customers
from gopo_jax.metrics.episode import EpisodeMetricSettings
from gopo_jax.models.heads import SamplingDist
from gopo_jax.models import hf_io, markers, qwen3
from gopo_jax.train import schedule
from gopo_jax.train.methods import Method, MethodContext, make_method
from gopo_jax.train.schedule import Schedule
from gopo_jax.train.step import LossFn, make_optimizer
from gopo_jax.train.world import World, build_world, lora_agents, pretrained_sources

_AGENTS = ("expert", "cs")  # the parameters the warm start trains


def expert_temperature(config) -> float:
    """sampling.expert_temperature; a run's config.json written before the key: 1."""
    return float(config.sampling.get("expert_temperature", 1.0))


def hyper_from_config(config) -> GOPOHyper:
    """The losses' hyper-parameters; they include the rollout's sampling, whose distributions the losses score."""
    g, s = config.gopo, config.sampling
    return GOPOHyper(group_size=config.train.group_size, expert_loss=g.expert_loss, beta_pref=g.beta_pref,
                     pref_margin=g.pref_margin, expert_reference=g.expert_reference, beta_expert=g.beta_expert,
                     clip_eps=g.clip_eps, lambda_b=g.lambda_b, lambda_s=g.lambda_s, alpha=g.alpha, beta_cs=g.beta_cs,
                     kl_clamp=g.kl_clamp, aggregation=g.aggregation, constraint=g.constraint, mu_lr=g.mu_lr,
                     delta=g.delta, use_esndcg=g.use_esndcg, esndcg_p=g.esndcg_p, sop_mask=g.sop_mask,
                     use_expert=g.use_expert, cs_sampling=SamplingDist(temperature=s.temperature, top_k=s.top_k,
                                                                       top_p=s.top_p),
                     expert_temperature=expert_temperature(config))


def demo_split(config) -> tuple[int, int]:
    """(train, held-out) numbers of demonstrations: the first `sft.heldout_fraction` of the episodes are held out."""
    n_held = max(1, round(config.sft.episodes * config.sft.heldout_fraction))
    return config.sft.episodes - n_held, n_held


def validate_config(config) -> None:
    """Bad values fail before anything is built, each with the key and the fix."""
    t = config.train
    checks = [
        (t.steps >= 0, "train.steps must be >= 0"),
        (t.groups >= 1 and t.group_size >= 2, "train.groups >= 1 and train.group_size >= 2 (a group needs pairs)"),
        ((t.groups * t.group_size) % t.minibatches == 0 and t.groups % t.minibatches == 0,
         "train.groups must be a multiple of train.minibatches (minibatches hold whole groups)"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.eval_every >= 1 and t.checkpoint_every >= 1, "train.eval_every and train.checkpoint_every must be >= 1"),
        # .get: the config.json of a run written before the key has none, and serving that run builds from it.
        (t.get("max_nonfinite_updates", 0) >= 0,
         "train.max_nonfinite_updates must be >= 0 (consecutive skipped updates before the run stops; 0: never)"),
        # The key schedule folds 10_000 + iteration·100 + epoch for the minibatch shuffles (kept as it is so that
        # existing runs resume bitwise); beyond these bounds two draws would share a key.
        (t.epochs <= 100 and t.steps < 5_000,
         "train.epochs must be <= 100 and train.steps < 5000 (the key schedule of gopo_jax.train.schedule gives "
         "every shuffle its own key up to there)"),
        (config.sft.steps >= 0 and config.sft.batch_size >= 1, "sft.steps >= 0 and sft.batch_size >= 1"),
        (config.sft.source in ("rollout", "logged"),
         "sft.source: 'rollout' (the world's demonstrator) or 'logged' (its logged human dialogues)"),
        (0.0 <= config.sft.noise <= 1.0, "sft.noise must be in [0, 1]"),
        (0.0 < config.sft.heldout_fraction < 1.0, "sft.heldout_fraction must be in (0, 1)"),
        (config.sft.steps == 0 or (config.sft.episodes >= 1 and demo_split(config)[0] >= 1),
         "sft.episodes and sft.heldout_fraction leave no demonstration to train on; raise sft.episodes or lower "
         "sft.heldout_fraction"),
        (config.gopo.expert_loss in ("preference", "clipped_pg"), "gopo.expert_loss: 'preference' or 'clipped_pg'"),
        (config.gopo.aggregation in ("token-mean", "seq-mean-token-mean"),
         "gopo.aggregation: 'token-mean' or 'seq-mean-token-mean'"),
        (0.0 < config.gopo.esndcg_p <= 1.0, "gopo.esndcg_p must be in (0, 1]"),
        (config.eval.episodes >= 1, "eval.episodes must be >= 1"),
        # .get: a run's config.json written before the key evaluated the test customers.
        (config.eval.get("split", "test") in customers.EVAL_SPLITS,
         "eval.split: 'validation' (tune methods on these held-out customers) or 'test' (report these)"),
        (config.eval.seed >= 0, "eval.seed must be >= 0 (the first held-out customer of eval.split)"),
        *_range_checks(config),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"bad config: {msg}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_at_least(value, low: float, *, open_low: bool = False) -> bool:
    return math.isfinite(value) and (value > low if open_low else value >= low)


def _range_checks(config) -> list[tuple[bool, str]]:
    """Values the trainer would take silently (a negative temperature samples at 1, a negative learning rate or clip
    norm ascends, top_p > 1 filters nothing) or reject only once the world is built."""
    t, s, g, m = config.train, config.sampling, config.gopo, config.model
    layout = (config.layout.context_len, config.layout.customer_len, config.layout.reply_len, config.layout.max_turns)
    sizes = (m.hidden_size, m.num_layers, m.intermediate_size, m.vocab_size)
    # .get: keys a run's config.json may lack when it was written before they existed.
    lora = m.get("lora") or {"rank": 0, "alpha": 1.0}
    return [
        (_finite_at_least(s.temperature, 0.0), "sampling.temperature must be a finite number >= 0 (0: greedy)"),
        (s.top_k >= 0, "sampling.top_k must be >= 0 (0: no top-k filter)"),
        (0.0 < s.top_p <= 1.0, "sampling.top_p must be in (0, 1] (1: no nucleus filter)"),
        (_finite_at_least(expert_temperature(config), 0.0, open_low=True),
         "sampling.expert_temperature must be a finite number > 0"),
        (all(_finite_at_least(lr, 0.0) for lr in (t.lr_expert, t.lr_cs, config.sft.learning_rate)),
         "train.lr_expert, train.lr_cs and sft.learning_rate must be finite numbers >= 0"),
        (_finite_at_least(t.clip_norm, 0.0, open_low=True),
         "train.clip_norm must be a finite number > 0 (the global gradient norm an update is clipped to)"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (config.eval.get("judge_dialogues", 0) >= 0, "eval.judge_dialogues must be >= 0"),
        (_is_int(n_candidates := config.eval.get("n_candidates", 1)) and n_candidates >= 1,
         "eval.n_candidates must be an int >= 1 (1: no deployment-time filter)"),
        (_finite_at_least(config.eval.get("candidate_temperature", 0.7), 0.0, open_low=True),
         "eval.candidate_temperature must be a finite number > 0 (the draws of filter candidates 1..n-1)"),
        (all(n >= 1 for n in layout),
         "layout.context_len, layout.customer_len, layout.reply_len and layout.max_turns must be >= 1"),
        (all(n == -1 or n >= 1 for n in sizes),
         "model.hidden_size, model.num_layers, model.intermediate_size and model.vocab_size must be -1 (the "
         "preset's) or >= 1"),
        (lora["rank"] >= 0 and _finite_at_least(lora["alpha"], 0.0, open_low=True),
         "model.lora.rank must be >= 0 (0: full fine-tune) and model.lora.alpha a finite number > 0"),
        (all(n == -1 or n >= 1 for n in (config.env.max_relevance, config.env.max_turns)),
         "env.max_relevance and env.max_turns must be -1 (the environment's own) or >= 1"),
        (_finite_at_least(g.clip_eps, 0.0, open_low=True) and _finite_at_least(g.kl_clamp, 0.0, open_low=True),
         "gopo.clip_eps and gopo.kl_clamp must be finite numbers > 0"),
        (_finite_at_least(g.beta_pref, 0.0, open_low=True), "gopo.beta_pref must be a finite number > 0"),
        (all(_finite_at_least(b, 0.0) for b in (g.beta_expert, g.beta_cs, g.mu_lr)),
         "gopo.beta_expert, gopo.beta_cs and gopo.mu_lr must be finite numbers >= 0 (0: off)"),
    ]


def eval_sampling_filter(config) -> tuple[int, float]:
    """(eval.n_candidates, eval.candidate_temperature); a run's config.json written before the keys: (1, 0.7)."""
    return int(config.eval.get("n_candidates", 1)), float(config.eval.get("candidate_temperature", 0.7))


def model_fingerprint(world: World) -> dict:
    """What a checkpoint must agree with to be restored into a run of this world, as its JSON metadata reads back
    (tuples such as `lora_targets` become lists)."""
    return json.loads(json.dumps({"model_config": dataclasses.asdict(world.model_config),
                                  "expert_config": dataclasses.asdict(world.expert_config), "env": world.spec.name,
                                  "layout": dataclasses.asdict(world.layout),
                                  "strategies": list(world.spec.strategies)}))


def _graphdef(model_config: qwen3.Qwen3Config):
    return nnx.split(nnx.eval_shape(lambda: qwen3.Qwen3(model_config, rngs=nnx.Rngs(0))), nnx.Param)[0]


def agent_graphdefs(world: World) -> tuple[Any, Any]:
    """(Expert, CS) graph definitions; independent of the initialisation, so taken from abstract models."""
    expert = _graphdef(world.expert_config)
    return expert, (expert if world.model_config == world.expert_config else _graphdef(world.model_config))


# Qwen3Config fields a run sets on top of a checkpoint's architecture (`world._agent_config`); vocab_size and
# max_position_embeddings follow the markers and the layout, and dtypes go through from_pretrained's own arguments.
_RUN_FIELDS = ("remat", "scan_unroll", "attention", "logits_chunk", "lora_rank", "lora_alpha", "lora_targets")


def init_agent_params(world: World, seed: int, sources: dict[str, str] | None = None, mesh=None) -> dict:
    """{"expert", "cs"}: each agent from its Hugging Face folder in `sources` (`world.pretrained_sources`; the same
    weights for every seed, loaded straight onto `mesh`, marker rows set to the mean row, LoRA adapters drawn from
    the agent's seed) or randomly initialised from its config (seeds `seed` and `seed + 1`)."""
    sources = sources or {}
    params = {}
    for i, agent in enumerate(_AGENTS):
        cfg = world.agent_config(agent)
        if sources.get(agent):
            # The checkpoint's architecture with the run's own fields; the markers' rows are added after loading
            # (their ids may lie past the checkpoint's rows), then their trainable deltas.
            own = {f: getattr(cfg, f) for f in _RUN_FIELDS}
            model = hf_io.from_pretrained(sources[agent], mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                          config_overrides=own, adapter_key=jax.random.key(seed + i))
            model = markers.grow_embeddings(model, cfg.vocab_size, world.new_marker_rows)
            params[agent] = _with_zero_leaves(nnx.split(model, nnx.Param)[1], cfg, mesh)
        else:
            params[agent] = nnx.split(qwen3.Qwen3(cfg, rngs=nnx.Rngs(seed + i)), nnx.Param)[1]
    return params


def _with_zero_leaves(state, cfg: qwen3.Qwen3Config, mesh):
    """`state` completed to `cfg`'s parameters: what it lacks (the marker rows' trainable deltas, zero at start)
    as zeros, placed by their partition annotation."""
    with (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
        abstract = nnx.state(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    have = dict(nnx.to_flat_state(state))
    specs = dict(nnx.to_flat_state(nnx.get_partition_spec(abstract)))
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path in have:
            flat.append((path, have[path]))
            continue
        zeros = jnp.zeros(var.shape, var.dtype)
        if mesh is not None:
            zeros = jax.device_put(zeros, jax.sharding.NamedSharding(mesh, specs[path].get_value()))
        flat.append((path, var.replace(zeros)))
    return nnx.from_flat_state(flat)


@dataclasses.dataclass(frozen=True)
class Components:
    """What a run is made of (see the module docstring). `rollout`, `eval_rollout`, `demo_rollout` and
    `reference_rollout` are `(params, episodes, agent_key) -> Trajectory`: pure (traceable) on a pure-JAX world,
    a Python turn loop around the jitted agents on a host world."""

    config: Any
    world: World
    mesh: Any
    hyper: GOPOHyper
    metric_settings: EpisodeMetricSettings
    method: Method
    schedule: Schedule
    expert_gd: Any
    cs_gd: Any
    tx: optax.GradientTransformation  # the method's optimizer
    sft_tx: optax.GradientTransformation  # the warm start's: moves the two agents only
    warm_start_loss: LossFn
    rollout: Any
    eval_rollout: Any
    eval_sampling: Any  # SamplingConfig of eval_rollout (greedy; the n-candidate filter as configured)
    demo_rollout: Any
    reference_rollout: Any
    lora_agents: tuple[str, ...] = ()  # agents that train LoRA adapters only (`world.lora_agents`)

    @property
    def pure_world(self) -> bool:
        """The whole rollout is traced JAX (one jit, vmappable over seeds)."""
        return self.world.kind == "jax"

    def init_params(self, seed: int) -> dict:
        """The agents and the method's extra parameters at initialisation, for `seed`."""
        params = init_agent_params(self.world, seed, pretrained_sources(self.config), self.mesh)
        params.update(self.method.init_extra_params(schedule.extra_params_key(seed)))
        return params

    def eval_episodes(self):
        return self.world.eval_episodes(self.config.eval.seed, self.config.eval.episodes,
                                        self.config.eval.get("split", "test"))

    def sft_batch_size(self, n_train: int) -> int:
        """sft.batch_size, at most the demonstrations, rounded down to a multiple of the mesh (even shards)."""
        bs = min(self.config.sft.batch_size, n_train)
        return bs - (bs % max(1, self.mesh.size) if bs >= self.mesh.size else 0)

    def fingerprint(self) -> dict:
        return model_fingerprint(self.world)


def build(config, workdir: str | pathlib.Path | None) -> Components:
    """Validates `config` and builds the run's components; the tokenizer is kept in `workdir/tokenizer`."""
    validate_config(config)
    world = build_world(config, workdir)
    if eval_sampling_filter(config)[0] > 1 and world.kind != "jax":
        raise ValueError(f"bad config: eval.n_candidates > 1 (the deployment-time filter) needs a pure-JAX world "
                         f"such as synthetic_shop; {world.spec.name} realises replies on the host: set it to 1")
    hyper = hyper_from_config(config)
    settings = EpisodeMetricSettings.from_config(config, spec_max_relevance=world.spec.max_relevance,
                                                 t_max=world.spec.max_turns)
    expert_gd, cs_gd = agent_graphdefs(world)
    method = make_method(config.method, MethodContext(config=config, world=world, expert_gd=expert_gd, cs_gd=cs_gd,
                                                      hyper=hyper, metric_settings=settings))
    # From the hyper-parameters: the losses score exactly the distributions the rollout samples from.
    train_sampling = SamplingConfig(temperature=hyper.cs_sampling.temperature, top_k=hyper.cs_sampling.top_k,
                                    top_p=hyper.cs_sampling.top_p, expert_temperature=hyper.expert_temperature,
                                    sop_mask=hyper.sop_mask, use_expert=method.use_expert)
    n_candidates, candidate_temperature = eval_sampling_filter(config)
    eval_sampling = dataclasses.replace(train_sampling, temperature=0.0, expert_greedy=True,
                                        n_candidates=n_candidates, candidate_temperature=candidate_temperature)
    lrs = dict(method.learning_rates)
    lora_groups = lora_agents(config)
    # The warm start trains the two agents only (a method's extra parameters keep their initial values), so it is
    # the same for every method and can be shared (`gopo_jax.train.warm_start`).
    sft_lrs = {k: (config.sft.learning_rate if k in _AGENTS else 0.0) for k in lrs}
    return Components(
        config=config, world=world, mesh=parallel.make_mesh(config.mesh), hyper=hyper, metric_settings=settings,
        method=method, schedule=Schedule.from_config(config, trains=method.trains),
        expert_gd=expert_gd, cs_gd=cs_gd,
        tx=make_optimizer(lrs, clip_norm=config.train.clip_norm, lora_groups=lora_groups),
        sft_tx=make_optimizer(sft_lrs, clip_norm=config.train.clip_norm, lora_groups=lora_groups),
        warm_start_loss=make_warm_start_loss(expert_gd, cs_gd, world.layout, world.vocab.strategy_ids,
                                             use_expert=method.use_expert, sop_mask=hyper.sop_mask),
        rollout=world.make_rollout(method.make_agents(train_sampling)),
        eval_rollout=world.make_rollout(method.make_agents(eval_sampling)), eval_sampling=eval_sampling,
        demo_rollout=world.demo_rollout(config, emit_decision=method.use_expert),
        reference_rollout=world.make_rollout(world.reference_agents()),
        lora_agents=lora_groups,
    )


def agent_params(params: dict) -> dict:
    """The two agents of a params dict (what the warm start trains and its cache stores)."""
    return {k: params[k] for k in _AGENTS}
