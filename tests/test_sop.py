"""Tests for gopo_jax/dialogue/sop.py: JSON loading, validation errors, and the pure-JAX automaton."""
import copy
import json
import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from gopo_jax.dialogue.sop import UNRECOGNISED, SOPError, load_sop, masked_strategy_log_softmax, sop_from_dict
from gopo_jax.envs.synthetic_shop import SOP_PATH

GOOD = {
    "name": "mini",
    "strategies": ["greet", "ask", "sell"],
    "initial": "open",
    "stages": [
        {"name": "open", "allowed": ["greet"], "next": {"greet": "talk"}},
        {"name": "talk", "allowed": ["ask", "sell"], "next": {"sell": "end"}},
        {"name": "end", "allowed": [], "terminal": True},
    ],
}


def bad(**changes):
    data = copy.deepcopy(GOOD)
    data.update(changes)
    return data


def test_loads_the_shop_sop_and_round_trips():
    sop = load_sop(SOP_PATH)
    assert sop.num_strategies >= 8 and sop.stages[sop.initial] == "opening"
    assert sop.allowed.any(axis=1).all()
    again = sop_from_dict(sop.to_json())
    np.testing.assert_array_equal(again.allowed, sop.allowed)
    np.testing.assert_array_equal(again.transition, sop.transition)


def test_arrays_hand_computed():
    sop = sop_from_dict(GOOD)
    np.testing.assert_array_equal(sop.allowed, [[1, 0, 0], [0, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(sop.transition, [[1, 0, 0], [1, 1, 2], [2, 2, 2]])
    np.testing.assert_array_equal(sop.terminal, [False, False, True])
    assert sop.strategy_index("sell") == 2 and sop.stage_index("end") == 2


@pytest.mark.parametrize("jit", [True, False])
def test_jax_automaton(jit):
    j = sop_from_dict(GOOD).as_jax()
    advance = jax.jit(j.advance) if jit else j.advance
    is_allowed = jax.jit(j.is_allowed) if jit else j.is_allowed
    assert int(advance(jnp.int32(0), jnp.int32(0))) == 1  # greet: open -> talk
    assert int(advance(jnp.int32(0), jnp.int32(2))) == 0  # a violation keeps the stage
    assert int(advance(jnp.int32(1), jnp.int32(UNRECOGNISED))) == 1  # so does an unrecognised reply
    assert int(advance(jnp.int32(1), jnp.int32(2))) == 2
    assert not bool(is_allowed(jnp.int32(1), jnp.int32(UNRECOGNISED)))
    batched = jax.vmap(j.advance)(jnp.array([0, 1, 1]), jnp.array([0, 1, 2]))
    np.testing.assert_array_equal(batched, [1, 1, 2])


@pytest.mark.parametrize("jit", [True, False])
def test_masked_softmax_gives_zero_to_disallowed(jit):
    fn = jax.jit(masked_strategy_log_softmax) if jit else masked_strategy_log_softmax
    logits = jnp.array([[0.0, math.log(2.0), 5.0], [1.0, 2.0, 3.0]])
    allowed = jnp.array([[True, True, False], [False, False, False]])
    logp = fn(logits, allowed)
    np.testing.assert_allclose(np.exp(logp[0]), [1 / 3, 2 / 3, 0.0], atol=1e-6)
    assert float(jnp.exp(logp[0, 2])) == 0.0
    np.testing.assert_array_equal(logp[1], 0.0)  # padded turn: no NaN


def test_masked_softmax_follows_the_stage_mask():
    j = sop_from_dict(GOOD).as_jax()
    logp = masked_strategy_log_softmax(jnp.array([3.0, 0.0, 0.0]), j.mask(jnp.int32(1)))  # talk: ask or sell
    np.testing.assert_allclose(np.exp(logp), [0.0, 0.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("data, message", [
    (bad(stages=GOOD["stages"] + [{"name": "island", "allowed": ["ask"]}]), "unreachable.*island"),
    (bad(stages=[{"name": "open", "allowed": []}]), "allows no strategy"),
    (bad(stages=[{"name": "open", "allowed": ["dance"]}]), "unknown strategy 'dance'"),
    (bad(stages=[{"name": "open", "allowed": ["greet"], "next": {"greet": "nowhere"}}]), "unknown stage 'nowhere'"),
    (bad(stages=[{"name": "open", "allowed": ["greet"], "next": {"ask": "open"}}]), "does not allow"),
    (bad(strategies=["a", "a"]), "duplicate strategy"),
    (bad(strategies=[]), "non-empty list"),
    (bad(initial="middle"), "initial stage 'middle'"),
    ({"name": "x"}, "missing key 'strategies'"),
    ([1, 2], "expected a JSON object"),
])
def test_validation_errors_name_the_problem(data, message):
    with pytest.raises(SOPError, match=message) as err:
        sop_from_dict(data, source="sops/x.json")
    assert str(err.value).startswith("sops/x.json: ")


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(SOPError, match="not found"):
        load_sop(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x", "strategies": [')
    with pytest.raises(SOPError, match=f"{broken}: not valid JSON"):
        load_sop(broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(bad(stages=[{"name": "open", "allowed": ["dance"]}])))
    with pytest.raises(SOPError, match=f"{wrong}: stage 'open' allows unknown strategy"):
        load_sop(wrong)


def test_unknown_names_on_lookup():
    sop = sop_from_dict(GOOD)
    with pytest.raises(SOPError, match="unknown strategy 'x'"):
        sop.strategy_index("x")
    with pytest.raises(SOPError, match="unknown stage 'x'"):
        sop.stage_index("x")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=4),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8)


def mutations():
    """A valid SOP with one field replaced by an arbitrary JSON value (the realistic kind of bad file)."""
    paths = [("name",), ("strategies",), ("initial",), ("stages",), ("strategies", 0), ("stages", 0),
             ("stages", 0, "name"), ("stages", 0, "allowed"), ("stages", 0, "next"), ("stages", 1, "next", "sell"),
             ("stages", 1, "allowed", 0), ("stages", 2, "terminal")]
    return st.tuples(st.sampled_from(paths), json_values)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=mutations())
def test_mutated_sops_load_or_raise_one_sop_error(mutation):
    path, value = mutation
    data = copy.deepcopy(GOOD)
    target = data
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    try:
        sop = sop_from_dict(data, source="gen.json")
    except SOPError as e:
        assert str(e).startswith("gen.json: ")
    else:  # whatever loads is a consistent automaton
        assert sop.allowed.shape == (sop.num_stages, sop.num_strategies)
        assert ((sop.transition >= 0) & (sop.transition < sop.num_stages)).all()


@settings(max_examples=100, deadline=None)
@given(data=json_values)
def test_arbitrary_json_raises_one_sop_error(data):
    with pytest.raises(SOPError):
        sop_from_dict(data, source="gen.json")
