"""Tests for gopo_jax.models.qwen3: padding invisibility, KV-cache equivalence, log-probs, configs, shardings."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax.models import qwen3

TINY = qwen3.get_config("tiny")


@pytest.fixture(scope="module")
def model():
    return qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))


def _padded_batch():
    # Row 0 has a pad block in the middle and a trailing pad, row 1 has leading pads.
    tokens = np.array([[5, 17, 42, 0, 0, 9, 301, 0],
                       [0, 0, 7, 8, 99, 100, 3, 4]], np.int32)
    valid = np.array([[1, 1, 1, 0, 0, 1, 1, 0],
                      [0, 0, 1, 1, 1, 1, 1, 1]], bool)
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, positions, valid


def _compact(row_tokens, row_valid):
    t = row_tokens[row_valid][None]
    return jnp.asarray(t), jnp.arange(t.shape[1], dtype=jnp.int32)[None], jnp.ones(t.shape, bool)


def test_pads_are_invisible(model):
    tokens, positions, valid = _padded_batch()
    logits, cache = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    assert cache is None
    chex.assert_shape(logits, (2, 8, TINY.vocab_size))
    chex.assert_type(logits, jnp.float32)
    assert np.isfinite(np.asarray(logits)).all()  # pad queries with nothing to attend to still give numbers
    for row in range(2):
        compact_logits, _ = model(*_compact(tokens[row], valid[row]))
        np.testing.assert_allclose(np.asarray(logits[row])[valid[row]], np.asarray(compact_logits[0]),
                                   atol=2e-5, rtol=0)


def test_pad_token_content_does_not_matter(model):
    tokens, positions, valid = _padded_batch()
    other = np.where(valid, tokens, 511)
    a, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    b, _ = model(jnp.asarray(other), jnp.asarray(positions), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(a)[valid], np.asarray(b)[valid])


def test_cache_chunks_match_full_forward(model):
    tokens, positions, valid = _padded_batch()
    full, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    cache = qwen3.init_cache(TINY, batch=2, max_len=12)
    chex.assert_shape(cache.k, (TINY.num_layers, 2, 12, TINY.num_kv_heads, TINY.head_dim))
    pieces = []
    for lo, hi in [(0, 3), (3, 4), (4, 8)]:  # prefill, one decode step, a chunk spanning pads
        out, cache = model(jnp.asarray(tokens[:, lo:hi]), jnp.asarray(positions[:, lo:hi]),
                           jnp.asarray(valid[:, lo:hi]), cache)
        pieces.append(np.asarray(out))
    assert int(cache.index) == 8
    np.testing.assert_array_equal(np.asarray(cache.valid[:, :8]), valid)
    assert not np.asarray(cache.valid[:, 8:]).any()
    np.testing.assert_allclose(np.concatenate(pieces, 1)[valid], np.asarray(full)[valid], atol=2e-5, rtol=0)


def test_cache_call_under_jit_donates(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, cache, tok, pos, val):
        return nnx.merge(graphdef, state)(tok, pos, val, cache)

    cache = qwen3.init_cache(TINY, batch=1, max_len=4)
    logits, cache = step(state, cache, jnp.array([[3]], jnp.int32), jnp.array([[0]], jnp.int32),
                         jnp.array([[True]]))
    assert int(cache.index) == 1 and logits.shape == (1, 1, TINY.vocab_size)


def test_forward_logprobs_by_hand(model):
    tokens = jnp.array([[4, 8, 15, 16]], jnp.int32)
    positions = jnp.arange(4, dtype=jnp.int32)[None]
    valid = jnp.ones((1, 4), bool)
    logits, _ = model(tokens, positions, valid)
    logp = jax.nn.log_softmax(logits, -1)
    expected = [0.0] + [float(logp[0, i - 1, int(tokens[0, i])]) for i in range(1, 4)]
    np.testing.assert_allclose(np.asarray(qwen3.forward_logprobs(model, tokens, positions, valid))[0], expected,
                               atol=1e-5)


def test_forward_logprobs_skip_pads(model):
    tokens, positions, valid = _padded_batch()
    lp = np.asarray(qwen3.forward_logprobs(model, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid)))
    chex.assert_shape(lp, (2, 8))
    for row in range(2):
        compact = np.asarray(qwen3.forward_logprobs(model, *_compact(tokens[row], valid[row])))[0]
        np.testing.assert_allclose(lp[row][valid[row]], compact, atol=2e-5)
        # Pads and the first valid token have no defined log-prob.
        first = np.argmax(valid[row])
        assert (lp[row][~valid[row]] == 0).all() and lp[row][first] == 0


def test_remat_same_gradients():
    tokens, positions, valid = (jnp.asarray(a) for a in _padded_batch())

    def grads(cfg):
        m = qwen3.Qwen3(cfg, rngs=nnx.Rngs(1))
        return nnx.grad(lambda mm: qwen3.forward_logprobs(mm, tokens, positions, valid).sum())(m)

    chex.assert_trees_all_close(grads(TINY), grads(TINY.replace(remat=True)), atol=1e-5)


def test_untied_has_lm_head_and_bf16_policy():
    cfg = TINY.replace(tie_word_embeddings=False, dtype="bfloat16", param_dtype="bfloat16")
    m = qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))
    assert m.lm_head.kernel[...].shape == (cfg.hidden_size, cfg.vocab_size)
    assert m.embed_tokens.embedding[...].dtype == jnp.bfloat16
    assert not hasattr(qwen3.Qwen3(TINY, rngs=nnx.Rngs(0)), "lm_head")
    logits, _ = m(jnp.zeros((1, 3), jnp.int32), jnp.arange(3, dtype=jnp.int32)[None], jnp.ones((1, 3), bool))
    assert logits.dtype == jnp.float32


def test_every_param_is_annotated(model):
    specs = nnx.to_flat_state(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
    by_path = {".".join(map(str, path)): var.get_value() for path, var in specs}
    assert len(by_path) == 3 + 11 * TINY.num_layers - 1  # tied: no lm_head
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_metadata("out_sharding"), path
    assert by_path["embed_tokens.embedding"] == jax.P("tensor", "fsdp")
    assert by_path["layers.0.self_attn.q_proj.kernel"] == jax.P("fsdp", "tensor")
    assert by_path["layers.1.self_attn.o_proj.kernel"] == jax.P("tensor", "fsdp")
    assert by_path["layers.0.mlp.down_proj.kernel"] == jax.P("tensor", "fsdp")
    assert by_path["layers.0.self_attn.k_norm.scale"] == jax.P(None)
    assert by_path["norm.scale"] == jax.P(None)


def test_built_under_mesh_is_sharded():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        m = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
    sharding = m.layers[0].mlp.gate_proj.kernel[...].sharding
    assert sharding.spec == jax.P("fsdp", "tensor") and sharding.mesh.shape == mesh.shape


def test_hf_dict_round_trip():
    for name in ("tiny", "qwen3-8b"):
        cfg = qwen3.get_config(name)
        assert qwen3.Qwen3Config.from_hf_dict(cfg.to_hf_dict(), dtype=cfg.dtype, param_dtype=cfg.param_dtype) == cfg


@pytest.mark.parametrize("name,total_b,non_embedding_b", [
    # Published sizes (billions, as rounded on the model cards).
    ("qwen3-0.6b", 0.6, 0.44), ("qwen3-1.7b", 1.7, 1.4), ("qwen3-4b", 4.0, 3.6),
    ("qwen3-8b", 8.2, 6.95), ("qwen3-14b", 14.8, 13.2)])
def test_published_preset_sizes(name, total_b, non_embedding_b):
    cfg = qwen3.get_config(name)
    total = qwen3.count_params(nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0))))
    embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    assert abs(total / 1e9 - total_b) < 0.06
    assert abs((total - embeddings) / 1e9 - non_embedding_b) < 0.05  # cards round to 0.1B


def test_config_errors():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TINY.replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        TINY.replace(dtype="float64")
    with pytest.raises(ValueError, match="unknown Qwen3Config field"):
        TINY.replace(n_layers=3)
    with pytest.raises(ValueError, match="unknown Qwen3 preset"):
        qwen3.get_config("qwen3-1000b")
    with pytest.raises(ValueError, match="rope_scaling"):
        qwen3.Qwen3Config.from_hf_dict({**TINY.to_hf_dict(), "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        qwen3.Qwen3Config.from_hf_dict({"vocab_size": 8})
