"""The comparison of GOPO against its baselines and ablations (GOPO.md §4): methods × environments × seeds.

Every run is the environment's own run config (`env_configs`) plus overrides, in this order: the environment's
short-training overrides (`env_overrides`), `tiny` when `--config.quick=True` (tests), the method's overrides,
`seed=<s>`. Overrides are written with the run config's flattened keys (`configs.overrides`), e.g.
{"gopo.use_expert": False, "train.steps": 5}, and each is a command-line flag of this config
(`--config.variants.gopo_no_ea.gopo.use_expert=True`); a key the run config lacks, or a value of the wrong type, is
an error naming the key. A method name without an entry in `variants` means `method=<name>`. Runs of one seed
whose warm starts are equal share one (`share_warm_starts`).

    python -m experiments.compare --config configs/compare.py --workdir runs/compare   # the three worlds
    python -m experiments.compare --config configs/compare.py --config.environments=synthetic_shop --workdir ...
    python -m experiments.compare --config configs/compare.py --config.quick=True --workdir /tmp/cmp   # tests

Figure 3 (GOPO convergence under parameter settings) adds `convergence` runs of GOPO on the first environment
with `convergence_seeds` seeds; the GOPO runs of the comparison are its "default" line.
"""
import ml_collections

from configs import overrides, tuning

# SHORT training for the embedded default on 2 CPU cores: the run config's agents and warm start (300 SFT steps),
# 20 GOPO iterations instead of 40, 128 held-out customers. Shorter training (8 iterations of 8 × 4 dialogues on
# 1-layer agents) was tried and moved no method measurably away from its warm start, so it compared nothing.
SHORT = {"train.steps": 20, "train.eval_every": 5, "train.checkpoint_every": 5, "eval.episodes": 128}
# SHORT for the host (real-data) worlds: their configs/host_short.py runs (2-layer 64-wide agents, 60 warm-start
# steps, groups of 4 × 4 dialogues) with dialogues cut at 6 turns (the buffer length drives the cost of every forward
# pass), 12 iterations instead of 4, and 32 held-out customers. 4 iterations moved no method from its warm start; 8
# moved GOPO on MG-ShopDial measurably (alignment 0.28 -> 0.79, GRE 0.231 [0.215, 0.250] -> 0.292 [0.278, 0.305],
# TSE 0.142 -> 0.147; 608 s on 2 shared cores, 2026-12-02, on the earlier 50/8/6 split). Smaller agents (1 layer,
# 32 wide) were tried: their warm start completed no MultiWOZ task at all, so every method sat at TSE 0 and the table
# compared nothing.
HOST_SHORT = {"layout.max_turns": 6, "eval.episodes": 32, "train.steps": 12, "train.eval_every": 6,
              "train.checkpoint_every": 3}
# MultiWOZ and TmallBrand sample their training dialogues at temperature 0.7 (every method alike; evaluation stays
# greedy). At 1.0 their warm-started CS completed almost no task in training: the sampled dialogues of the first 3
# iterations had TSE 0.040-0.053 (MultiWOZ) and 0.012-0.028 (TmallBrand), method means over 3 seeds, against greedy
# SFT starts of 0.10-0.18 and 0.11-0.14 (MG-ShopDial: 0.11 sampled, 0.12-0.17 greedy). Nearly every group's
# rewards were failures, and GOPO, GRPO and PPO ended significantly below their SFT starts on both worlds (PPO's
# greedy MultiWOZ policy repeated one strategy). At 0.7 the same measure is 0.112-0.132 and 0.070-0.090
# (train/rollout_tse of the first 3 iterations in the metrics.jsonl of the 2026-12-03 runs, host-tuned settings).
HOST_EXPLORATION = {"sampling.temperature": 0.7}

