"""The method registry (`gopo_jax.train.methods`): every method builds from a `MethodContext`, says which agents
act and which parameters it adds and trains, and turns one small rollout into its typed loss batch (jitted, so
`prepare_batch` is pure) whose loss is a finite scalar with the extras' structure unchanged."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gopo_jax.algorithms import dpo, memento
from gopo_jax.algorithms.dpo import DPOBatch
from gopo_jax.algorithms.gopo import GOPOBatch
from gopo_jax.algorithms.grpo import GRPOBatch
from gopo_jax.algorithms.memento import MementoBatch
from gopo_jax.algorithms.ppo import PPOBatch
from gopo_jax.train.build import build, hyper_from_config
from gopo_jax.train.methods import METHODS, Method, MethodContext, make_method
from gopo_jax.train.report import params_hash
from tests.helpers import tiny_run_config

GROUPS, G = 4, 2
NAMES = sorted(METHODS)
USE_EXPERT = {"gopo": True, "grpo": False, "ppo": False, "dpo": False, "memento": True, "sft": True}
EXTRA_PARAMS = {"gopo": set(), "grpo": set(), "ppo": {"value"}, "dpo": set(), "memento": {"q"}, "sft": set()}
BATCH_CLASS = {"gopo": GOPOBatch, "grpo": GRPOBatch, "ppo": PPOBatch, "dpo": DPOBatch, "memento": MementoBatch}
TRAINED = sorted(BATCH_CLASS)


def _config(method="gopo", **gopo):
    c = tiny_run_config()
    with c.unlocked():
        c.method = method
        c.sft.episodes, c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 16, GROUPS, G, 2, 1
        c.eval.episodes = 8
        for k, v in gopo.items():
            c.gopo[k] = v
    return c


def _context(comps, config=None) -> MethodContext:
    config = comps.config if config is None else config
    return MethodContext(config=config, world=comps.world, expert_gd=comps.expert_gd, cs_gd=comps.cs_gd,
                         hyper=hyper_from_config(config), metric_settings=comps.metric_settings)


@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("methods")
    return {name: build(_config(name), workdir) for name in NAMES}


@pytest.fixture(scope="module")
def traj(comps):
    """One small rollout of the GOPO agents (both act, so the Expert's and the CS's log-probs are real)."""
    c = comps["gopo"]
    episodes = c.world.group_episodes(jax.random.key(0), GROUPS, G)
    return jax.jit(c.rollout)(c.init_params(0), episodes, jax.random.key(1))


@pytest.fixture(scope="module")
def prepared(comps, traj):
    """name -> (jitted prepare_batch, params, ref params, batch, (loss, (metrics, new extras)))."""
    cache = {}

    def get(name):
        if name not in cache:
            c = comps[name]
            m = c.method
            params, ref = c.init_params(0), c.init_params(1)
            prep = jax.jit(m.prepare_batch)
            batch = prep(traj, ref, params)
            out = jax.jit(m.loss)(params, m.init_extras(), batch, jax.random.key(0))
            cache[name] = (prep, params, ref, batch, jax.device_get(out))
        return cache[name]

    return get


# --- the registry ---

def test_registry_names():
    assert set(METHODS) == {"gopo", "sft", "grpo", "ppo", "dpo", "memento"}


@pytest.mark.parametrize("name", NAMES)
def test_every_method_builds_from_a_context(comps, name):
    m = make_method(name, _context(comps["gopo"], _config(name)))
    assert isinstance(m, Method) and m.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.use_expert = not m.use_expert


def test_unknown_method_lists_the_names(comps):
    with pytest.raises(ValueError) as err:
        make_method("nope", _context(comps["gopo"]))
    msg = str(err.value)
    assert "'nope'" in msg and "config.method" in msg
    assert all(name in msg for name in METHODS)


def test_missing_baselines_section_names_the_fix(comps):
    d = _config("grpo").to_dict()
    del d["baselines"]
    bare = ml_collections.ConfigDict(d)
    assert "baselines" not in bare
    ctx = _context(comps["gopo"], bare)
    for name in ("grpo", "ppo", "dpo", "memento"):
        with pytest.raises(ValueError, match="add_baseline_config") as err:
            make_method(name, ctx)
        assert repr(name) in str(err.value)
    # GOPO and SFT read no baselines section
    assert make_method("gopo", ctx).name == "gopo" and make_method("sft", ctx).name == "sft"


def test_memento_bank_too_small_raises(comps):
    c = _config("memento")
    with c.unlocked():
        c.baselines.memento.bank_size = 8  # one step: GROUPS*G/2 dialogues x T turns
    with pytest.raises(ValueError, match="baselines.memento.bank_size"):
        make_method("memento", _context(comps["gopo"], c))


# --- per-method properties ---

@pytest.mark.parametrize("name", NAMES)
def test_use_expert_and_trains(comps, name):
    m = comps[name].method
    assert m.use_expert is USE_EXPERT[name]
    assert m.trains is (name != "sft")
    assert (m.loss is None) is (m.prepare_batch is None)


def test_use_expert_follows_config_for_gopo_and_sft(comps):
    off = _config(use_expert=False)
    assert make_method("gopo", _context(comps["gopo"], off)).use_expert is False
    assert make_method("sft", _context(comps["gopo"], off)).use_expert is False
    assert make_method("memento", _context(comps["gopo"], off)).use_expert is True  # its Expert always acts


@pytest.mark.parametrize("name", NAMES)
def test_learning_rate_groups_are_the_param_groups(comps, name):
    c = comps[name]
    params = c.init_params(0)
    assert set(c.method.learning_rates) == set(params) == {"expert", "cs"} | EXTRA_PARAMS[name]
    lrs, t = c.method.learning_rates, c.config.train
    if name == "gopo":
        assert (lrs["expert"], lrs["cs"]) == (t.lr_expert, t.lr_cs)
    elif name in ("grpo", "ppo"):  # the CS alone learns, at the shared CS step size
        assert lrs["expert"] == 0.0 and lrs["cs"] == t.lr_cs
    elif name == "dpo":  # offline preferences: the CS alone learns, at DPO's own step size
        assert lrs["expert"] == 0.0 and lrs["cs"] == c.config.baselines.dpo.lr
    elif name == "memento":
        assert lrs["expert"] == lrs["cs"] == 0.0 and lrs["q"] == c.config.baselines.memento.lr_q
    else:
        assert all(v == 0.0 for v in lrs.values())
    if name == "ppo":
        assert lrs["value"] == c.config.baselines.ppo.lr_value


@pytest.mark.parametrize("name", NAMES)
def test_init_extra_params_deterministic_in_key(comps, name):
    m = comps[name].method
    a, b, other = (m.init_extra_params(jax.random.key(k)) for k in (0, 0, 1))
    assert set(a) == EXTRA_PARAMS[name]
    assert params_hash(a) == params_hash(b)
    if EXTRA_PARAMS[name]:
        assert jax.tree.leaves(a) and params_hash(a) != params_hash(other)
        assert jax.tree.structure(a) == jax.tree.structure(other)
    else:
        assert a == other == {}


@pytest.mark.parametrize("name", NAMES)
def test_rollout_and_acting_params(comps, name):
    m = comps[name].method
    params, ref = comps[name].init_params(0), comps[name].init_params(1)
    extras = m.init_extras()
    assert m.rollout_params(params, ref) is (ref if name == "dpo" else params)
    acting = m.acting_params(params, extras)
    if name == "memento":
        assert set(acting) == set(params) | {"bank"}
        assert set(acting["bank"]) == set(memento.BANK_KEYS)
        for k in memento.BANK_KEYS:
            assert acting["bank"][k] is extras[k]
        assert all(acting[k] is params[k] for k in params)
    else:
        assert acting is params


def test_init_extras(comps):
    assert comps["gopo"].method.init_extras() == {"mu": jnp.float32(comps["gopo"].config.gopo.mu_init)}
    mem = comps["memento"].method.init_extras()
    assert set(mem) == set(memento.BANK_KEYS) | {"memento_updates"}
    assert int(mem["memento_updates"]) == 0
    for name in ("grpo", "ppo", "dpo", "sft"):
        assert comps[name].method.init_extras() == {}


# --- batches and losses ---

def _shapes(comps, traj):
    B, L = traj.tokens.shape
    w = comps["gopo"].world
    T, n_k = w.layout.max_turns, len(w.vocab.strategy_ids)
    D = w.model_config.hidden_size + len(w.spec.sop.stages) + 1
    return {
        "gopo": {"scores": (B,), "ref_expert_logp": (B, T, n_k), "ref_cs_logp": (B, L)},
        "grpo": {"rewards": (B,), "ref_cs_logp": (B, L)},
        "ppo": {"advantages": (B, L), "returns": (B, L), "old_values": (B, L), "ref_cs_logp": (B, L)},
        "dpo": {"rewards": (B,), "ref_seq_logp": (B,)},
        "memento": {"emb": (B, T, D), "strategy": (B, T), "target": (B, T), "turn_mask": (B, T)},
    }


@pytest.mark.parametrize("name", TRAINED)
def test_prepare_batch_typed_and_shaped(comps, traj, prepared, name):
    _, _, _, batch, _ = prepared(name)
    assert type(batch) is BATCH_CLASS[name]
    assert traj.tokens.shape[0] == GROUPS * G
    for field, shape in _shapes(comps, traj)[name].items():
        value = getattr(batch, field)
        assert value is not None and value.shape == shape, (field, None if value is None else value.shape)
        if jnp.issubdtype(value.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(value))), field
    if name != "memento":  # the rollout is carried as is
        for a, b in zip(jax.tree.leaves(batch.traj), jax.tree.leaves(traj)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:
        np.testing.assert_array_equal(np.asarray(batch.strategy), np.asarray(traj.strategy))
        np.testing.assert_array_equal(np.asarray(batch.turn_mask), np.asarray(traj.turn_mask))


@pytest.mark.parametrize("name", TRAINED)
def test_loss_finite_scalar_with_extras_structure(comps, prepared, name):
    m = comps[name].method
    _, _, _, _, (loss, (metrics, new_extras)) = prepared(name)
    assert np.shape(loss) == () and np.isfinite(loss)
    assert metrics and all(np.shape(v) == () and np.isfinite(v) for v in metrics.values()), metrics
    assert jax.tree.structure(new_extras) == jax.tree.structure(m.init_extras())
    for a, b in zip(jax.tree.leaves(new_extras), jax.tree.leaves(m.init_extras())):
        assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype


def test_reference_fields_come_from_the_reference(comps, traj, prepared):
    """The frozen-reference fields are a function of `ref_params` only; the rest ignores it."""
    for name, fields in (("gopo", ("ref_expert_logp", "ref_cs_logp")), ("grpo", ("ref_cs_logp",)),
                         ("dpo", ("ref_seq_logp",)), ("ppo", ("ref_cs_logp",))):
        prep, params, ref, batch, _ = prepared(name)
        other_params = comps[name].init_params(5)
        same_ref = prep(traj, ref, other_params)
        other_ref = prep(traj, other_params, params)
        for f in fields:
            np.testing.assert_array_equal(np.asarray(getattr(same_ref, f)), np.asarray(getattr(batch, f)))
            assert not np.allclose(np.asarray(getattr(other_ref, f)), np.asarray(getattr(batch, f))), (name, f)
    # PPO's old values are the current value model's, not the reference's
    prep, params, ref, batch, _ = prepared("ppo")
    # (the value head starts at zero, so every initial value is 0: move all of the value model's weights)
    assert not np.any(np.asarray(batch.old_values))
    moved = {**params, "value": jax.tree.map(lambda x: x + 0.05, params["value"])}
    assert np.any(np.asarray(prep(traj, ref, moved).old_values))
    np.testing.assert_array_equal(np.asarray(prep(traj, params, params).old_values), np.asarray(batch.old_values))
    # Memento embeds with the current Expert
    prep, params, ref, batch, _ = prepared("memento")
    moved = {**params, "expert": comps["memento"].init_params(5)["expert"]}
    assert not np.allclose(np.asarray(prep(traj, ref, moved).emb), np.asarray(batch.emb))


def test_batches_agree_across_methods(traj, prepared):
    """Same rollout, same reference agents: the methods' shared quantities agree."""
    gopo, grpo, ppo, dpo_batch = (prepared(n)[3] for n in ("gopo", "grpo", "ppo", "dpo"))
    np.testing.assert_allclose(np.asarray(grpo.ref_cs_logp), np.asarray(gopo.ref_cs_logp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ppo.ref_cs_logp), np.asarray(gopo.ref_cs_logp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dpo_batch.ref_seq_logp),
                               np.asarray(dpo.sequence_log_prob(gopo.ref_cs_logp, traj.cs_mask)), rtol=1e-5,
                               atol=1e-4)
    np.testing.assert_array_equal(np.asarray(grpo.rewards), np.asarray(dpo_batch.rewards))  # both R_B
    # the reference log-probs are masked to the CS's reply tokens only where the mask says so: finite, <= 0
    assert np.all(np.asarray(gopo.ref_cs_logp)[np.asarray(traj.cs_mask)] <= 0.0)
    assert np.all(np.asarray(gopo.ref_expert_logp) <= 1e-6)


