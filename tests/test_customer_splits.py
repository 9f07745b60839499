"""Training, validation and test customers are three disjoint sets in every world, and eval.split picks the held-out
one a run evaluates (gopo_jax/envs/customers.py, World.eval_episodes, schedule.eval_customers_key)."""
import types

import jax
import numpy as np
import pytest

from gopo_jax.envs import customers
from gopo_jax.train import build, schedule
from gopo_jax.train.world import HostWorld, JaxWorld
from tests.helpers import tiny_run_config

EVAL_N = 64


def _key_rows(keys) -> set:
    return {tuple(row) for row in np.asarray(jax.random.key_data(keys)).reshape(len(keys), -1).tolist()}


def _config(**eval_keys):
    c = tiny_run_config()
    c.unlock()
    for k, v in eval_keys.items():
        c.eval[k] = v
    c.lock()
    return c


# ----------------------------------------------------------------------------------- the pure-JAX world (keys)


@pytest.mark.parametrize("seed", [0, 10_000])  # 10_000 == eval.seed: the domain tag keeps the roots apart
def test_synthetic_shop_customers_are_disjoint_keys(seed):
    c = _config()
    world = JaxWorld.__new__(JaxWorld)  # the episode helpers read no field of the world
    held_out = {s: _key_rows(world.eval_episodes(c.eval.seed, EVAL_N, s)) for s in customers.EVAL_SPLITS}
    assert all(len(rows) == EVAL_N for rows in held_out.values())
    assert not held_out["validation"] & held_out["test"]
    training = _key_rows(world.episodes(schedule.demo_keys(seed)[0], c.sft.episodes))
    for it in range(c.train.steps):
        training |= _key_rows(world.group_episodes(schedule.iteration_keys(seed, it)[0], c.train.groups,
                                                   c.train.group_size))
    assert not training & (held_out["validation"] | held_out["test"])


def test_eval_split_switches_the_episodes_and_defaults_to_test():
    world = JaxWorld.__new__(JaxWorld)

    def episodes(config):
        return _key_rows(build.Components.eval_episodes(types.SimpleNamespace(world=world, config=config)))

    assert episodes(_config()) == episodes(_config(split="test")) != episodes(_config(split="validation"))


@pytest.mark.parametrize("bad", [{"split": "dev"}, {"split": "train"}, {"seed": -1}])
def test_bad_eval_split_or_seed_is_a_one_line_error(bad):
    with pytest.raises(ValueError, match=r"^bad config: eval\.(split|seed)[^\n]*$"):
        build.validate_config(_config(**bad))


# ------------------------------------------------------------------------------------------ host worlds (seeds)


def test_held_out_seeds_name_their_split_and_lie_above_every_training_seed():
    world = HostWorld.__new__(HostWorld)
    training = world.episodes(jax.random.key(0), 4096)
    for split in customers.EVAL_SPLITS:
        seeds = world.eval_episodes(3, 5, split)
        assert [customers.customer(s) for s in seeds] == [(split, i) for i in range(3, 8)]
        assert seeds.min() >= customers.HELD_OUT_SEED0 > training.max()
    assert [customers.customer(s)[0] for s in training[:3]] == ["train"] * 3
    with pytest.raises(ValueError, match="unknown evaluation split 'dev'"):
        customers.held_out_seeds("dev", 0, 1)


def _played(env, seeds, item) -> list:
    out = []
    for s in seeds:
        env.reset(int(s))
        out.append(item(env))
    return out


def _check_host_world(env, items: dict, item, n_train: int = 300):
    """`items[split]` are the world's customers of each split (ids in play order); training seeds play only training
    items, held-out customer i of a split plays its i-th item, cycling."""
    assert not set(items["train"]) & (set(items["validation"]) | set(items["test"]))
    assert not set(items["validation"]) & set(items["test"])
    training = np.random.default_rng(0).integers(0, customers.HELD_OUT_SEED0, n_train)
    assert set(_played(env, training, item)) <= set(items["train"])
    for split in customers.EVAL_SPLITS:
        size = len(items[split])
        n = min(size, 20)
        assert _played(env, customers.held_out_seeds(split, 0, n), item) == items[split][:n]
        assert _played(env, customers.held_out_seeds(split, size, 2), item) == items[split][:2]  # cycles


@pytest.mark.slow  # builds the MG-ShopDial world (its sentence encoder): over a minute on 2 CPU cores
def test_mgshop_customers_are_disjoint_conversations(shared_data):
    from gopo_jax.envs import mgshop

    env = mgshop.make_env(shared_data / "mgshopdial")
    convs = env._w.conversations
    items = {split: [convs[i].id for i in idx] for split, idx in env._w.customers.items()}
    assert {k: len(v) for k, v in items.items()} == {"train": 33, "validation": 17, "test": 14}
    _check_host_world(env, items, lambda e: e.conversation.id)
    train_replies = {tuple(t.text for t in convs[i].turns) for i in env._w.customers["train"]}
    assert all(tuple(t.reply for t in d.turns) in train_replies for d in env.demonstrations(60, seed=1))


def test_multiwoz_customers_keep_the_official_split(shared_data):
    from gopo_jax.envs import multiwoz

    env = multiwoz.make_env(shared_data / "multiwoz")
    items = {}
    for split in ("train", *customers.EVAL_SPLITS):
        data, goals = env.customer_goals(split)
        assert data.split == ("test" if split == "test" else "val")
        items[split] = [data.goals[i].dialogue_id for i in goals]
    listed = (shared_data / "multiwoz" / "mwz21_convlab3" / "testListFile").read_text().lower().split()
    assert set(items["test"]) == {x.removesuffix(".json") for x in listed}
    _check_host_world(env, items, lambda e: e._ep.goal.dialogue_id, n_train=100)
    # Logged demonstrations: only the training customers' val dialogues (they cycle after those).
    n = len(items["train"])
    demos = env.logged_demonstrations(n + 1, seed=0)
    assert demos[n].to_json() == demos[0].to_json()


def test_tmallbrand_customers_are_disjoint_by_seed_and_facts(shared_data):
    from gopo_jax.envs import tmallbrand

    env = tmallbrand.make_env(shared_data / "abcd")
    n = len(env.data.scenarios)
    facts = {}
    for split in customers.EVAL_SPLITS:
        seeds = customers.held_out_seeds(split, 0, n)
        played = _played(env, seeds, lambda e: (e._ep.scenario.subflow, e._ep.facts["account_id"]))
        assert [subflow for subflow, _ in played] == [s.subflow for s in env.data.scenarios]  # each subflow once
        facts[split] = {account for _, account in played}
    facts["train"] = set(_played(env, range(512), lambda e: e._ep.facts["account_id"]))
    assert not facts["validation"] & facts["test"]
    assert not facts["train"] & (facts["validation"] | facts["test"])
