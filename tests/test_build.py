"""`build(config, workdir)`: config validation, the frozen `Components`, seeded initial parameters, the warm-start
optimizer, the tokenizer kept in the workdir and the checkpoint fingerprint."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import optax
import pytest

from gopo_jax.train.build import Components, agent_params, build, model_fingerprint
from gopo_jax.train.report import params_hash
from tests.helpers import tiny_run_config


def _config(**overrides):
    """The tiny synthetic-shop config with dotted-key overrides, e.g. `_config(**{"train.epochs": 0})`."""
    c = tiny_run_config()
    with c.unlocked():
        c.sft.episodes, c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 16, 8, 2, 2, 1
        c.eval.episodes = 8
        for dotted, value in overrides.items():
            *path, leaf = dotted.split(".")
            node = c
            for p in path:
                node = node[p]
            node[leaf] = value
    return c


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("build")


@pytest.fixture(scope="module")
def comps(workdir):
    return build(_config(method="ppo"), workdir)


# --- validation ---

@pytest.mark.parametrize("overrides, key", [
    ({"train.groups": 3, "train.minibatches": 2}, "train.groups"),
    ({"train.groups": 6, "train.minibatches": 4}, "train.minibatches"),
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.group_size": 1}, "train.group_size"),
    ({"train.steps": -1}, "train.steps"),
    ({"train.eval_every": 0}, "train.eval_every"),
    ({"gopo.expert_loss": "x"}, "gopo.expert_loss"),
    ({"gopo.aggregation": "sum"}, "gopo.aggregation"),
    ({"gopo.esndcg_p": 0.0}, "gopo.esndcg_p"),
    ({"sft.noise": 1.5}, "sft.noise"),
    ({"sft.heldout_fraction": 1.0}, "sft.heldout_fraction"),
    ({"eval.episodes": 0}, "eval.episodes"),
])
def test_bad_config_raises_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        build(_config(**overrides), tmp_path)
    # Validation comes first: nothing (not even the tokenizer) was written.
    assert not (tmp_path / "tokenizer").exists()


def test_unknown_method_raises(tmp_path):
    with pytest.raises(ValueError, match="config.method"):
        build(_config(method="nope"), tmp_path)


# --- the components ---

def test_components_are_frozen(comps):
    assert isinstance(comps, Components)
    with pytest.raises(dataclasses.FrozenInstanceError):
        comps.method = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        comps.config = None


def test_components_describe_the_config(comps):
    assert comps.method.name == "ppo"
    assert comps.pure_world and comps.world.kind == "jax"
    assert comps.mesh.size == len(jax.devices()) == 8
    assert comps.hyper.group_size == 2 and comps.hyper.expert_loss == comps.config.gopo.expert_loss
    assert comps.schedule.total == comps.config.sft.steps + comps.config.train.steps


def test_init_params_deterministic_and_seeded(comps):
    p0, p0_again, p1 = comps.init_params(0), comps.init_params(0), comps.init_params(1)
    assert set(p0) == {"expert", "cs", "value"}
    assert params_hash(p0) == params_hash(p0_again)
    assert params_hash(p0) != params_hash(p1)
    for k in p0:  # every group depends on the seed, the method's own model included
        assert params_hash(p0[k]) != params_hash(p1[k]), k
    assert params_hash(p0["expert"]) != params_hash(p0["cs"])
    assert jax.tree.structure(p0["expert"]) == jax.tree.structure(p0["cs"])
    assert set(agent_params(p0)) == {"expert", "cs"}


def test_sft_batch_size_rounds_to_the_mesh(comps):
    size = comps.config.sft.batch_size
    assert comps.mesh.size == 8 and size == 32
    assert comps.sft_batch_size(100) == 32  # the configured size (a multiple of 8)
    assert comps.sft_batch_size(14) == 8  # at most the demonstrations, rounded down to a multiple of the mesh
    assert comps.sft_batch_size(31) == 24
    assert comps.sft_batch_size(8) == 8
    for n in (8, 9, 17, 30, 33, 100):
        assert comps.sft_batch_size(n) % 8 == 0 and comps.sft_batch_size(n) <= min(n, size)


def test_sft_batch_size_of_an_odd_configured_size(workdir):
    c = build(_config(**{"sft.batch_size": 20}), workdir)
    assert c.sft_batch_size(1000) == 16


def _random_like(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _max_change(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _one_update(tx, params, grads):
    """params after one optimizer step on `grads` (jitted: eager optax over every leaf is slow)."""
    @jax.jit
    def step(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    return step(params, grads)


def test_sft_optimizer_moves_only_the_agents(comps):
    params = comps.init_params(0)
    grads = _random_like(params, 1)
    new = _one_update(comps.sft_tx, params, grads)
    assert _max_change(new["value"], params["value"]) == 0.0
    assert _max_change(new["expert"], params["expert"]) > 0.0
    assert _max_change(new["cs"], params["cs"]) > 0.0
    # the method's optimizer, by contrast, trains the value model (and freezes PPO's unused Expert)
    new = _one_update(comps.tx, params, grads)
    assert _max_change(new["value"], params["value"]) > 0.0
    assert _max_change(new["cs"], params["cs"]) > 0.0
    assert _max_change(new["expert"], params["expert"]) == 0.0


def test_optimizers_reject_params_of_another_method(comps):
    with pytest.raises(ValueError, match="optimizer groups"):
        comps.tx.init(agent_params(comps.init_params(0)))  # PPO's optimizer needs "value" too


def test_tokenizer_kept_in_workdir(comps, workdir):
    saved = workdir / "tokenizer" / "tokenizer.json"
    assert saved.exists()
    text = saved.read_text()
    again = build(_config(method="gopo"), workdir)
    assert saved.read_text() == text  # reloaded, not rewritten
    assert again.world.vocab == comps.world.vocab
    assert len(again.world.tokenizer) == len(comps.world.tokenizer)
    assert again.world.tokenizer.get_vocab() == comps.world.tokenizer.get_vocab()
    assert again.world.model_config == comps.world.model_config


def test_model_fingerprint(comps):
    fp = model_fingerprint(comps.world)
    assert fp == comps.fingerprint()
    assert set(fp) == {"model_config", "expert_config", "env", "layout", "strategies"}
    assert fp["expert_config"] == fp["model_config"]  # one preset for both agents
    assert fp["env"] == "synthetic_shop"
    mc = fp["model_config"]
    assert (mc["hidden_size"], mc["num_layers"], mc["intermediate_size"]) == (32, 1, 64)
    assert mc["vocab_size"] % 64 == 0 and mc["vocab_size"] >= len(comps.world.tokenizer)
    assert fp["layout"] == dataclasses.asdict(comps.world.layout)
    assert fp["strategies"] == list(comps.world.spec.strategies) and len(fp["strategies"]) == len(
        comps.world.vocab.strategy_ids)
    # checkpoint metadata: JSON round trip without loss
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_changes_with_the_model(workdir, comps):
    wider = build(_config(**{"model.hidden_size": 64}), workdir)
    assert wider.fingerprint()["model_config"]["hidden_size"] == 64
    assert wider.fingerprint() != comps.fingerprint()
    # ...but not with the method (the agents are the same models)
    assert build(_config(method="grpo"), workdir).fingerprint() == comps.fingerprint()

