"""Tests for gopo_jax.train.step / state: sharded SFT parity with one device, the non-finite guard, extras,
per-group learning rates and minibatch splitting."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gopo_jax import parallel
from gopo_jax.algorithms.sft import make_sft_loss_fn
from gopo_jax.models import qwen3
from gopo_jax.train.state import TrainState, create_train_state
from gopo_jax.train.step import make_optimizer, make_train_step, split_minibatches


def _sft_batches(num, batch=8, length=16, vocab=512, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(num):
        valid = rs.rand(batch, length) > 0.2  # pads in the middle, as in dialogue slot buffers
        out.append(dict(tokens=rs.randint(0, vocab, (batch, length)).astype(np.int32), valid=valid,
                        loss_mask=valid & (rs.rand(batch, length) > 0.3)))
    return out


def _run_sft(mesh_cfg, devices, batches, pin_shardings):
    model = qwen3.Qwen3(qwen3.get_config("tiny"), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    # SGD: linear in the gradient, so sharded vs single-device differences stay at fp32 reduction-order noise.
    # (Adam divides by sqrt(v): on near-zero gradients that noise flips signs and reaches lr-sized updates,
    # which would test Adam's conditioning, not the sharding.)
    tx = optax.sgd(0.5, momentum=0.9)
    mesh = parallel.make_mesh(mesh_cfg, devices=devices)
    state = parallel.shard_params(create_train_state(params, tx), mesh)
    shardings = parallel.param_shardings(state, mesh) if pin_shardings else None
    step = make_train_step(make_sft_loss_fn(graphdef), tx, mesh=mesh, state_shardings=shardings)
    losses = []
    for batch in batches:
        state, metrics = step(state, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        assert int(metrics["nonfinite"]) == 0
    return np.array(losses), state


@pytest.fixture(scope="module")
def single_device_run():
    batches = _sft_batches(1) * 3  # one batch thrice, so the loss must fall
    return batches, _run_sft({"data": 1}, jax.devices()[:1], batches, pin_shardings=True)


@pytest.mark.parametrize("mesh_cfg,pin", [({"data": 2, "fsdp": 4}, True), ({"data": 2, "fsdp": 2, "tensor": 2}, False)])
def test_sharded_sft_step_matches_single_device(single_device_run, mesh_cfg, pin):
    batches, (losses_1, state_1) = single_device_run
    losses_8, state_8 = _run_sft(mesh_cfg, jax.devices(), batches, pin_shardings=pin)
    np.testing.assert_allclose(losses_8, losses_1, atol=1e-5, rtol=0)
    assert losses_1[-1] < losses_1[0]  # it trains
    param_diff = max(float(jnp.max(jnp.abs(jax.device_get(a) - jax.device_get(b))))
                     for a, b in zip(jax.tree.leaves(state_8.params), jax.tree.leaves(state_1.params)))
    print(f"mesh {mesh_cfg}: max |loss diff| {np.max(np.abs(losses_8 - losses_1)):.2e}, "
          f"max |param diff| {param_diff:.2e}")
    assert param_diff < 1e-5
    # Parameters really are laid out by their annotations (the stacked q_proj kernel: (layer, "fsdp", "tensor")).
    kernel = state_8.params["layers"]["self_attn"]["q_proj"]["kernel"][...]
    expected = jax.sharding.NamedSharding(kernel.sharding.mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor"))
    assert kernel.sharding.is_equivalent_to(expected, kernel.ndim)  # a size-1 axis may be dropped from the spec
    assert int(state_8.step) == len(batches)


def _toy_loss(params, extras, batch, rng):
    """Quadratic in each group, with sqrt(|w|) so that w = 0 gives a finite loss but an infinite gradient."""
    del rng
    x = batch["x"]
    loss = sum(jnp.mean((params[g]["w"] - x) ** 2) for g in sorted(params))
    loss = loss + jnp.mean(batch["sqrt_weight"]) * jnp.sum(jnp.sqrt(jnp.abs(params["expert"]["w"])))
    new_extras = {"mu": extras["mu"] + 1.0}
    return loss, ({"x_mean": jnp.mean(x)}, new_extras)


def _toy_state(tx):
    params = {"expert": {"w": jnp.ones(4)}, "cs": {"w": jnp.ones(4)}}
    return create_train_state(params, tx, extras={"mu": 0.0})


def _toy_batch(x=0.0, sqrt_weight=0.0):
    return {"x": jnp.full((8, 4), x, jnp.float32), "sqrt_weight": jnp.full((8,), sqrt_weight, jnp.float32)}


def test_per_group_learning_rates_differ():
    tx = make_optimizer({"expert": 0.1, "cs": {"learning_rate": 0.01}}, clip_norm=None)
    mesh = parallel.make_mesh({"data": -1})
    step = make_train_step(_toy_loss, tx, mesh=mesh, donate=False)
    state, _ = step(_toy_state(tx), _toy_batch())
    # First Adam step moves every coordinate by lr * sign(grad) (up to eps): grad of mean((w - 0)^2) > 0.
    np.testing.assert_allclose(state.params["expert"]["w"], 1.0 - 0.1, atol=1e-6)
    np.testing.assert_allclose(state.params["cs"]["w"], 1.0 - 0.01, atol=1e-6)


def test_make_optimizer_rejects_mismatched_groups():
    tx = make_optimizer({"expert": 0.1, "policy": 0.1})
    with pytest.raises(ValueError, match="must equal the optimizer groups"):
        tx.init({"expert": {"w": jnp.ones(2)}, "cs": {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer({"expert": {"lr": 0.1}})


def test_nonfinite_loss_or_grad_skips_update_and_reports():
    tx = make_optimizer({"expert": 0.1, "cs": 0.1})
    mesh = parallel.make_mesh({"data": -1})
    step = make_train_step(_toy_loss, tx, mesh=mesh)
    state = _toy_state(tx)

    state, m = step(state, _toy_batch(x=0.0))
    assert int(m["nonfinite"]) == 0 and float(state.extras["mu"]) == 1.0
    good_params = jax.device_get(state.params)
    good_count = jax.device_get(state.opt_state)

    state, m = step(state, _toy_batch(x=np.nan))  # NaN loss
    assert int(m["nonfinite"]) == 1 and np.isnan(float(m["loss"]))
    assert int(state.step) == 2
    assert float(state.extras["mu"]) == 1.0  # extras update skipped too
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), good_params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), good_count)

    # Finite loss, infinite gradient: d sqrt|w| / dw at w = 0.
    state = state.replace(params={**state.params, "expert": {"w": jnp.zeros(4)}})
    state, m = step(state, _toy_batch(x=0.0, sqrt_weight=1.0))
    assert int(m["nonfinite"]) == 1 and np.isfinite(float(m["loss"])) and not np.isfinite(float(m["grad_norm"]))
    np.testing.assert_array_equal(state.params["expert"]["w"], 0.0)
    assert np.all(np.isfinite(jax.device_get(state.params["cs"]["w"])))

    state = state.replace(params={**state.params, "expert": {"w": jnp.ones(4)}})
    state, m = step(state, _toy_batch(x=1.0))  # recovers on the next good batch
    assert int(m["nonfinite"]) == 0 and float(state.extras["mu"]) == 2.0


def test_extras_structure_must_be_preserved():
    def bad_loss(params, extras, batch, rng):
        loss, (metrics, _) = _toy_loss(params, extras, batch, rng)
        return loss, (metrics, {"nu": jnp.zeros(())})

    tx = make_optimizer({"expert": 0.1, "cs": 0.1})
    step = make_train_step(bad_loss, tx, mesh=parallel.make_mesh({"data": -1}))
    with pytest.raises(ValueError, match="same keys"):
        step(_toy_state(tx), _toy_batch())


def test_create_train_state_defaults_and_rng_check():
    tx = optax.sgd(0.1)
    state = create_train_state({"w": jnp.ones(2)}, tx)
    assert isinstance(state, TrainState) and state.step.dtype == jnp.int32 and int(state.step) == 0
    assert state.extras == {}
    with pytest.raises(TypeError, match="typed key"):
        create_train_state({"w": jnp.ones(2)}, tx, rng=jax.random.PRNGKey(0))


def test_split_minibatches_is_strided():
    batch = {"a": jnp.arange(6), "b": jnp.arange(12).reshape(6, 2)}
    mb = split_minibatches(batch, 2)
    np.testing.assert_array_equal(mb["a"], [[0, 2, 4], [1, 3, 5]])
    np.testing.assert_array_equal(mb["b"][1], [[2, 3], [6, 7], [10, 11]])
    with pytest.raises(ValueError, match="not divisible"):
        split_minibatches(batch, 4)
