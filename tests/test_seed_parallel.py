"""Seeds trained together, vmapped (`gopo_jax.train.driver.train_seeds`), against the same seeds trained as separate
runs (`train_run`); the errors for what it does not cover; and the sweep's `vmap_seeds` switch, which must write the
same report.

Both drivers execute the same pure phase functions (`gopo_jax.train.phases`) with the same keys; what differs is the
order of float reductions (the group batches each seed's matmuls along a seed axis on one device, a single run
splits its batch over the 8-device mesh of conftest). So the test says which values must be equal and which only
agree:
* EQUAL (to float rounding): everything computed without sampling from trained parameters — the scripted reference
  policy's evaluation, the demonstrations (hence the first SFT loss), and every teacher-forced SFT value over the
  whole warm start (training loss, gradient norm, held-out NLL and accuracy), which is where a driver bug (a wrong
  key, batch or order of updates) shows at once.
* AGREE within intervals: whatever samples or decodes from trained agents (held-out evaluation, rollout metrics). A
  rounding difference of ~1e-7 can flip one sampled or greedy token and the dialogues part from there (that is what
  made the old version of this test fail on some CPUs, at GOPO step 52), so these are compared by the overlap of
  their 95% intervals over the held-out customers, which such a flip stays within and a wrong driver does not.
"""
import json
import logging
import os
import signal

import ml_collections
import numpy as np
import pytest

from configs import overrides as config_overrides
from experiments import sweep as sweep_lib
from experiments.common import apply_overrides, load_config_file
from gopo_jax.train import driver

# A warm start long enough for the agents to move off chance (50 steps), two GOPO iterations of 2 epochs × 2
# minibatches of 8 dialogues (both scans of the iteration, one row per device of the 8-device mesh), 32 held-out
# customers (enough for the intervals to mean something).
TINY = {"model.hidden_size": 32, "model.intermediate_size": 64, "model.num_layers": 1, "sft.episodes": 64,
        "sft.steps": 50, "sft.batch_size": 16, "train.steps": 2, "train.groups": 8, "train.group_size": 2,
        "train.epochs": 2, "train.minibatches": 2, "train.eval_every": 1, "train.checkpoint_every": 1,
        "eval.episodes": 32, "method": "gopo"}
SEEDS = 2
SCRIPTED_ATOL = 1e-6  # the reference policy: no model, no sampling
# Observed on this machine over the 50 SFT steps: losses and NLLs within 5.4e-6 relative, gradient norms within
# 1.4e-4 (a norm of ~1e5 summed products); a wrong batch, key or update order moves the loss by > 1e-2.
TEACHER_FORCED_RTOL = 1e-4
GRAD_NORM_RTOL = 2e-3
SUMMARY_METRICS = ("tse", "gre", "esndcg", "alignment")


def run_config(seed=0, overrides=TINY):
    c = load_config_file("configs/mgshop.py", where="test")
    apply_overrides(c, overrides, where="test")
    c.seed = seed
    return c


def sweep_config(vmap_seeds, fixed=TINY):
    return ml_collections.ConfigDict({"base": "configs/mgshop.py", "fixed": config_overrides(fixed),
                                      "grid": config_overrides({}), "seeds": SEEDS, "vmap_seeds": vmap_seeds})


