"""The comparison driver: run planning from the config, the tables' hand-checkable numbers, and (slow) a tiny
real comparison of 2 methods × 2 seeds plus a missing method, with its files and skip-on-resume."""
import json

import ml_collections
import pytest

import configs
from configs import compare as compare_config
from configs import overrides
from experiments import compare as compare_lib
from experiments import records
from experiments.common import ConfigError
from gopo_jax.report import tables


def test_plan_resolves_variants_quick_and_seeds():
    c = compare_config.get_config()
    c.quick, c.seeds, c.methods, c.convergence_seeds = True, 2, "gopo,gopo_no_ea,sft", 1
    c.environments = "synthetic_shop"
    runs = compare_lib.plan(c)
    compare_runs = [r for r in runs if r["kind"] == "compare"]
    assert [(r["label"], r["seed"]) for r in compare_runs] == [("gopo", 0), ("gopo", 1), ("gopo_no_ea", 0),
                                                              ("gopo_no_ea", 1), ("sft", 0), ("sft", 1)]
    no_ea = compare_runs[2]["config"]
    assert no_ea.method == "gopo" and no_ea.gopo.use_expert is False and no_ea.seed == 0
    # The comparison reports the test customers; without a selection every tuned label runs its first setting.
    assert {r["config"].eval.split for r in runs} == {"test"}
    assert [r["setting"] for r in compare_runs] == ["default"] * 4 + [None] * 2
    assert compare_runs[4]["config"].method == "sft"
    assert all(r["config"].sft.steps == 2 for r in runs)  # quick -> the tiny overrides
    conv = [r for r in runs if r["kind"] == "convergence"]
    assert {r["label"] for r in conv} == {f"conv_{k}" for k in c.convergence} and len(conv) == len(c.convergence)
    assert next(r for r in conv if r["label"] == "conv_lambda_b_0")["config"].gopo.lambda_b == 0.0


def test_plan_host_worlds_use_their_own_run_config():
    c = compare_config.get_config()
    c.seeds, c.methods, c.convergence_seeds = 1, "gopo", 0
    by_env = {r["env"]: r["config"] for r in compare_lib.plan(c)}
    assert set(by_env) == {"synthetic_shop", "mg_shopdial", "multiwoz", "tmallbrand"}
    assert by_env["synthetic_shop"].env.name == "synthetic_shop" and by_env["synthetic_shop"].sft.steps == 300
    woz = by_env["multiwoz"]
    assert woz.env.name == "multiwoz" and woz.layout.max_turns == woz.env.max_turns == 6
    assert woz.layout.context_len == 24 and woz.tokenizer.vocab_size == 768  # configs/multiwoz.py's
    assert woz.env.data_dir.endswith("shared/data/multiwoz") and woz.env.data_dir.startswith("/")
    assert by_env["mg_shopdial"].env.name == "mg_shopdial" and by_env["mg_shopdial"].tokenizer.vocab_size == 1024


def test_env_methods_narrow_an_environment_to_some_labels():
    c = compare_config.get_config()
    c.seeds, c.convergence_seeds, c.methods = 1, 0, "gopo,sft,dpo,gopo_no_ea"
    labels = {}
    for run in compare_lib.plan(c):
        if run["seed"] == 0:
            labels.setdefault(run["env"], []).append(run["label"])
    assert labels["synthetic_shop"] == ["gopo", "sft", "dpo", "gopo_no_ea"]
    assert labels["mg_shopdial"] == labels["multiwoz"] == labels["tmallbrand"] == ["gopo", "sft", "dpo"]
    c.env_methods.multiwoz = "gopo_no_sop_mask"
    with pytest.raises(compare_lib.ComparisonError, match="env_methods.multiwoz .* shares no label with `methods`"):
        compare_lib.plan(c)


def test_plan_errors_name_the_key():
    c = compare_config.get_config()
    c.env_overrides.synthetic_shop = overrides({"train.stepz": 3})
    with pytest.raises(ConfigError, match="env_overrides.synthetic_shop: the run config has no key 'train.stepz'"):
        compare_lib.plan(c)
    c = compare_config.get_config()
    c.variants.gopo_no_ea = overrides({"gopo.use_expert": "no"})
    c.methods = "gopo_no_ea"
    with pytest.raises(ConfigError, match="variants.gopo_no_ea: gopo.use_expert='no' has the wrong type"):
        compare_lib.plan(c)
    c = compare_config.get_config()
    c.environments = "atlantis"
    with pytest.raises(compare_lib.ComparisonError, match="'atlantis' needs an entry in env_configs"):
        compare_lib.plan(c)
    c = compare_config.get_config()
    c.env_configs.synthetic_shop = "configs/nowhere.py"
    with pytest.raises(ConfigError, match="env_configs.synthetic_shop: config file configs/nowhere.py does not exist"):
        compare_lib.plan(c)


