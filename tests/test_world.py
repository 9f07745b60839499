"""gopo_jax/train/world.py: `build_world` for both kinds of world, the tokenizer kept across a resume, the episode
helpers, and the errors for a wrong env.name."""
import jax
import numpy as np
import pytest

from configs.tmallbrand import get_config as tmallbrand_config
from gopo_jax.envs import customers
from gopo_jax.train.world import HostWorld, JaxWorld, build_world
from tests.helpers import tiny_run_config

TEXT = "Hello! I am looking for a pair of boots, could you help me with my order?"


def _host_config(shared_data):
    c = tmallbrand_config()
    c.unlock()
    c.env.data_dir = str(shared_data / "abcd")
    c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 1, 64
    c.layout.max_turns = 6
    c.lock()
    return c


def _with_env(config, name):
    config.unlock()
    config.env.name = name
    config.lock()
    return config


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("shop")
    return workdir, build_world(tiny_run_config(), workdir)


@pytest.fixture(scope="module")
def host(shared_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("host")
    return workdir, build_world(_host_config(shared_data), workdir)


def test_synthetic_shop_is_a_pure_jax_world(shop):
    _, world = shop
    assert isinstance(world, JaxWorld) and world.kind == "jax" and world.spec.name == "synthetic_shop"
    env = world.env
    assert (world.layout.context_len, world.layout.customer_len, world.layout.reply_len, world.layout.header_len,
            world.layout.max_turns) == (env.context_len, env.customer_len, env.reply_len, 2,
                                        world.spec.max_turns)
    assert world.tokenizer is env.tokenizer
    assert world.model_config.vocab_size % 64 == 0 and world.model_config.vocab_size >= len(world.tokenizer)
    assert len(world.vocab.strategy_ids) == world.spec.num_strategies
    assert len(world.vocab.stage_ids) == world.spec.sop.num_stages


def test_host_world_trains_its_tokenizer_with_the_world_tokens(host):
    _, world = host
    assert isinstance(world, HostWorld) and world.kind == "host" and world.spec.name == "tmallbrand"
    assert world.layout.max_turns == 6 and world.layout.context_len == 32
    # TmallBrand's automaton changes per subflow: positional stage tokens cover the longest one.
    assert len(world.vocab.stage_ids) == len(world.env.stage_names()) >= world.spec.sop.num_stages
    ids = {*world.vocab.strategy_ids, *world.vocab.stage_ids, *world.vocab.header_open, world.vocab.eot, world.vocab.pad}
    assert len(ids) == len(world.vocab.strategy_ids) + len(world.vocab.stage_ids) + 3  # all distinct tokens
    assert max(ids) < world.model_config.vocab_size


@pytest.mark.parametrize("which", ["shop", "host"])
def test_resume_reloads_the_saved_tokenizer(which, shop, host, shared_data):
    workdir, world = shop if which == "shop" else host
    assert (workdir / "tokenizer" / "tokenizer.json").exists()
    config = tiny_run_config() if which == "shop" else _host_config(shared_data)
    again = build_world(config, workdir)
    assert again.tokenizer is not world.tokenizer  # read back from the workdir, not rebuilt in memory
    assert again.tokenizer.encode(TEXT) == world.tokenizer.encode(TEXT)
    assert again.vocab == world.vocab and again.model_config == world.model_config


def test_unknown_and_renamed_env_names_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown env.name 'nowhere'; known worlds: \['synthetic_shop', "
                                         r"'mg_shopdial'"):
        build_world(_with_env(tiny_run_config(), "nowhere"), tmp_path)
    with pytest.raises(ValueError, match=r"'mgshop' was renamed to 'mg_shopdial'.*--config.env.name=mg_shopdial"):
        build_world(_with_env(tiny_run_config(), "mgshop"), tmp_path)
    assert not (tmp_path / "tokenizer").exists()  # nothing written for a config that names no world


def test_missing_host_data_names_the_config_key(tmp_path):
    c = _host_config(tmp_path)  # tmp_path/abcd does not exist
    with pytest.raises(FileNotFoundError, match=r"abcd: not found.*README.md.*--config.env.data_dir"):
        build_world(c, tmp_path / "run")


def test_jax_episodes_are_keys_repeated_per_group(shop):
    _, world = shop
    key = jax.random.key(3)
    eps = world.episodes(key, 5)
    assert eps.shape == (5,) and len({tuple(np.asarray(jax.random.key_data(k)).tolist()) for k in eps}) == 5
    groups = world.group_episodes(key, 3, 4)
    data = np.asarray(jax.random.key_data(groups)).reshape(3, 4, -1)
    assert groups.shape == (12,)
    assert (data == data[:, :1]).all() and len({tuple(g[0]) for g in data}) == 3
    np.testing.assert_array_equal(data[:, 0], np.asarray(jax.random.key_data(eps[:3])))
    ev = world.eval_episodes(7, 4)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(ev)),
                                  np.asarray(jax.random.key_data(world.eval_episodes(7, 4))))


def test_host_episodes_are_seeds_repeated_per_group(host):
    _, world = host
    key = jax.random.key(3)
    seeds = world.episodes(key, 5)
    assert seeds.shape == (5,) and np.issubdtype(seeds.dtype, np.integer) and len(set(seeds.tolist())) == 5
    groups = world.group_episodes(key, 3, 4)
    assert groups.shape == (12,)
    np.testing.assert_array_equal(groups.reshape(3, 4), np.repeat(seeds[:3, None], 4, axis=1))
    # Held-out customers 100..102 of the test split (gopo_jax/envs/customers.py), above every training seed.
    held_out = world.eval_episodes(100, 3)
    assert [customers.customer(s) for s in held_out] == [("test", 100), ("test", 101), ("test", 102)]
    assert held_out.min() >= customers.HELD_OUT_SEED0 > seeds.max()


def test_host_world_rejects_the_habit_demonstrator(host):
    _, world = host
    assert world.demo_agents(0.3, True).noise == 0.3
    with pytest.raises(ValueError, match="sft.noise_kind='habit' exists only for the synthetic shop"):
        world.demo_agents(0.3, True, kind="habit")
