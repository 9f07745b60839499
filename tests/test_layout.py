"""Tests for gopo_jax/dialogue/layout.py: the fixed-slot buffer, and token-in-token-out on a real rollout."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.dialogue import layout as L
from gopo_jax.envs import policies
from gopo_jax.envs import synthetic_shop as ss
from gopo_jax.models import qwen3
from gopo_jax.models import tokenizer as tl

TINY = L.Layout(context_len=2, customer_len=3, header_len=1, reply_len=2, max_turns=2)


def test_geometry_hand_computed():
    assert TINY.turn_width == 3 + 1 + 1 + 2 and TINY.length == 2 + 2 * 7
    assert [TINY.turn_start(1), TINY.header_start(1), TINY.decision_pos(1), TINY.reply_start(1)] == [9, 12, 13, 14]
    c, u, h, e, s = L.ROLE_CONTEXT, L.ROLE_CUSTOMER, L.ROLE_HEADER, L.ROLE_EXPERT, L.ROLE_CS
    np.testing.assert_array_equal(TINY.role_template(), [c, c] + [u, u, u, h, e, s, s] * 2)
    np.testing.assert_array_equal(TINY.turn_of_position(), [-1, -1] + [0] * 7 + [1] * 7)


@pytest.mark.parametrize("jit", [True, False])
def test_positions_skip_pads(jit):
    fn = jax.jit(qwen3.positions_from_valid) if jit else qwen3.positions_from_valid
    valid = jnp.array([True, False, True, True, False, False, True])
    np.testing.assert_array_equal(fn(valid), [0, 0, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(fn(jnp.zeros((3,), bool)), [0, 0, 0])
    np.testing.assert_array_equal(fn(jnp.stack([valid, ~valid])), [[0, 0, 1, 2, 2, 2, 3], [0, 0, 0, 0, 1, 2, 2]])


@pytest.fixture(scope="module")
def shop_rollout():
    env = ss.make_env()
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    return env, jax.device_get(policies.demonstration_arrays(env, keys, noise=0.3))


def _append(buf, valid, pos, ids, ids_valid):
    """Writes one slot: the ids go to [pos, pos + len), only `ids_valid` of them count."""
    n = len(ids)
    buf[pos:pos + n] = np.where(ids_valid, ids, buf[pos:pos + n])
    valid[pos:pos + n] = ids_valid
    return buf, valid


def test_turn_by_turn_assembly_equals_encoding_the_whole_dialogue(shop_rollout):
    env, r = shop_rollout
    tok = env.tokenizer
    sid = tl.special_ids(tok)
    lay = L.Layout(context_len=env.context_len, customer_len=env.customer_len, header_len=2,
                   reply_len=env.reply_len, max_turns=env.spec.max_turns)
    for b in range(r["strategy"].shape[0]):
        buf = np.full((lay.length,), sid[tl.PAD], np.int32)
        valid = np.zeros((lay.length,), bool)
        pieces = []  # the dialogue as text pieces, joined and encoded ONCE at the end

        def add(pos, ids, ids_valid):
            _append(buf, valid, pos, ids, ids_valid)
            pieces.append(tok.decode(np.asarray(ids)[np.asarray(ids_valid)]))

        add(0, r["context"][b], r["context_valid"][b])
        for t in range(lay.max_turns):
            if not r["turn_mask"][b, t]:
                break
            stage = env.spec.sop.stages[int(r["stage"][b, t])]
            strategy = env.spec.strategies[int(r["strategy"][b, t])]
            header = np.array([sid[tl.AGENT], sid[tl.stage_token(stage)]], np.int32)
            add(lay.turn_start(t), r["customer"][b, t], r["customer_valid"][b, t])
            add(lay.header_start(t), header, np.ones(2, bool))
            add(lay.decision_pos(t), np.array([sid[tl.strategy_token(strategy)]]), np.ones(1, bool))
            add(lay.reply_start(t), r["reply"][b, t], r["reply_valid"][b, t])
        whole = tok.encode("".join(pieces), add_special_tokens=False)
        assert buf[valid].tolist() == whole
        # The buffer's roles line up with the slots: the decision tokens are strategy tokens.
        roles = np.asarray(lay.role_template())
        decision_ids = buf[(roles == L.ROLE_EXPERT) & valid]
        assert all(tok.convert_ids_to_tokens(int(i)).startswith("<s:") for i in decision_ids)
        assert len(decision_ids) == int(r["turn_mask"][b].sum())


def test_token_in_token_out_with_free_text_replies(shop_rollout):
    """A CS model may write words outside the world's vocabulary; special-token slot boundaries keep it exact."""
    env, _ = shop_rollout
    tok = env.tokenizer
    turns = [("<|customer|> i need a lamp<|eot|>", "<|agent|><stage:discovery>", "<s:recommend>",
              " i recommend the zzyzx lamp, très 'chic' 123!!<|eot|>"),
             ("<|customer|>  double  spaces  <|eot|>", "<|agent|><stage:consideration>", "<s:close>", " ok")]
    ids = tok.encode("<|context|> welcome", add_special_tokens=False)
    for piece in turns:
        for text in piece:
            ids += tok.encode(text, add_special_tokens=False)
    whole = "<|context|> welcome" + "".join("".join(p) for p in turns)
    assert ids == tok.encode(whole, add_special_tokens=False)


def test_trajectory_check():
    b, n_k = 2, 3
    lay = TINY
    z = lambda *s: jnp.zeros(s)
    traj = L.Trajectory(
        tokens=z(b, lay.length), valid=z(b, lay.length), ea_mask=z(b, lay.length), cs_mask=z(b, lay.length),
        cs_logprob=z(b, lay.length), strategy=z(b, 2), allowed=z(b, 2, n_k), ea_logprob=z(b, 2), realised=z(b, 2),
        aligned=z(b, 2), sop_valid=z(b, 2), gain=z(b, 2), cont=z(b, 2), rel=z(b, 2), rel_realised=z(b, 2),
        quality=z(b, 2),
        turn_mask=jnp.array([[True, True], [True, False]]), outcome=z(b), satisfaction=z(b), fcr=z(b))
    traj.check(lay, n_k)
    np.testing.assert_array_equal(traj.num_turns, [2, 1])
    with pytest.raises(AssertionError):
        traj.replace(gain=z(b, 3)).check(lay, n_k)
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda x: x[:1], traj), traj)
