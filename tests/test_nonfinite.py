"""Non-finite updates: a NaN/inf gradient, loss, extra or reward skips the update and is counted (params, optimizer
state and GOPO's μ unchanged), the host counts consecutive skips across scanned updates, blocks and iterations, and a
run whose updates stay non-finite stops with a one-line error, keeping its newest checkpoint intact."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.baselines import add_baseline_config
from gopo_jax.algorithms import dpo, gopo, grpo
from gopo_jax.train.build import build, validate_config
from gopo_jax.train.driver import NonFiniteUpdatesError, NonFiniteStreak, restore_agents
from gopo_jax.train.phases import Phases
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_optimizer, pure_train_step
from tests.helpers import tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


# --- the step's guard inside a scan of updates ---

@jax.custom_vjp
def _scale_gradient(w, scale):
    """w, with its gradient multiplied by `scale`: a NaN scale makes a NaN gradient under a finite loss."""
    return w


_scale_gradient.defvjp(lambda w, scale: (w, scale), lambda scale, g: (g * scale, jnp.zeros_like(scale)))


def _toy_loss(params, extras, batch, rng):
    del rng
    w = _scale_gradient(params["policy"]["w"], batch["grad_scale"])
    loss = jnp.mean((w - batch["x"]) ** 2)
    return loss, ({}, {"mu": extras["mu"] + batch["mu_step"]})


def _toy_batches(**poison):
    """Four minibatches [4, ...]; `poison` maps a field to (minibatch, value)."""
    batches = {"x": jnp.arange(4, dtype=jnp.float32)[:, None] * jnp.ones((4, 3)), "grad_scale": jnp.ones(4),
               "mu_step": jnp.full(4, 0.5)}
    for field, (k, value) in poison.items():
        batches[field] = batches[field].at[k].set(value)
    return batches


def _scan_updates(batches):
    tx = make_optimizer({"policy": 0.1})
    state = create_train_state({"policy": {"w": jnp.ones(3)}}, tx, extras={"mu": jnp.float32(0.0)})
    return jax.jit(lambda s, b: jax.lax.scan(pure_train_step(_toy_loss, tx), s, b))(state, batches)


@pytest.mark.parametrize("poison", [{"x": (2, np.nan)}, {"grad_scale": (2, np.nan)}, {"grad_scale": (2, np.inf)},
                                    {"mu_step": (2, np.nan)}],
                         ids=["nan-loss", "nan-gradient", "inf-gradient", "nan-extras"])
def test_nonfinite_update_in_a_scan_is_skipped_and_counted(poison):
    state, metrics = _scan_updates(_toy_batches(**poison))
    np.testing.assert_array_equal(metrics["nonfinite"], [0, 0, 1, 0])
    # The skipped update left no trace: the scan ends where the three good updates alone end.
    clean = jax.tree.map(lambda x: x[jnp.array([0, 1, 3])], _toy_batches())
    expected, _ = _scan_updates(clean)
    _assert_trees_equal(state.params, expected.params)
    _assert_trees_equal(state.opt_state, expected.opt_state)
    assert float(state.extras["mu"]) == float(expected.extras["mu"]) == 1.5
    assert int(state.step) == 4  # the skip still advances the step counter (and the key)


# --- NaN rewards in the objectives: they must reach the loss, not vanish into zero advantages ---

def test_nan_score_makes_the_preference_loss_nan():
    args = jnp.array([[0.3], [0.1], [-0.2]]), None, jnp.ones((3, 1), bool)
    assert np.isfinite(float(gopo.expert_preference_loss(*args, jnp.array([3.0, 1.0, 0.0]), beta_pref=1.0)[0]))
    for bad in (np.nan, np.inf, -np.inf):
        loss, _ = gopo.expert_preference_loss(*args, jnp.array([3.0, bad, 0.0]), beta_pref=1.0)
        assert np.isnan(float(loss)), bad
    # also when the NaN leaves no ordered pair (which alone gives a loss of 0)
    loss, _ = gopo.expert_preference_loss(*args, jnp.array([1.0, np.nan, 1.0]), beta_pref=1.0)
    assert np.isnan(float(loss))


def test_nonfinite_reward_makes_the_cs_advantages_nan():
    mask = jnp.array([True, True, True, False])
    for bad in (np.nan, np.inf):
        out = gopo.normalise_over_valid(jnp.array([1.0, bad, 0.0, 2.0]), mask)
        assert np.all(np.isnan(np.asarray(out)[:3])) and float(out[3]) == 0.0, bad
    # A NaN where no turn happened is not a reward at all.
    np.testing.assert_array_equal(gopo.normalise_over_valid(jnp.array([1.0, 1.0, 1.0, np.nan]), mask), 0.0)


def test_nan_score_makes_the_clipped_pg_expert_and_grpo_losses_nan():
    zeros, mask = jnp.zeros((2, 1)), jnp.ones((2, 1), bool)
    loss, _ = gopo.expert_clipped_pg_loss(zeros, zeros, mask, jnp.array([1.0, np.nan]), None, clip_eps=0.2, beta=0.0)
    assert np.isnan(float(loss))
    assert np.all(np.isnan(np.asarray(grpo.grpo_advantages(jnp.array([1.0, np.nan, 0.0, 2.0]), 2))[:2]))


def test_nan_reward_makes_the_dpo_loss_nan():
    logp, ref = jnp.array([0.1, -0.2]), jnp.zeros(2)
    assert np.isfinite(float(dpo.dpo_group_loss(logp, ref, jnp.array([1.0, 0.0]), beta=0.1)[0]))
    for rewards in ([1.0, np.nan], [np.nan, np.nan], [np.inf, 0.0]):
        assert np.isnan(float(dpo.dpo_group_loss(logp, ref, jnp.array(rewards), beta=0.1)[0])), rewards


# --- NaN/inf rewards in a real rollout: the GOPO and GRPO updates are skipped ---

def _config(method):
    c = tiny_run_config()
    with c.unlocked():
        add_baseline_config(c)
        c.method = method
        c.sft.episodes = 16
        c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 2, 4, 1, 1
        c.eval.episodes = 8
    return c


def _update_of(comps):
    """(the method's initial state, its reference, the jitted `traj -> (state, metrics)`: prepare + one update + the
    iteration's end, as `Phases.update` does)."""
    p = Phases(comps)
    params = comps.init_params(0)
    state = p.method_state(params, comps.method.init_extras(), 0)
    ref = p.kept_reference(jax.tree.map(jnp.copy, params))
    step = pure_train_step(comps.method.loss, comps.tx)

    def update(traj):
        new, metrics = step(state, p.prepare(traj, ref, state.params))
        return new.replace(extras=comps.method.end_iteration(new.extras, traj)), metrics

    return state, ref, jax.jit(update)


@pytest.fixture(scope="module")
def gopo_rollout(tmp_path_factory):
    """(GOPO's initial state, its jitted update, one real rollout of 2 groups of 4 by the initial agents)."""
    comps = build(_config("gopo"), tmp_path_factory.mktemp("gopo"))
    state, ref, update = _update_of(comps)
    traj = jax.jit(Phases(comps).rollout)(state, ref, 0, 0)
    assert bool(traj.turn_mask[1, 0])  # the injections below land on a turn that happened
    return state, update, traj


def _inject(traj, field, value):
    """`traj` with `value` in row 1 (turn 0 of per-turn fields)."""
    x = np.array(getattr(traj, field))
    x[(1, 0) if x.ndim == 2 else 1] = value
    return traj.replace(**{field: jnp.asarray(x)})


def test_gopo_update_on_a_clean_rollout_is_taken(gopo_rollout):
    state, update, traj = gopo_rollout
    new, metrics = update(traj)
    assert int(metrics["nonfinite"]) == 0
    assert float(new.extras["mu"]) != float(state.extras["mu"])  # so the μ checks below are not vacuous
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))


