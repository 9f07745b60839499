"""Seeds trained together, vmapped (gopo_jax.train.seed_parallel), against the same seeds trained as separate runs;
the errors for what it does not cover; and the sweep's `vmap_seeds` switch, which must write the same report."""
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import sweep as sweep_lib
from experiments.compare import apply_overrides, load_config_file, parse_overrides
from gopo_jax.train import seed_parallel
from gopo_jax.train.loop import group_minibatches

# A warm start long enough for the agents to move off chance (50 steps), two GOPO iterations of 2 epochs × 2
# minibatches of 8 dialogues (both scans of the iteration, traced group minibatches, one row per device of the
# 8-device mesh `Run` uses here), 8 held-out customers.
TINY = ("model.hidden_size=32,model.intermediate_size=64,model.num_layers=1,sft.episodes=64,sft.steps=50,"
        "sft.batch_size=16,train.steps=2,train.groups=8,train.group_size=2,train.epochs=2,train.minibatches=2,"
        "train.eval_every=1,train.checkpoint_every=1,eval.episodes=8,method=gopo")
SEEDS = 2
# Seed s of the group must be `Run(seed=s)` up to float reduction order: the group runs each seed's matmuls
# batched on one device, `Run` on the 8-device data-parallel mesh of conftest. On CPU both are deterministic and
# the observed differences are ~1e-9 in every eval mean (~1e-4 relative in a gradient norm); a difference at the
# 1e-4 level in an eval mean would mean a sampled or greedy token flipped, i.e. the runs diverged.
EVAL_ATOL = 1e-4
SFT_LOSS_RTOL = 1e-4


def run_config(seed=0, overrides=TINY):
    c = load_config_file("configs/mgshop.py")
    apply_overrides(c, parse_overrides(overrides, where="test"), where="test")
    c.seed = seed
    return c


def sweep_config(vmap_seeds, fixed=TINY):
    return ml_collections.ConfigDict({"base": "configs/mgshop.py", "fixed": fixed, "grid": "", "seeds": SEEDS,
                                      "vmap_seeds": vmap_seeds})