def test_gopo_multiplier_steps_at_the_iteration_end(comps, prepared, traj):
    _, _, _, _, (_, (metrics, new_extras)) = prepared("gopo")
    assert float(new_extras["mu"]) == float(metrics["mu"])  # the loss leaves μ alone
    hyper = comps["gopo"].hyper
    stepped = comps["gopo"].method.end_iteration(new_extras, traj)
    expected = max(0.0, float(metrics["mu"]) + hyper.mu_lr * (float(metrics["misalignment_rate"]) - hyper.delta))
    np.testing.assert_allclose(float(stepped["mu"]), expected, rtol=1e-5, atol=1e-7)


# --- GOPO's β = 0 path: no reference pass ---

@pytest.mark.parametrize("beta_cs, expert_reference", [(0.0, False), (0.0, True), (0.05, False)])
def test_gopo_reference_fields_off(comps, traj, beta_cs, expert_reference):
    c = comps["gopo"]
    m = make_method("gopo", _context(c, _config(beta_cs=beta_cs, expert_reference=expert_reference)))
    params, ref = c.init_params(0), c.init_params(1)
    batch = jax.eval_shape(m.prepare_batch, traj, ref, params)
    assert type(batch) is GOPOBatch
    assert (batch.ref_cs_logp is None) is (beta_cs == 0.0)
    assert (batch.ref_expert_logp is None) is (not expert_reference)
    loss, (metrics, new_extras) = jax.eval_shape(m.loss, params, m.init_extras(), batch, jax.random.key(0))
    assert loss.shape == () and set(new_extras) == {"mu"}
    assert ("cs_kl_ref" in metrics) is (beta_cs > 0)
    if beta_cs == 0.0 and not expert_reference:
        # Both off: the reference parameters are never read (no reference forward pass at all).
        free = jax.jit(m.prepare_batch)(traj, None, params)
        assert free.ref_cs_logp is None and free.ref_expert_logp is None
        assert free.scores.shape == (GROUPS * G,) and np.all(np.isfinite(np.asarray(free.scores)))


def test_gopo_reference_off_when_expert_does_not_act(comps, traj):
    c = comps["gopo"]
    m = make_method("gopo", _context(c, _config(use_expert=False, beta_cs=0.0)))
    batch = jax.eval_shape(m.prepare_batch, traj, None, c.init_params(0))
    assert batch.ref_expert_logp is None and batch.ref_cs_logp is None
