"""Helpers shared by several test files. They live here rather than in conftest.py (which pytest loads itself and
test files should not import) or in one test file (importing it would collect its tests' module twice over)."""
import json


def tiny_run_config():
    """The embedded-default config shrunk to a 1-layer, 32-wide model: what every pipeline test builds on."""
    from configs.mgshop import get_config

    c = get_config()
    c.unlock()
    c.model.hidden_size = 32
    c.model.num_layers = 1
    c.model.intermediate_size = 64
    c.lock()
    return c


def tiny_method_config(method: str):
    """The embedded-default config of `method` (GOPO or a baseline) at its smallest end-to-end run: SFT warm start,
    one iteration of rollout + updates, evaluation; ~30-60 s on 2 cores."""
    from configs import mgshop
    from configs.baselines import add_baseline_config

    c = mgshop.get_config()
    with c.unlocked():
        add_baseline_config(c)
        c.method = method
        c.sft.steps, c.sft.episodes, c.sft.batch_size = 2, 16, 8
        # 8 rows: one per fake device of the data axis.
        c.train.steps, c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 1, 2, 4, 1, 2
        c.eval.episodes = 4
        c.model.hidden_size, c.model.intermediate_size, c.model.num_layers = 32, 64, 1
        c.baselines.ppo.value_layers = 1
        c.baselines.memento.bank_size = 64
    return c


def fake_train(cfg, workdir):
    """Stands in for training a sweep run: TSE = β_pref/10 + seed/100 (hand-checkable), two eval points."""
    tse = cfg.gopo.beta_pref / 10 + cfg.seed / 100
    block = {k: {"mean": tse, "lo": tse, "hi": tse, "n": 4} for k in ("tse", "gre", "esndcg", "alignment",
                                                                        "sop_validity", "outcome", "turns")}
    block["ntse"] = tse
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps({"env": "synthetic_shop", "method": "gopo",
                                                      "eval_episodes": 4, "reference": block, "gopo": block}))
    lines = [{"step": cfg.sft.steps + i, "eval/tse": tse * i} for i in (0, 1)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {}


def world_and_agents(config, workdir):
    """(world, expert graphdef, cs graphdef, seed-0 agent params) of `config`, built the way a run builds them."""
    from gopo_jax.train.build import agent_graphdefs, init_agent_params  # noqa: PLC0415
    from gopo_jax.train.world import build_world, pretrained_sources  # noqa: PLC0415

    world = build_world(config, workdir)
    return (world, *agent_graphdefs(world), init_agent_params(world, 0, pretrained_sources(config)))


def checkpointed_run(config, workdir, edit_params=lambda params: params):
    """A run's files without training: config, tokenizer and the method's initial state (its agents' parameters
    passed through `edit_params`) as its one checkpoint."""
    import numpy as np  # noqa: PLC0415

    from gopo_jax.train import checkpoint  # noqa: PLC0415
    from gopo_jax.train.build import build
    from gopo_jax.train.metrics_log import save_config
    from gopo_jax.train.phases import Phases

    components = build(config, workdir)
    params = edit_params(components.init_params(config.seed))
    phases = Phases(components)
    state = phases.method_state(params, components.method.init_extras(), config.seed)
    save_config(workdir, config)
    checkpoint.save_checkpoint(workdir / "checkpoints", 0, {"state": state, "ref": phases.kept_reference(params),
                                                            "iteration": np.int64(0)},
                               metadata=components.fingerprint())
    return workdir
