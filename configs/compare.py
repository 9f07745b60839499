"""The comparison of GOPO against its baselines and ablations (GOPO.md §4): methods × environments × seeds.

Every run is `configs/mgshop.py` plus overrides, in this order: `short` (or `tiny` with `--config.quick=True`),
the environment's overrides, the method's overrides, `seed=<s>`. Overrides are comma-separated `key=value`
strings with dotted keys of the run config, e.g. "gopo.use_expert=False,train.steps=5"; a key the run config
lacks is an error. A method name without an entry in `variants` means `method=<name>`.

    python -m experiments.compare --config configs/compare.py --workdir runs/compare
    python -m experiments.compare --config configs/compare.py --config.quick=True --workdir /tmp/cmp   # tests

Figure 3 (GOPO convergence under parameter settings) adds `convergence` runs of GOPO on the first environment
with `convergence_seeds` seeds; the GOPO runs of the comparison are its "default" line.
"""
import ml_collections

# SHORT training for the embedded default on 2 CPU cores: tiny models, a short warm start, a few GOPO iterations.
SHORT = ("model.hidden_size=32,model.intermediate_size=64,model.num_layers=1,sft.episodes=256,sft.steps=150,"
         "sft.batch_size=32,train.steps=8,train.groups=8,train.group_size=4,train.epochs=1,train.minibatches=1,"
         "train.eval_every=2,train.checkpoint_every=4,eval.episodes=64")
# The test-sized variant: seconds of training, enough to exercise every file the driver writes.
TINY = ("model.hidden_size=32,model.intermediate_size=64,model.num_layers=1,sft.episodes=16,sft.steps=2,"
        "sft.batch_size=8,train.steps=2,train.groups=4,train.group_size=2,train.epochs=1,train.minibatches=1,"
        "train.eval_every=1,train.checkpoint_every=1,eval.episodes=8")


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = "configs/mgshop.py"  # the run config every override applies to
    c.quick = False  # True: `tiny` instead of `short` (tests)
    c.short = SHORT
    c.tiny = TINY
    c.seeds = 3  # seeds 0 .. seeds-1 per method and environment
    c.methods = "gopo,sft,grpo,ppo,dpo,memento,gopo_no_ea"
    c.gopo_label = "gopo"  # the method the relative differences are taken against
    # Labels that are not a plain `method=<name>`: ablations and named variants.
    c.variants = ml_collections.ConfigDict()
    c.variants.gopo_no_ea = "method=gopo,gopo.use_expert=False"
    c.variants.gopo_no_esndcg = "method=gopo,gopo.use_esndcg=False"
    c.variants.gopo_no_sop_mask = "method=gopo,gopo.sop_mask=False"
    c.variants.gopo_no_constraint = "method=gopo,gopo.constraint=False"
    c.variants.gopo_clipped_pg = "method=gopo,gopo.expert_loss=clipped_pg"
    c.environments = "synthetic_shop"
    # Per-environment overrides (data-backed worlds need their data folder; relative paths are from the repo).
    c.env_overrides = ml_collections.ConfigDict()
    c.env_overrides.synthetic_shop = ""
    c.env_overrides.mgshop = "env.name=mgshop,env.data_dir=../shared/data/mgshopdial"
    c.env_overrides.multiwoz = "env.name=multiwoz,env.data_dir=../shared/data/multiwoz"
    c.env_overrides.tmallbrand = "env.name=tmallbrand,env.data_dir=../shared/data/abcd"
    # Figure 3: GOPO settings (label -> overrides) run on the first environment; "" disables.
    c.convergence = ml_collections.ConfigDict()
    c.convergence.beta_pref_0p2 = "gopo.beta_pref=0.2"
    c.convergence.group_size_2 = "train.group_size=2,train.groups=16"
    c.convergence.lambda_b_0 = "gopo.lambda_b=0.0"
    c.convergence_seeds = 1
    c.lock()
    return c
