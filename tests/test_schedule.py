"""The run's key schedule and step schedule (`gopo_jax.train.schedule`).

The keys are pinned against hand-written `fold_in` chains with the phase tags and index offsets spelled out as
literals: changing any of them changes what a resumed run draws, so it must break a test, not pass silently.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.train import schedule
from gopo_jax.train.build import build
from gopo_jax.train.schedule import Schedule
from tests.helpers import tiny_run_config


def _data(key) -> np.ndarray:
    return np.asarray(jax.random.key_data(key))


def _chain(seed: int, *indices: int):
    key = jax.random.key(seed)
    for i in indices:
        key = jax.random.fold_in(key, i)
    return key


def _same(a, b) -> bool:
    return np.array_equal(_data(a), _data(b))


# --- keys ---

def test_phase_tags_are_pinned():
    assert (schedule.SFT, schedule.METHOD, schedule.EVAL, schedule.DEMO) == (1, 2, 3, 4)


def test_phase_key_distinct_across_phases_and_indices():
    phases = (schedule.SFT, schedule.METHOD, schedule.EVAL, schedule.DEMO)
    combos = list(itertools.product((0, 1), phases, range(6)))
    keys = {tuple(_data(schedule.phase_key(seed, p, i)).tolist()) for seed, p, i in combos}
    assert len(keys) == len(combos)


@pytest.mark.parametrize("seed", [0, 3])
def test_keys_match_hand_written_fold_in_chains(seed):
    assert _same(schedule.phase_key(seed, 3, 5), _chain(seed, 3, 5))
    for it in (0, 1, 7):
        customers, agents = schedule.iteration_keys(seed, it)
        assert _same(customers, _chain(seed, 2, 2 * it))
        assert _same(agents, _chain(seed, 2, 2 * it + 1))
        for epoch in (0, 1, 3):
            assert _same(schedule.epoch_key(seed, it, epoch), _chain(seed, 2, 10_000 + 100 * it + epoch))
    for step in (0, 1, 24, 299):
        assert _same(schedule.sft_batch_key(seed, step), _chain(seed, 1, step))
    assert _same(schedule.state_key(seed, schedule.SFT), _chain(seed, 1, 1_000_000))
    assert _same(schedule.state_key(seed, schedule.METHOD), _chain(seed, 2, 1_000_000))
    demo_customers, demo_agents = schedule.demo_keys(seed)
    assert _same(demo_customers, _chain(seed, 4, 0)) and _same(demo_agents, _chain(seed, 4, 1))
    assert _same(schedule.eval_key(seed), _chain(seed, 3, 0))
    assert _same(schedule.reference_eval_key(seed), _chain(seed, 3, 1))
    assert _same(schedule.extra_params_key(seed), jax.random.key(seed + 7))


def test_iteration_keys_differ_from_each_other_and_from_epoch_keys():
    seen = []
    for it in range(4):
        seen += list(schedule.iteration_keys(0, it))
        seen += [schedule.epoch_key(0, it, e) for e in range(3)]
    seen.append(schedule.state_key(0, schedule.METHOD))
    assert len({tuple(_data(k).tolist()) for k in seen}) == len(seen)


def _all_keys(seed, it, step):
    customers, agents = schedule.iteration_keys(seed, it)
    return jnp.stack([jax.random.key_data(k) for k in (
        customers, agents, schedule.epoch_key(seed, it, 1), schedule.sft_batch_key(seed, step),
        schedule.phase_key(seed, schedule.EVAL, step), schedule.state_key(seed, schedule.METHOD),
        *schedule.demo_keys(seed), schedule.eval_key(seed))])


def test_traced_seed_under_jit_equals_eager():
    eager = _all_keys(5, 3, 11)
    traced = jax.jit(_all_keys)(jnp.int32(5), jnp.int32(3), jnp.int32(11))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))


def test_traced_seed_under_vmap_equals_eager():
    seeds = [0, 1, 6]
    batched = jax.jit(jax.vmap(_all_keys, in_axes=(0, None, None)))(jnp.asarray(seeds, jnp.int32), jnp.int32(2),
                                                                     jnp.int32(4))
    for i, s in enumerate(seeds):
        np.testing.assert_array_equal(np.asarray(batched[i]), np.asarray(_all_keys(s, 2, 4)))
    # and the seeds really are different draws
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[1]))


def test_traced_index_under_scan_equals_eager():
    """The SFT block scans over step indices; each step's key is the eager one of that step."""
    def body(carry, i):
        return carry, jax.random.key_data(schedule.sft_batch_key(carry, i))

    _, keys = jax.lax.scan(body, jnp.int32(2), jnp.arange(3, 6, dtype=jnp.int32))
    for row, step in zip(np.asarray(keys), range(3, 6)):
        np.testing.assert_array_equal(row, _data(schedule.sft_batch_key(2, step)))


# --- step schedule ---

def test_sft_block_end():
    s = Schedule(sft_steps=60, method_steps=10, eval_every=2, checkpoint_every=3)
    assert [s.sft_block_end(x) for x in (0, 1, 24, 25, 49, 50, 59)] == [25, 25, 25, 50, 50, 60, 60]
    assert schedule.SFT_HELDOUT_EVERY == 25


def test_sft_block_end_short_warm_start():
    s = Schedule(sft_steps=10, method_steps=0, eval_every=1, checkpoint_every=1)
    assert s.sft_block_end(0) == 10 and s.sft_block_end(9) == 10


def test_evaluates_and_saves_after():
    s = Schedule(sft_steps=3, method_steps=5, eval_every=2, checkpoint_every=3)
    assert s.total == 8
    steps = range(4, 9)  # the ends of method iterations 0..4
    assert [x for x in steps if s.evaluates_after(x)] == [5, 7, 8]  # every 2nd iteration, and always the last
    assert [x for x in steps if s.saves_after(x)] == [6, 8]


def test_evaluates_after_last_step_when_it_is_on_the_grid():
    s = Schedule(sft_steps=0, method_steps=4, eval_every=2, checkpoint_every=4)
    assert [x for x in range(1, 5) if s.evaluates_after(x)] == [2, 4]
    assert [x for x in range(1, 5) if s.saves_after(x)] == [4]


def test_from_config_total():
    c = tiny_run_config()
    with c.unlocked():
        c.sft.steps, c.train.steps, c.train.eval_every, c.train.checkpoint_every = 7, 5, 2, 3
    trained = Schedule.from_config(c, trains=True)
    assert (trained.sft_steps, trained.method_steps, trained.eval_every, trained.checkpoint_every) == (7, 5, 2, 3)
    assert trained.total == 12
    untrained = Schedule.from_config(c, trains=False)
    assert untrained.method_steps == 0 and untrained.total == 7
    assert untrained.evaluates_after(7) and untrained.saves_after(7)


def test_components_schedule_of_non_training_method(tmp_path):
    c = tiny_run_config()
    with c.unlocked():
        c.method = "sft"
        c.sft.steps, c.train.steps = 9, 4
    comps = build(c, tmp_path)
    assert not comps.method.trains
    assert comps.schedule.total == 9
