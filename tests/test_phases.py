"""The pure phase functions (`gopo_jax.train.phases`): minibatches of whole groups, the demonstration split, the
warm-start block (eager = jitted), one GOPO iteration jitted end to end, and the update sharded over the 8-device
mesh = unsharded."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax import parallel
from gopo_jax.train.build import build
from gopo_jax.train.build import demo_split
from gopo_jax.train.phases import Phases, group_minibatches
from tests.helpers import tiny_run_config

GROUPS, G, MINIBATCHES, EPOCHS = 8, 2, 2, 2  # 8 rows per minibatch: one per fake device


def _config():
    c = tiny_run_config()
    with c.unlocked():
        c.sft.episodes, c.sft.batch_size = 16, 8
        c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = GROUPS, G, MINIBATCHES, EPOCHS
        c.eval.episodes = 8
    return c


def _max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x).astype(np.float64) - np.asarray(y).astype(np.float64)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# --- group_minibatches ---

def _rows_batch(groups, g):
    n = groups * g
    return {"row": jnp.arange(n), "x": jnp.arange(n * 3, dtype=jnp.float32).reshape(n, 3), "y": -jnp.arange(n)}


@pytest.mark.parametrize("groups, g, num", [(6, 3, 2), (6, 3, 3), (8, 2, 2), (4, 4, 1), (4, 2, 4)])
def test_group_minibatches_whole_contiguous_groups(groups, g, num):
    batch = _rows_batch(groups, g)
    for seed in range(3):
        perm = jax.random.permutation(jax.random.key(seed), groups)
        out = group_minibatches(batch, perm, g, num)
        rows = np.asarray(out["row"])
        assert rows.shape == (num, groups * g // num)
        assert out["x"].shape == (num, groups * g // num, 3)
        # every row exactly once
        np.testing.assert_array_equal(np.sort(rows.reshape(-1)), np.arange(groups * g))
        # each minibatch is whole groups, each group's rows contiguous and in order
        chunks = rows.reshape(num, -1, g)
        np.testing.assert_array_equal(chunks % g, np.broadcast_to(np.arange(g), chunks.shape))
        group_ids = chunks[..., 0] // g
        assert np.all(chunks // g == group_ids[..., None])
        # minibatch k holds groups perm[k], perm[k + num], ...
        np.testing.assert_array_equal(group_ids, np.asarray(perm).reshape(-1, num).T)
        # the other leaves follow the same rows
        np.testing.assert_array_equal(np.asarray(out["x"]), np.asarray(batch["x"])[rows])
        np.testing.assert_array_equal(np.asarray(out["y"]), -rows)


def test_group_minibatches_jitted_equals_eager():
    batch = _rows_batch(8, 2)
    perm = jax.random.permutation(jax.random.key(4), 8)
    eager = group_minibatches(batch, perm, 2, 2)
    jitted = jax.jit(group_minibatches, static_argnums=(2, 3))(batch, perm, 2, 2)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_group_minibatches_identity_permutation():
    out = group_minibatches(_rows_batch(4, 2), jnp.arange(4), 2, 2)
    np.testing.assert_array_equal(np.asarray(out["row"]), [[0, 1, 4, 5], [2, 3, 6, 7]])


# --- demo_split ---

@pytest.mark.parametrize("episodes, fraction, expected", [
    (16, 0.125, (14, 2)), (512, 0.125, (448, 64)), (4, 0.125, (3, 1)), (100, 0.1, (90, 10)), (10, 0.5, (5, 5)),
    (8, 0.01, (7, 1)),  # at least one held-out demonstration
])
def test_demo_split(episodes, fraction, expected):
    c = _config()
    with c.unlocked():
        c.sft.episodes, c.sft.heldout_fraction = episodes, fraction
    assert demo_split(c) == expected
    assert sum(demo_split(c)) == episodes


# --- the phases on the tiny world ---

@pytest.fixture(scope="module")
def comps(tmp_path_factory):
    return build(_config(), tmp_path_factory.mktemp("phases"))


@pytest.fixture(scope="module")
def demos(comps):
    """(train, held-out) demonstrations of seed 0, and the jitted function that draws them."""
    draw = jax.jit(Phases(comps).demonstrations)
    return draw(0), draw


def test_demonstrations_split_and_seeded(comps, demos):
    (train, held), draw = demos
    n_train, n_held = demo_split(comps.config)
    assert train.tokens.shape[0] == n_train == 14 and held.tokens.shape[0] == n_held == 2
    assert np.asarray(train.turn_mask).any() and np.asarray(held.turn_mask).any()
    # scripted demonstrations name the Expert's strategy on every turn that happened (GOPO's Expert acts)
    assert np.all(np.asarray(train.strategy)[np.asarray(train.turn_mask)] >= 0)
    again, _ = draw(0)
    assert _max_diff(again, train) == 0.0
    other, _ = draw(1)
    assert not np.array_equal(np.asarray(other.tokens), np.asarray(train.tokens))


@pytest.fixture(scope="module")
def sft_runs(comps, demos):
    (train, _), _ = demos
    p = Phases(comps)
    params = comps.init_params(0)
    batch_size = comps.sft_batch_size(train.tokens.shape[0])
    state = p.sft_state(params, comps.method.init_extras(), 0)
    steps = jnp.arange(0, 2, dtype=jnp.int32)
    eager = p.sft_block(state, train, 0, steps, batch_size)
    block = jax.jit(p.sft_block, static_argnums=4)
    jitted = block(state, train, 0, steps, batch_size)
    later = block(state, train, 0, steps + 5, batch_size)
    return params, batch_size, eager, jitted, later


def test_sft_block_eager_equals_jitted(sft_runs):
    params, batch_size, (s_eager, m_eager), (s_jit, m_jit), _ = sft_runs
    assert batch_size == 8
    assert _max_diff(s_eager.params, s_jit.params) <= 1e-6
    assert int(s_eager.step) == int(s_jit.step) == 2
    assert set(m_eager) == set(m_jit) and {"loss", "grad_norm", "nonfinite"} <= set(m_jit)
    for k in m_jit:
        assert np.shape(m_jit[k]) == np.shape(m_eager[k]) == (2,), k
        np.testing.assert_allclose(np.asarray(m_eager[k]), np.asarray(m_jit[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert np.all(np.isfinite(np.asarray(m_jit["loss"]))) and not np.any(np.asarray(m_jit["nonfinite"]))
    # the block trained both agents (and so is not a no-op)
    assert _max_diff(s_jit.params["expert"], params["expert"]) > 0
    assert _max_diff(s_jit.params["cs"], params["cs"]) > 0


def test_sft_block_draws_its_steps_batches(sft_runs):
    """Steps 5, 6 draw other demonstrations than steps 0, 1: the batch key is the step's, not the block's."""
    _, _, _, (s_jit, m_jit), (s_later, m_later) = sft_runs
    assert _max_diff(s_jit.params, s_later.params) > 0
    assert not np.allclose(np.asarray(m_jit["loss"]), np.asarray(m_later["loss"]))


def _method_state(comps, p, seed=0):
    params = comps.init_params(seed)
    return p.method_state(params, comps.method.init_extras(), seed), jax.tree.map(jnp.copy, params)


@pytest.mark.slow  # compiles a whole iteration (rollout + update): ~30 s cold on 2 cores
def test_iteration_jitted(comps):
    p = Phases(comps, mesh=comps.mesh)
    state, ref = _method_state(comps, p)
    state = parallel.shard_params(state, comps.mesh)
    start = jax.tree.map(jnp.copy, state.params)
    new, stats, rollout = jax.jit(p.iteration)(state, ref, 0, 0)
    assert stats and all(np.shape(v) == (EPOCHS, MINIBATCHES) for v in stats.values()), \
        {k: np.shape(v) for k, v in stats.items()}
    assert {"loss", "grad_norm", "nonfinite", "loss_expert", "loss_cs", "mu"} <= set(stats)
    assert all(np.all(np.isfinite(np.asarray(v))) for v in stats.values())
    assert not np.any(np.asarray(stats["nonfinite"]))
    assert rollout and all(np.shape(v) == (GROUPS * G,) for v in rollout.values()), \
        {k: np.shape(v) for k, v in rollout.items()}
    assert {"tse", "gre", "esndcg"} <= set(rollout)
    assert int(new.step) == EPOCHS * MINIBATCHES
    assert _max_diff(new.params["cs"], start["cs"]) > 0
    # μ starts at mu_init and the first minibatch reports it
    np.testing.assert_allclose(np.asarray(stats["mu"])[0, 0], comps.config.gopo.mu_init)


@pytest.mark.slow  # compiles the update twice (sharded and not): ~30 s cold on 2 cores
def test_update_sharded_equals_unsharded(comps, demos):
    """One update (2 epochs x 2 minibatches) on a fixed batch: laid out on the 8-device mesh = no layouts."""
    (train, held), _ = demos
    traj = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), held, train)  # 16 = GROUPS * G rows
    assert traj.tokens.shape[0] == GROUPS * G
    sharded, plain = Phases(comps, mesh=comps.mesh), Phases(comps)
    state, ref = _method_state(comps, plain)
    s_plain, st_plain, m_plain = jax.jit(plain.update)(state, ref, traj, 0, 0)
    s_mesh, st_mesh, m_mesh = jax.jit(sharded.update)(parallel.shard_params(state, comps.mesh), ref, traj, 0, 0)
    assert _max_diff(s_plain.params, s_mesh.params) <= 1e-5
    assert _max_diff(s_plain.extras, s_mesh.extras) <= 1e-5
    assert _max_diff(s_plain.params, state.params) > 1e-4  # the update moved the parameters
    for k in st_plain:
        assert np.shape(st_plain[k]) == (EPOCHS, MINIBATCHES), k
        if k.endswith("preference_accuracy"):
            # A count of `ell_i > ell_j` over pairs: while the policy still equals the reference every ell is 0 up
            # to rounding, and the two layouts round differently (a tie is a coin flip, not a difference).
            assert np.all((np.asarray(st_mesh[k]) >= 0) & (np.asarray(st_mesh[k]) <= 1)), k
            continue
        np.testing.assert_allclose(np.asarray(st_mesh[k]), np.asarray(st_plain[k]), rtol=1e-4, atol=1e-5, err_msg=k)
    for k in m_plain:
        np.testing.assert_allclose(np.asarray(m_mesh[k]), np.asarray(m_plain[k]), rtol=1e-6, atol=1e-6, err_msg=k)
    # the sharded state keeps its layout on the mesh
    leaf = jax.tree.leaves(s_mesh.params)[0]
    assert leaf.sharding.mesh.shape == comps.mesh.shape