# The test-sized variant: seconds of training, enough to exercise every file the driver writes.
TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "sft.episodes": 16,
        "sft.steps": 2, "sft.batch_size": 8, "train.steps": 2, "train.groups": 4, "train.group_size": 2,
        "train.epochs": 1, "train.minibatches": 1, "train.eval_every": 1, "train.checkpoint_every": 1,
        "eval.episodes": 8}


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.quick = False  # True: `tiny` after the environment's overrides (tests)
    c.tiny = overrides(TINY)
    c.share_warm_starts = True  # one SFT phase per (environment, seed, with/without Expert), in <workdir>/warm_starts
    c.seeds = 5  # seeds 0 .. seeds-1 per method and environment, evaluated on the test customers
    # Equal tuning (configs/tuning.py): each grid's settings on seeds 0 .. tuning_seeds-1, scored on the validation
    # customers by `selection_metric` (higher is better); 0 runs every method at its grid's first setting.
    c.tuning_seeds = 2
    # The environments that tune when compared ("" = every compared one); a compared environment outside them runs
    # the setting selected on the first of these, which then tunes even when it is not compared. The host worlds'
    # Python turn loops make a host run cost many shop runs: a 12-iteration MG-ShopDial RL run takes 4-16 min on a core
    # (2.48 h summed for its 18 comparison runs, 2026-12-03), so its grid (5 × 4 × 2 runs) was not affordable here and
    # it runs the shop's selection; MultiWOZ and TmallBrand runs take about 1 min, so they tune their own grids (0.56 h
    # and 0.51 h of summed training, 2026-12-03).
    c.tuning_environments = "synthetic_shop,multiwoz,tmallbrand"
    c.selection_metric = "tse"
    c.grids = tuning.grids()
    # The seeds of one setting train together, vmapped in one process (gopo_jax.train.driver.train_seeds), where the
    # world is pure JAX; host worlds train them one after another.
    c.vmap_seeds = True
    c.methods = ("gopo,sft,grpo,ppo,dpo,memento,"
                 "gopo_no_ea,gopo_no_esndcg,gopo_no_sop_mask,gopo_no_constraint,gopo_clipped_pg")
    c.gopo_label = "gopo"  # the method the relative differences are taken against
    # Labels that are not a plain `method=<name>`: ablations and named variants.
    c.variants = ml_collections.ConfigDict()
    c.variants.gopo_no_ea = overrides({"method": "gopo", "gopo.use_expert": False})
    c.variants.gopo_no_esndcg = overrides({"method": "gopo", "gopo.use_esndcg": False})
    c.variants.gopo_no_sop_mask = overrides({"method": "gopo", "gopo.sop_mask": False})
    c.variants.gopo_no_constraint = overrides({"method": "gopo", "gopo.constraint": False})
    c.variants.gopo_clipped_pg = overrides({"method": "gopo", "gopo.expert_loss": "clipped_pg"})
    # A prompted chat model as the CS (host worlds): add `prompted` to `methods` and point it at an endpoint, e.g.
    # --config.variants.prompted.baselines.prompted.base_url=http://127.0.0.1:8000
    # --config.variants.prompted.baselines.prompted.model=NAME
    c.variants.prompted = overrides({"method": "prompted", "baselines.prompted.base_url": "",
                                     "baselines.prompted.model": ""})
    c.environments = "synthetic_shop,mg_shopdial,multiwoz,tmallbrand"
    # The labels of `methods` compared per environment where not all of them. The host worlds compare GOPO with SFT
    # and the baselines of GOPO.md §4; the ablations run on the synthetic shop, where a run is cheap enough for 5
    # seeds of each. All 11 labels × 3 seeds × 3 host worlds would be 99 host runs, ~20 h of a core here.
    host_methods = "gopo,sft,grpo,ppo,dpo,memento"
    c.env_methods = ml_collections.ConfigDict({"mg_shopdial": host_methods, "multiwoz": host_methods,
                                               "tmallbrand": host_methods})
    # Seeds per environment where not `seeds` (the host worlds' Python turn loops cost far more per run).
    c.env_seeds = ml_collections.ConfigDict({"mg_shopdial": 3, "multiwoz": 3, "tmallbrand": 3})
    # The run config of each environment (a path relative to the current directory, or configs/<name> of the
    # installed configs package) ...
    c.env_configs = ml_collections.ConfigDict()
    c.env_configs.synthetic_shop = "configs/mgshop.py"
    c.env_configs.mg_shopdial = "configs/mgshop_real.py"
    c.env_configs.multiwoz = "configs/multiwoz.py"
    c.env_configs.tmallbrand = "configs/tmallbrand.py"
    # ... and its short-training overrides (data-backed worlds read their folder under ../shared/data; a relative
    # env.data_dir is taken from the directory that holds the configs package, the repository root of a checkout).
    c.env_overrides = ml_collections.ConfigDict()
    c.env_overrides.synthetic_shop = overrides(SHORT)
    # MG-ShopDial's 14 test customers are 14 fixed conversations and evaluation is greedy, so 14 episodes measure
    # each once (32 would weight them unequally and repeat identical dialogues).
    c.env_overrides.mg_shopdial = overrides(HOST_SHORT | {"eval.episodes": 14,
                                                          "env.data_dir": "../shared/data/mgshopdial"})
    c.env_overrides.multiwoz = overrides(HOST_SHORT | HOST_EXPLORATION | {"env.max_turns": 6,
                                                                          "env.data_dir": "../shared/data/multiwoz"})
    c.env_overrides.tmallbrand = overrides(HOST_SHORT | HOST_EXPLORATION | {"env.data_dir": "../shared/data/abcd"})
    # Figure 3: GOPO settings (label -> overrides) run on the first environment; --config.convergence_seeds=0 runs
    # none of them.
    c.convergence = ml_collections.ConfigDict()
    c.convergence.beta_pref_0p2 = overrides({"gopo.beta_pref": 0.2})
    c.convergence.lambda_b_0 = overrides({"gopo.lambda_b": 0.0})
    c.convergence_seeds = 1
    # G-Eval judge of the runs' held-out turns (gopo_jax.metrics.geval.make_judge): "none" reports G-Eval as absent;
    # "endpoint" (an OpenAI-compatible server: endpoint_url, endpoint_model, its key read from the environment
    # variable api_key_env) or "causal_lm"
    # (model_path: a local Hugging Face Qwen3 folder). A toy judge's numbers mean nothing: use a capable model.
    c.geval = ml_collections.ConfigDict()
    c.geval.judge = "none"
    c.geval.endpoint_url = ""
    c.geval.endpoint_model = ""
    c.geval.api_key_env = "OPENAI_API_KEY"
    c.geval.use_logprobs = True
    c.geval.top_logprobs = 20  # alternatives asked per score token (OpenAI allows up to 20)
    c.geval.n_samples = 5
    c.geval.timeout = 60.0  # seconds per attempt
    c.geval.max_retries = 4  # the openai SDK's retries of 408/409/429/5xx, connection errors and timeouts
    c.geval.max_concurrency = 8  # judge prompts in flight at once
    c.geval.model_path = ""
    c.geval.criteria = "fluency,coherence,strategy_faithfulness,helpfulness"
    c.lock()
    return c