def test_command_line_overrides_reach_a_variant(monkeypatch):
    """A variant's overrides are flags of the comparison config; its run config files resolve from any directory."""
    from absl import flags
    from ml_collections import config_flags

    monkeypatch.chdir("/")
    values = flags.FlagValues()
    argv = ["gopo-compare", "--config.variants.prompted.baselines.prompted.base_url=http://127.0.0.1:8000",
            "--config.environments=synthetic_shop", "--config.methods=prompted", "--config.convergence_seeds=0"]
    config_flags.DEFINE_config_file("config", configs.config_path("compare.py"), flag_values=values, sys_argv=argv)
    values(argv)
    run = compare_lib.plan(values.config)[0]
    prompted = run["config"].baselines.prompted
    assert run["config"].method == "prompted" and prompted.base_url == "http://127.0.0.1:8000"


def test_tuning_grids_validation_and_selection(tmp_path):
    """Every tuned method's grid (at most 4 settings) on `tuning_seeds` seeds, on the validation customers; the best
    mean validation TSE is selected (ties: the first listed); an ablation runs with its method's selection; a grid
    with an unfinished run holds back the labels it tunes."""
    c = compare_config.get_config()
    c.quick, c.seeds, c.tuning_seeds, c.convergence_seeds = True, 2, 2, 0
    c.environments, c.methods = "synthetic_shop", "gopo,sft,ppo,gopo_no_ea"
    tune = compare_lib.tuning_plan(c)
    assert {r["label"] for r in tune} == {"gopo", "ppo"}  # sft has nothing to tune; gopo_no_ea ablates gopo
    assert len(tune) == 2 * 4 * 2 and {r["config"].eval.split for r in tune} == {"validation"}
    beta = {r["setting"]: r["config"].gopo.beta_pref for r in tune if r["label"] == "gopo"}
    assert beta["beta_pref_1"] == 1.0 and beta["default"] == 0.3  # configs/mgshop.py's
    # Validation TSE per (label, setting): gopo's best is lr_cs_half; ppo's settings tie, so its first one wins.
    score = {("gopo", "lr_cs_half"): 0.5}
    records = []
    for run in tune:
        d = compare_lib.run_dir(tmp_path, run)
        d.mkdir(parents=True)
        tse = score.get((run["label"], run["setting"]), 0.2) + 0.01 * run["seed"]
        (d / "summary.json").write_text(json.dumps(summary(run["config"].method, tse, 0.0)))
        records.append({"status": "done"})
    selection = compare_lib.select(c, tune, records, tmp_path)
    assert selection["synthetic_shop"]["gopo"]["setting"] == "lr_cs_half"
    assert selection["synthetic_shop"]["gopo"]["scores"]["lr_cs_half"]["mean"] == pytest.approx(0.505)
    assert selection["synthetic_shop"]["ppo"]["setting"] == "default"
    runs = compare_lib.plan(c, selection)
    by_label = {r["label"]: r for r in runs}
    assert by_label["gopo"]["setting"] == by_label["gopo_no_ea"]["setting"] == "lr_cs_half"
    assert by_label["gopo_no_ea"]["config"].train.lr_cs == 2.5e-4 and by_label["gopo_no_ea"]["config"].gopo.use_expert \
        is False
    records[0] = {"status": "not run"}
    pending = compare_lib.plan(c, compare_lib.select(c, tune, records, tmp_path))
    assert {r["label"] for r in pending} == {"sft", "ppo"}
    md = tables.tuning_markdown({"selection": selection})
    assert "| lr_cs_half | train.lr_cs=0.00025 | 0.505 [" in md and "**selected**" in md
    with c.unlocked():
        c.grids.ppo.more = overrides({"baselines.ppo.beta": 0.1})
    with pytest.raises(compare_lib.ComparisonError, match="grids.ppo has 5 settings; the equal tuning budget"):
        compare_lib.tuning_plan(c)


def summary(method, tse, gre, ref_tse=0.5):
    def block(t, g):
        d = {k: {"mean": 0.0, "lo": 0.0, "hi": 0.0, "n": 4} for k in tables.METRICS if k != "ntse"}
        d["tse"] = {"mean": t, "lo": t, "hi": t, "n": 4}
        d["gre"] = {"mean": g, "lo": g, "hi": g, "n": 4}
        d["ntse"] = t / ref_tse
        return d
    return {"env": "shop", "method": method, "reference": block(ref_tse, 1.0), method: block(tse, gre)}


