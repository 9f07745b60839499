"""The shared warm start: its key separates exactly what changes the SFT phase, and a run that reads a warm start
another run wrote ends bitwise where it would have ended computing it itself."""
import json

import pytest

from configs.mgshop import get_config
from gopo_jax.train.driver import train_run, train_seeds
from gopo_jax.train.warm_start import warm_start_key
from tests.helpers import tiny_run_config


def _changed(key: str, value):
    c = get_config()
    with c.unlocked():
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def test_key_ignores_what_follows_the_warm_start():
    base = warm_start_key(get_config(), use_expert=True)
    for key, value in (("method", "memento"), ("train.steps", 3), ("train.lr_cs", 1.0), ("gopo.beta_pref", 0.9),
                       ("eval.episodes", 3), ("sampling.temperature", 0.5), ("baselines.dpo.beta", 1.0),
                       ("sft.cache_dir", "/elsewhere"), ("log.wandb", True)):
        assert warm_start_key(_changed(key, value), use_expert=True) == base, key


def test_key_separates_what_changes_the_warm_start():
    base = warm_start_key(get_config(), use_expert=True)
    assert warm_start_key(get_config(), use_expert=False) != base  # demonstrations without a decision token
    for key, value in (("seed", 1), ("sft.steps", 7), ("sft.noise", 0.1), ("model.hidden_size", 16),
                       ("train.clip_norm", 2.0), ("gopo.sop_mask", False), ("env.name", "mg_shopdial"),
                       ("tokenizer.vocab_size", 600), ("layout.reply_len", 8), ("mesh.fsdp", 2)):
        assert warm_start_key(_changed(key, value), use_expert=True) != base, key


def _config(method: str, cache_dir):
    c = tiny_run_config()
    with c.unlocked():
        c.method = method
        c.sft.steps, c.sft.episodes, c.sft.batch_size = 4, 16, 8
        c.train.steps, c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 1, 2, 4, 1, 1
        c.train.eval_every = c.train.checkpoint_every = 1
        c.eval.episodes = 4
        c.sft.cache_dir = str(cache_dir)
    return c


def _sft_lines(workdir, sft_steps):
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k != "time"} for r in lines
            if r["step"] <= sft_steps and any(k.startswith("sft") for k in r)]


@pytest.mark.slow
def test_a_shared_warm_start_changes_nothing_but_time(tmp_path):
    cache = tmp_path / "warm_starts"
    first = train_run(_config("gopo", cache), tmp_path / "first")
    entries = list(cache.iterdir())
    assert len(entries) == 1 and (entries[0] / "checkpoints").is_dir()
    # The second GOPO run reads the warm start: same SFT metric lines, same final parameters, bit for bit.
    second = train_run(_config("gopo", cache), tmp_path / "second")
    assert second["final_params_sha256"] == first["final_params_sha256"]
    assert _sft_lines(tmp_path / "second", 4) == _sft_lines(tmp_path / "first", 4) != []
    # Another method with the Expert acting shares it too: its SFT evaluation is GOPO's.
    sft = train_run(_config("sft", cache), tmp_path / "sft")
    assert sft["sft"] == first["sft"]
    assert len(list(cache.iterdir())) == 1


@pytest.mark.slow
def test_a_seed_group_reads_and_writes_the_same_cache(tmp_path):
    """The warm-start cache serves both drivers: a vmapped seed group reads what single runs of its seeds wrote (and
    trains nothing in SFT), and single runs read what a group wrote."""
    cache = tmp_path / "warm_starts"
    configs = [_config("gopo", cache) for _ in range(2)]
    for seed, c in enumerate(configs):
        with c.unlocked():
            c.seed = seed
    for i, c in enumerate(configs):
        train_run(c, tmp_path / f"single{i}")
    assert len(list(cache.iterdir())) == 2
    group_dirs = [tmp_path / f"group{i}" for i in range(2)]
    train_seeds(configs, group_dirs, tmp_path / "group_ckpt")
    for i in range(2):
        # Bitwise the single run's lines: read from the cache (a group computing them would round differently).
        assert _sft_lines(group_dirs[i], 4) == _sft_lines(tmp_path / f"single{i}", 4) != []
    # A group that computes its warm starts writes them; a single run then reads its seed's entry.
    other = tmp_path / "other_cache"
    for c in configs:
        with c.unlocked():
            c.sft.cache_dir = str(other)
    train_seeds(configs, [tmp_path / f"g{i}" for i in range(2)], tmp_path / "g_ckpt")
    assert len(list(other.iterdir())) == 2
    train_run(configs[1], tmp_path / "reader")
    assert _sft_lines(tmp_path / "reader", 4) == _sft_lines(tmp_path / "g1", 4)


@pytest.mark.parametrize("damage", ["metrics", "arrays"])
def test_a_damaged_cache_entry_is_set_aside_and_computed_again(tmp_path, damage):
    import jax.numpy as jnp
    import numpy as np

    from gopo_jax.train.warm_start import WarmStartCache

    agents = {"expert": {"w": jnp.arange(6.0).reshape(2, 3)}, "cs": {"w": jnp.ones((4,))}}
    cache = WarmStartCache(tmp_path, "key", {"run": "tiny"})
    cache.store(5, agents, [{"step": 5, "sft/loss": 1.0}])
    if damage == "metrics":
        (cache.dir / "metrics.jsonl").write_text('{"step": 5, "sft/lo')
    else:
        for f in (cache.dir / "checkpoints" / "5").rglob("*"):
            if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
                f.write_bytes(b"\0" * 7)
    assert cache.load(agents) is None
    assert [p.name.split(".corrupt-")[0] for p in tmp_path.iterdir()] == ["key"]  # set aside, not deleted
    assert not cache.dir.exists()
    cache.store(5, agents, [{"step": 5, "sft/loss": 1.0}])  # a fresh entry is written ...
    restored, records = cache.load(agents)  # ... and read
    np.testing.assert_array_equal(restored["expert"]["w"], agents["expert"]["w"])
    assert records == [{"step": 5, "sft/loss": 1.0}]