def lines(directory):
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same one-setting, two-seed sweep trained vmapped and as separate `Run`s."""
    root = tmp_path_factory.mktemp("sweeps")
    out = {}
    for name, vmap in (("vmapped", True), ("separate", False)):
        out[name] = (root / name, sweep_lib.sweep(sweep_config(vmap), root / name))
    return out


def seed_dir(sweep_dir, seed):
    return sweep_dir / "runs" / "base" / f"seed{seed}"


@pytest.mark.slow
def test_vmapped_seeds_equal_separate_runs(sweeps):
    (vdir, vres), (sdir, sres) = sweeps["vmapped"], sweeps["separate"]
    assert [r.get("seed_parallel") for r in vres["runs"]] == [True] * SEEDS
    assert [r.get("seed_parallel") for r in sres["runs"]] == [None] * SEEDS
    for seed in range(SEEDS):
        v = json.loads((seed_dir(vdir, seed) / "summary.json").read_text())
        s = json.loads((seed_dir(sdir, seed) / "summary.json").read_text())
        for block in ("reference", "sft", "gopo"):
            for metric in ("tse", "gre", "esndcg", "alignment"):
                assert v[block][metric]["mean"] == pytest.approx(s[block][metric]["mean"], abs=EVAL_ATOL), \
                    (seed, block, metric)
        vl, sl = lines(seed_dir(vdir, seed)), lines(seed_dir(sdir, seed))
        assert [(r["step"], sorted(r)) for r in vl] == [(r["step"], sorted(r)) for r in sl]
        sft = [(a["sft/loss"], b["sft/loss"]) for a, b in zip(vl, sl) if "sft/loss" in a]
        assert len(sft) == 50
        np.testing.assert_allclose(*zip(*sft), rtol=SFT_LOSS_RTOL)
        for a, b in zip(vl, sl):
            for key in a:
                if key.startswith(("eval/", "train/rollout_", "sft_heldout/")):
                    assert a[key] == pytest.approx(b[key], abs=EVAL_ATOL, rel=SFT_LOSS_RTOL), (a["step"], key)
    # The seeds really are different runs (different initial agents and customers).
    s0, s1 = (json.loads((seed_dir(vdir, s) / "summary.json").read_text()) for s in (0, 1))
    assert s0["final_params_sha256"] != s1["final_params_sha256"]


@pytest.mark.slow
def test_vmapped_sweep_writes_the_same_report(sweeps, caplog):
    (vdir, vres), (sdir, sres) = sweeps["vmapped"], sweeps["separate"]
    for d in (vdir, sdir):
        assert {p.name for p in d.iterdir()} >= {"sweep.json", "sweep.md", "convergence.png", "runs"}
    assert [r["status"] for r in vres["runs"]] == [r["status"] for r in sres["runs"]] == ["done"] * SEEDS
    for metric in ("tse", "gre", "ntse"):
        v, s = vres["table"]["synthetic_shop"]["base"][metric], sres["table"]["synthetic_shop"]["base"][metric]
        assert v["per_seed"] == pytest.approx(s["per_seed"], abs=EVAL_ATOL)
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
    log = seed_parallel.MetricsLogger.log

    def log_then_stop(self, step, metrics, *, prefix="train"):
        log(self, step, metrics, prefix=prefix)
        if prefix == "train" and step == 51:
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(seed_parallel.MetricsLogger, "log", log_then_stop)
        stopped = seed_parallel.train_seeds(configs, dirs)
    assert stopped == [{"stopped": True, "iteration": 51}] * SEEDS
    assert not (dirs[0] / "summary.json").exists()
    resumed = seed_parallel.train_seeds(configs, dirs)
    for seed in range(SEEDS):
        straight = json.loads((seed_dir(vdir, seed) / "summary.json").read_text())
        assert resumed[seed]["final_params_sha256"] == straight["final_params_sha256"]
        # As a resumed `Run`: the log is cut at the checkpoint and the warm-start evaluation is logged again.
        resumed_last, straight_last = ([{k: v for k, v in r.items() if k != "time"} for r in lines(d)
                                        if r["step"] == 52] for d in (dirs[seed], seed_dir(vdir, seed)))
        assert resumed_last == straight_last and len(resumed_last) == 2  # train and eval lines


def test_host_world_and_other_methods_are_refused_clearly():
    host = run_config(overrides="env.name=mgshop")
    with pytest.raises(ValueError, match="needs a pure-JAX world; env.name=mgshop is a host world"):
        seed_parallel.check_supported(host)
    with pytest.raises(ValueError, match="needs a pure-JAX world; env.name=mgshop"):
        seed_parallel.SeedParallelRun([host], ["/nonexistent/never-made"])
    with pytest.raises(ValueError, match="method='prompted'"):
        seed_parallel.check_supported(run_config(overrides="method=prompted"))
    with pytest.raises(ValueError, match=r"differ in more than `seed` \(\['train.steps'\]\)"):
        seed_parallel.SeedParallelRun([run_config(0), run_config(1, TINY + ",train.steps=3")], ["/x/a", "/x/b"])


def test_sweep_falls_back_to_one_seed_at_a_time_on_a_host_world(tmp_path, caplog):
    from tests.test_sweep import fake_train

    calls = []

    def train(c, d):
        calls.append(c.seed)
        return fake_train(c, d)

    cfg = sweep_config(True, fixed="env.name=mgshop,train.steps=3")
    with caplog.at_level(logging.INFO):
        res = sweep_lib.sweep(cfg, tmp_path, train_fn=train, train_group_fn=lambda *a: pytest.fail("vmapped"))
    assert calls == [0, 1] and [r["status"] for r in res["runs"]] == ["done", "done"]
    assert "base: seeds one after another (seed-parallel training needs a pure-JAX world" in caplog.text


def test_sweep_shards_whole_settings_and_records_a_failing_group(tmp_path):
    from tests.test_sweep import fake_train

    groups = []

    def train_group(configs, dirs):
        groups.append([c.seed for c in configs])
        if configs[0].gopo.beta_pref == 3.0:
            raise RuntimeError("boom")
        return [fake_train(c, d) or {} for c, d in zip(configs, dirs)]

    cfg = ml_collections.ConfigDict({"base": "configs/mgshop.py", "fixed": "train.steps=3",
                                     "grid": "gopo.beta_pref=1.0|3.0|5.0", "seeds": 2, "vmap_seeds": True})
    first = sweep_lib.sweep(cfg, tmp_path, shard=0, num_shards=2, train_group_fn=train_group)
    assert groups == [[0, 1], [0, 1]]  # settings 0 and 2 of 3, each with both seeds
    assert [r["status"] for r in first["runs"]] == ["done", "done", "not run here", "not run here", "done", "done"]
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
    assert seed_parallel.train_seeds([None, None], dirs) == [{"seed": 0}, {"seed": 1}]


def test_group_minibatches_traced_equals_host():
    batch = {"x": jnp.arange(12).reshape(6, 2)}  # 3 groups of 2 rows
    perm = jnp.array([2, 0, 1])
    host = group_minibatches(batch, perm, group_size=2, num=1)
    traced = jax.jit(lambda b, p: group_minibatches(b, p, group_size=2, num=1))(batch, perm)
    expected = np.array([[[8, 9], [10, 11], [0, 1], [2, 3], [4, 5], [6, 7]]])  # groups 2, 0, 1
    np.testing.assert_array_equal(host["x"], expected)
    np.testing.assert_array_equal(traced["x"], expected)