def test_training_time_counts_kept_runs_and_a_vmapped_group_once(tmp_path):
    """The comparison's cost comes from the finished runs' summaries, whoever trained them: a vmapped group's seeds
    each carry the group's wall time, so it counts once; seeds trained one by one add up."""
    runs = [dict(env=env, label="gopo", setting="default", seed=s, kind="compare") for env in ("shop", "host")
            for s in (0, 1, 2)]
    records = [{"status": "not run" if (run["env"], run["seed"]) == ("host", 2) else "done"} for run in runs]
    for run, record in zip(runs, records):
        if record["status"] == "done":
            d = compare_lib.run_dir(tmp_path, run)
            d.mkdir(parents=True)
            parallel = run["env"] == "shop"
            (d / "summary.json").write_text(json.dumps({"wall_seconds": 600.0 if parallel else 100.0 + run["seed"],
                                                        "seed_parallel": parallel}))
    assert compare_lib.training_seconds(tmp_path, runs, records) == {"shop": 600.0, "host": 201.0}


def test_tables_hand_computed():
    records = [("shop", "gopo", 0, summary("gopo", 0.3, 1.0)), ("shop", "gopo", 1, summary("gopo", 0.5, 2.0)),
               ("shop", "ppo", 0, summary("ppo", 0.2, 1.0)), ("shop", "ppo", 1, summary("ppo", 0.4, 1.0))]
    out = tables.aggregate(records, n_boot=200)
    gopo = out["table"]["shop"]["gopo"]
    assert gopo["tse"]["mean"] == pytest.approx(0.4) and gopo["tse"]["per_seed"] == pytest.approx([0.3, 0.5])
    assert gopo["ntse"]["mean"] == pytest.approx(0.8)
    rel = out["relative"]["shop"]["ppo"]
    assert rel["tse"]["rel_pct"] == pytest.approx(100 * 0.1 / 0.3)  # (0.4 - 0.3) / 0.3
    assert rel["gre"]["rel_pct"] == pytest.approx(50.0)  # (1.5 - 1.0) / 1.0
    assert rel["tse"]["mean_diff"] == pytest.approx(0.1)
    md = tables.markdown(out | {"runs": [{"env": "shop", "label": "dpo", "seed": 0, "status": "failed",
                                          "error": "ValueError: unknown method 'dpo'"}]})
    assert "| gopo | 2 | 0.400 [" in md and "| ppo | +33.3% [" in md and "unknown method 'dpo'" in md
    # GRE can be negative: its column is the absolute paired difference (+0.500), not a percentage.
    assert "| Δtse % | Δgre (absolute) |" in md and "] * | +0.500 [+0.000, +1.000] |" in md


@pytest.mark.slow
def test_tiny_comparison_end_to_end_and_resume(tmp_path):
    c = compare_config.get_config()
    c.quick, c.seeds, c.methods, c.convergence_seeds = True, 2, "gopo,sft,not_a_method", 0
    c.environments, c.tuning_seeds = "synthetic_shop", 1
    with c.unlocked():  # a 2-setting grid keeps the test short; the selection is what is checked
        c.grids.gopo = ml_collections.ConfigDict({"default": overrides({}),
                                                  "beta_pref_1": overrides({"gopo.beta_pref": 1.0})})
    results = compare_lib.compare(c, tmp_path)
    tuning = results["tuning"]["selection"]["synthetic_shop"]["gopo"]
    assert tuning["complete"] and tuning["setting"] in ("default", "beta_pref_1") and len(tuning["scores"]) == 2
    assert "## Tuning (validation customers)" in (tmp_path / "results.md").read_text()
    status = {(r["label"], r["seed"]): r["status"] for r in results["runs"]}
    assert status == {("gopo", 0): "done", ("gopo", 1): "done", ("sft", 0): "done", ("sft", 1): "done",
                      ("not_a_method", 0): "failed", ("not_a_method", 1): "failed"}
    failed = next(r for r in results["runs"] if r["status"] == "failed")
    assert "not_a_method" in failed["error"]
    for name in ("results.json", "results.md", "figure1.png", "figure3.png"):
        assert (tmp_path / name).stat().st_size > 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["table"]["synthetic_shop"]["gopo"]["tse"]["n"] == 2
    assert set(stored["relative"]["synthetic_shop"]) == {"sft"}
    assert [len(c["iterations"]) for c in stored["convergence"]["default"]] == [3, 3]  # SFT point + 2 iterations
    # GOPO and SFT of one seed shared their warm start: one per seed, in the folder of the code that trained them.
    code = records.code_digest("synthetic_shop")[:16]
    assert [p.name for p in (tmp_path / "warm_starts").iterdir()] == [code]
    assert len(list((tmp_path / "warm_starts" / code).iterdir())) == 2

    def must_not_train(cfg, workdir):
        raise AssertionError(f"finished run retrained: {workdir}")

    c.methods = "gopo,sft"
    again = compare_lib.compare(c, tmp_path, train_fn=must_not_train)
    assert all(r["status"] == "done" and "skipped" in r["resumed"] for r in again["runs"])
    assert again["table"] == json.loads(json.dumps(results["table"]))