def lines(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same one-setting, two-seed sweep trained vmapped and as separate runs."""
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for name, vmap in (("vmapped", True), ("separate", False)):
        out[name] = (root / name, sweep_lib.sweep(sweep_config(vmap), root / name))
    return out


def seed_dir(sweep_dir, seed):
    return sweep_dir / "runs" / "base" / f"seed{seed}"


def _summaries(sweeps, seed):
    return [json.loads((seed_dir(sweeps[name][0], seed) / "summary.json").read_text())
            for name in ("vmapped", "separate")]


@pytest.mark.slow
def test_vmapped_seeds_equal_separate_runs_where_nothing_is_sampled(sweeps):
    (_, vres), (_, sres) = sweeps["vmapped"], sweeps["separate"]
    assert [r.get("seed_parallel") for r in vres["runs"]] == [True] * SEEDS
    assert [r.get("seed_parallel") for r in sres["runs"]] == [None] * SEEDS
    for seed in range(SEEDS):
        v, s = _summaries(sweeps, seed)
        for metric in SUMMARY_METRICS:
            assert v["reference"][metric]["mean"] == pytest.approx(s["reference"][metric]["mean"],
                                                                   abs=SCRIPTED_ATOL), (seed, metric)
        vl, sl = (lines(seed_dir(sweeps[name][0], seed)) for name in ("vmapped", "separate"))
        assert [(r["step"], sorted(r)) for r in vl] == [(r["step"], sorted(r)) for r in sl]
        compared = 0
        for a, b in zip(vl, sl):
            for key in a:
                if key.startswith(("sft/", "sft_heldout/")):
                    rtol = GRAD_NORM_RTOL if key.endswith("grad_norm") else TEACHER_FORCED_RTOL
                    assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-7), (a["step"], key)
                    compared += 1
        assert compared >= 50 * 4  # every SFT step: loss, grad norm, the two NLLs (and the held-out lines)
    # The seeds really are different runs (different initial agents and customers).
    s0, s1 = (_summaries(sweeps, s)[0] for s in (0, 1))
    assert s0["final_params_sha256"] != s1["final_params_sha256"]


def _overlap(a, b):
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


@pytest.mark.slow
def test_vmapped_seeds_agree_with_separate_runs_where_agents_sample(sweeps):
    for seed in range(SEEDS):
        v, s = _summaries(sweeps, seed)
        for block in ("sft", "gopo"):
            for metric in SUMMARY_METRICS:
                assert _overlap(v[block][metric], s[block][metric]), (seed, block, metric, v[block][metric],
                                                                      s[block][metric])


@pytest.mark.slow
def test_vmapped_sweep_writes_the_same_report(sweeps, caplog):
    (vdir, vres), (sdir, sres) = sweeps["vmapped"], sweeps["separate"]
    for d in (vdir, sdir):
        assert {p.name for p in d.iterdir()} >= {"sweep.json", "sweep.md", "convergence.png", "runs"}
    assert [r["status"] for r in vres["runs"]] == [r["status"] for r in sres["runs"]] == ["done"] * SEEDS
    for metric in ("tse", "gre", "ntse"):
        v, s = vres["table"]["synthetic_shop"]["base"][metric], sres["table"]["synthetic_shop"]["base"][metric]
        assert len(v["per_seed"]) == len(s["per_seed"]) == SEEDS and all(np.isfinite(v["per_seed"]))
    for seed in range(SEEDS):
        vfiles, sfiles = ({p.name for p in seed_dir(d, seed).iterdir()} - {"checkpoints"} for d in (vdir, sdir))
        assert vfiles == sfiles >= {"config.json", "config.py", "metrics.jsonl", "summary.json", "curves.png",
                                    "samples.md", "judge_samples.jsonl", "tokenizer"}
        v = json.loads((seed_dir(vdir, seed) / "summary.json").read_text())
        s = json.loads((seed_dir(sdir, seed) / "summary.json").read_text())
        assert set(v) - {"seed_parallel"} == set(s)
        assert json.loads((seed_dir(vdir, seed) / "config.json").read_text()) == \
            json.loads((seed_dir(sdir, seed) / "config.json").read_text())
    assert (vdir / "sweep.md").read_text().startswith("# Sweep results")
    # A finished group is read, not retrained.
    with caplog.at_level(logging.INFO):
        again = sweep_lib.sweep(sweep_config(True), vdir, train_group_fn=lambda *a: pytest.fail("retrained"))
    assert [r["resumed"] for r in again["runs"]] == ["skipped (summary.json exists)"] * SEEDS
    assert "vmapped in one process" in caplog.text


@pytest.mark.slow
def test_stopped_group_resumes_to_the_same_result(sweeps, tmp_path, monkeypatch):
    """SIGTERM after the first GOPO iteration: the group saves and stops; rerunning resumes from its checkpoint
    and ends with bitwise the parameters of the uninterrupted group."""
    vdir = sweeps["vmapped"][0]
    configs = [run_config(s) for s in range(SEEDS)]
    dirs = [tmp_path / f"seed{s}" for s in range(SEEDS)]
    log = driver.MetricsLogger.log

    def log_then_stop(self, step, metrics, *, prefix="train"):
        log(self, step, metrics, prefix=prefix)
        if prefix == "train" and step == 51:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(driver.MetricsLogger, "log", log_then_stop)
        stopped = driver.train_seeds(configs, dirs)
    assert stopped == [{"stopped": True, "iteration": 51}] * SEEDS
    assert not (dirs[0] / "summary.json").exists()
    resumed = driver.train_seeds(configs, dirs)
    for seed in range(SEEDS):
        straight = json.loads((seed_dir(vdir, seed) / "summary.json").read_text())
        assert resumed[seed]["final_params_sha256"] == straight["final_params_sha256"]
        # As a resumed single run: the log is cut at the checkpoint and the warm-start evaluation is logged again.
        resumed_last, straight_last = ([{k: v for k, v in r.items() if k != "time"} for r in lines(d)
                                        if r["step"] == 52] for d in (dirs[seed], seed_dir(vdir, seed)))
        assert resumed_last == straight_last and len(resumed_last) == 2  # train and eval lines


def test_host_world_and_other_methods_are_refused_clearly():
    host = run_config(overrides={"env.name": "mg_shopdial"})
    with pytest.raises(ValueError, match="needs a pure-JAX world; env.name=mg_shopdial is a host world"):
        driver.check_supported(host)
    with pytest.raises(ValueError, match="needs a pure-JAX world; env.name=mg_shopdial"):
        driver.train_seeds([host], ["/nonexistent/never-made"])
    with pytest.raises(ValueError, match="method='prompted'"):
        driver.check_supported(run_config(overrides={"method": "prompted"}))
    with pytest.raises(ValueError, match=r"differ in more than `seed` \(\['train.steps'\]\)"):
        driver.train_seeds([run_config(0), run_config(1, TINY | {"train.steps": 3})], ["/x/a", "/x/b"])


def test_sweep_falls_back_to_one_seed_at_a_time_on_a_host_world(tmp_path, caplog):
    from tests.helpers import fake_train

    calls = []

    def train(c, d):
        calls.append(c.seed)
        return fake_train(c, d)

    cfg = sweep_config(True, fixed={"env.name": "mg_shopdial", "train.steps": 3})
    with caplog.at_level(logging.INFO):
        res = sweep_lib.sweep(cfg, tmp_path, train_fn=train, train_group_fn=lambda *a: pytest.fail("vmapped"))
    assert calls == [0, 1] and [r["status"] for r in res["runs"]] == ["done", "done"]
    assert "base: seeds one after another (seed-parallel training needs a pure-JAX world" in caplog.text


def test_sweep_shards_whole_settings_and_records_a_failing_group(tmp_path):
    from tests.helpers import fake_train

    groups = []

    def train_group(configs, dirs):
        groups.append([c.seed for c in configs])
        if configs[0].gopo.beta_pref == 3.0:
            raise RuntimeError("boom")
        return [fake_train(c, d) or {} for c, d in zip(configs, dirs)]

    cfg = ml_collections.ConfigDict({"base": "configs/mgshop.py", "fixed": config_overrides({"train.steps": 3}),
                                     "grid": config_overrides({"gopo.beta_pref": (1.0, 3.0, 5.0)}), "seeds": 2,
                                     "vmap_seeds": True})
    first = sweep_lib.sweep(cfg, tmp_path, shard=0, num_shards=2, train_group_fn=train_group)
    assert groups == [[0, 1], [0, 1]]  # settings 0 and 2 of 3, each with both seeds
    assert [r["status"] for r in first["runs"]] == ["done", "done", "not run", "not run", "done", "done"]
    second = sweep_lib.sweep(cfg, tmp_path, shard=1, num_shards=2, train_group_fn=train_group)
    assert [r["status"] for r in second["runs"]] == ["done", "done", "failed", "failed", "done", "done"]
    assert second["runs"][2]["error"] == "RuntimeError: boom"
    assert "boom" in (tmp_path / "runs" / "beta_pref=3.0" / "seed1" / "error.txt").read_text()


def test_finished_group_is_read_not_retrained(tmp_path):
    dirs = [tmp_path / "a", tmp_path / "b"]
    for i, d in enumerate(dirs):
        d.mkdir()
        (d / "summary.json").write_text(json.dumps({"seed": i}))
    # Configs that could not even be built: nothing is constructed for a finished group.
    assert driver.train_seeds([None, None], dirs) == [{"seed": 0}, {"seed": 1}]