# outcome, satisfaction, sop_valid: R_B; rel: ESNDCG (both in the score S of both objectives); quality: the CS's
# per-turn reward; aligned: the CS's reward and the μ update.
@pytest.mark.parametrize("field", ["outcome", "satisfaction", "sop_valid", "rel", "quality", "aligned"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_gopo_update_with_a_nonfinite_reward_is_skipped(gopo_rollout, field, value):
    state, update, traj = gopo_rollout
    new, metrics = update(_inject(traj, field, value))
    assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
    # μ steps once per iteration from the rollout's misalignment rate: a bad reward does not stop it, a non-finite
    # `aligned` leaves it as it was.
    clean, _ = update(traj)
    expected = state.extras["mu"] if field == "aligned" else clean.extras["mu"]
    assert float(new.extras["mu"]) == float(expected) and np.isfinite(float(new.extras["mu"]))
    _assert_trees_equal(new.params, state.params)
    _assert_trees_equal(new.opt_state, state.opt_state)


@pytest.fixture(scope="module")
def grpo_update(tmp_path_factory):
    """GRPO's initial state and jitted update (the GOPO rollout is a valid GRPO batch: R_B and the CS's tokens)."""
    state, _, update = _update_of(build(_config("grpo"), tmp_path_factory.mktemp("grpo")))
    return state, update


@pytest.mark.parametrize("field", ["outcome", "sop_valid"])  # R_B, GRPO's only reward
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_grpo_update_with_a_nonfinite_reward_is_skipped(gopo_rollout, grpo_update, field, value):
    (state, update), traj = grpo_update, gopo_rollout[2]
    assert int(update(traj)[1]["nonfinite"]) == 0
    new, metrics = update(_inject(traj, field, value))
    assert int(metrics["nonfinite"]) == 1
    _assert_trees_equal(new.params, state.params)
    _assert_trees_equal(new.opt_state, state.opt_state)


# --- the host's count of consecutive skips ---

def test_streak_carries_across_blocks_and_stops_at_the_limit():
    streak = NonFiniteStreak("warm start (SFT)", 3, seeds=[0], start=0)
    streak.add(np.array([[0, 1, 1]]), range(1, 4), checkpoint_step=None)  # steps 1-3: two skips so far
    with pytest.raises(NonFiniteUpdatesError) as stop:
        streak.add(np.array([[1, 0]]), range(4, 6), checkpoint_step=None)  # the third, at step 4
    message = str(stop.value)
    assert "\n" not in message and isinstance(stop.value, ValueError)
    assert message.startswith("warm start (SFT) stopped at step 4: 3 consecutive updates were non-finite")
    assert "the last finite update was at step 1" in message and "no checkpoint has been written yet" in message
    assert "train.max_nonfinite_updates=3" in message


def test_streak_counts_each_update_of_an_iteration_and_resets_on_a_finite_one():
    streak = NonFiniteStreak("gopo", 4, seeds=[0], start=10)
    streak.add(np.array([[[1, 0, 1]]]), [11] * 3, checkpoint_step=10)  # [seeds, epochs, minibatches]
    streak.add(np.array([[[1, 1], [0, 1]]]), [12] * 4, checkpoint_step=10)  # 1 + 2 skips, then a finite one resets
    assert streak.skipped == [1] and streak.last_finite == [12]
    with pytest.raises(NonFiniteUpdatesError, match=r"^gopo stopped at step 13: 4 consecutive .*the last finite "
                                                    r"update was at step 12; nothing is saved on stopping: the "
                                                    r"newest checkpoint \(step 10\) is kept"):
        streak.add(np.ones((1, 2, 2)), [13] * 4, checkpoint_step=10)


def test_streak_names_the_seed_and_limit_zero_never_stops():
    streak = NonFiniteStreak("gopo", 2, seeds=[3, 7], start=5)
    with pytest.raises(NonFiniteUpdatesError, match=r"^gopo \(seed 7\) stopped at step 7: 2 .*no update since "
                                                    r"step 5 was finite"):
        streak.add(np.array([[1, 0], [1, 1]]), [6, 7], checkpoint_step=5)
    never = NonFiniteStreak("gopo", 0, seeds=[0], start=0)
    never.add(np.ones((1, 1000)), range(1, 1001), checkpoint_step=None)
    assert never.skipped == [1000]


def test_a_negative_limit_is_a_config_error():
    c = tiny_run_config()
    with c.unlocked():
        c.train.max_nonfinite_updates = -1
    with pytest.raises(ValueError, match=r"train\.max_nonfinite_updates must be >= 0"):
        validate_config(c)


# --- a run whose updates are all non-finite stops, through the command line ---

SFT_STEPS = 4
TINY = ["--config.model.hidden_size=32", "--config.model.num_layers=1", "--config.model.intermediate_size=64",
        f"--config.sft.steps={SFT_STEPS}", "--config.sft.episodes=16", "--config.sft.batch_size=8",
        "--config.train.steps=6", "--config.train.groups=2", "--config.train.group_size=2",
        "--config.train.minibatches=1", "--config.train.epochs=1", "--config.train.checkpoint_every=1",
        "--config.train.eval_every=100", "--config.eval.episodes=4", "--config.mesh.data=1"]


@pytest.mark.slow  # one tiny run through the command line: ~1-2 min on 2 cores
def test_run_with_nan_rewards_stops_and_keeps_its_checkpoint(tmp_path):
    # λ_B = NaN makes every trajectory score S = ESNDCG + λ_B·R_B NaN: each GOPO update is skipped.
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-m", "experiments.mgshop", "--workdir", str(tmp_path), *TINY,
                             "--config.gopo.lambda_b=nan", "--config.train.max_nonfinite_updates=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: gopo stopped at step {SFT_STEPS + 2}: 2 consecutive updates were "
                                "non-finite"), last_line
    assert f"no update since step {SFT_STEPS} was finite" in last_line
    assert f"nothing is saved on stopping: the newest checkpoint (step {SFT_STEPS + 1}) is kept" in last_line
    assert not (tmp_path / "summary.json").exists()
    # Nothing was saved on stopping; the skipped iteration's checkpoint holds the warm start's agents unchanged.
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == \
        [SFT_STEPS, SFT_STEPS + 1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["train/nonfinite"] for r in rows if "train/nonfinite" in r] == [1.0, 1.0]
    # Restorable the way serving restores a run: from its config.json.
    config = ml_collections.ConfigDict(json.loads((tmp_path / "config.json").read_text()))
    config.mesh.data = -1  # the run had one device, this process has the 8 fake ones
    _, warm_start, at_warm_start = restore_agents(tmp_path, config, step=SFT_STEPS)
    _, kept, at_kept = restore_agents(tmp_path, config)
    assert (at_warm_start, at_kept) == (SFT_STEPS, SFT_STEPS + 1)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(kept))
    _assert_trees_equal(kept, warm_start)