def test_a_sigterm_during_tuning_trains_nothing_more(tmp_path):
    """A run stopped by SIGTERM in the tuning stage ends the comparison there: the report is written and no run
    of the comparison proper (not even an untuned label such as SFT) starts."""
    c = compare_config.get_config()
    c.quick, c.seeds, c.tuning_seeds, c.convergence_seeds = True, 1, 1, 0
    c.environments, c.methods, c.vmap_seeds = "synthetic_shop", "gopo,sft", False
    started = []

    def train(config, directory):
        started.append((config.method, config.eval.split))
        return {"stopped": True, "iteration": 1}

    results = compare_lib.compare(c, tmp_path, train_fn=train)
    assert started == [("gopo", "validation")]  # the first tuning run; the rest of its stage stops with it
    assert {r["status"] for r in results["runs"]} == {"not run"}
    assert (tmp_path / "results.md").exists()


def test_host_worlds_can_run_the_setting_tuned_on_the_shop(tmp_path):
    """`tuning_environments`: only the named environments tune; the others run the setting their first one
    selected, and the tuning table says where it was selected."""
    c = compare_config.get_config()
    c.quick, c.seeds, c.tuning_seeds, c.convergence_seeds = True, 1, 1, 0
    c.environments, c.methods, c.tuning_environments = "synthetic_shop,mg_shopdial", "gopo,sft", "synthetic_shop"
    tune = compare_lib.tuning_plan(c)
    assert {r["env"] for r in tune} == {"synthetic_shop"} and len(tune) == 4
    records = []
    for run in tune:
        d = compare_lib.run_dir(tmp_path, run)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps(summary("gopo", 0.5 if run["setting"] == "beta_pref_1" else 0.2,
                                                           0.0)))
        records.append({"status": "done"})
    selection = compare_lib.select(c, tune, records, tmp_path)
    assert selection["mg_shopdial"]["gopo"]["setting"] == "beta_pref_1"
    assert selection["mg_shopdial"]["gopo"]["tuned_on"] == "synthetic_shop"
    host = [r for r in compare_lib.plan(c, selection) if r["env"] == "mg_shopdial" and r["label"] == "gopo"]
    assert [r["setting"] for r in host] == ["beta_pref_1"] * 3 and host[0]["config"].gopo.beta_pref == 1.0  # env_seeds
    assert host[0]["config"].env.name == "mg_shopdial"
    md = tables.tuning_markdown({"selection": selection})
    assert "### mg_shopdial · gopo: the setting selected on synthetic_shop (beta_pref_1; not tuned here)" in md
    # The tuned world need not be compared: its tuning runs still train, and the compared worlds use its choice.
    c.environments = "mg_shopdial"
    assert {r["env"] for r in compare_lib.tuning_plan(c)} == {"synthetic_shop"}
    assert compare_lib.select(c, tune, records, tmp_path)["mg_shopdial"]["gopo"]["setting"] == "beta_pref_1"
    # A tuning world that is not compared, and lends nothing, does not tune.
    c.environments, c.tuning_environments = "synthetic_shop", "synthetic_shop,multiwoz"
    assert {r["env"] for r in compare_lib.tuning_plan(c)} == {"synthetic_shop"}
    c.environments = "multiwoz,mg_shopdial"
    assert list(dict.fromkeys(r["env"] for r in compare_lib.tuning_plan(c))) == ["synthetic_shop", "multiwoz"]
    c.tuning_environments = "atlantis"
    with pytest.raises(compare_lib.ComparisonError, match=r"tuning_environments names \['atlantis'\]"):
        compare_lib.tuning_plan(c)
