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


@pytest.mark.parametrize("kv_block", [128, 4, 5])  # one block; several; a clamped last block (S=12)
def test_cache_chunks_match_full_forward(model, kv_block):
    tokens, positions, valid = _padded_batch()
    full, _ = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(valid))
    model = nnx.merge(nnx.graphdef(qwen3.Qwen3(TINY.replace(kv_block=kv_block), rngs=nnx.Rngs(0))),
                      nnx.state(model))
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


@pytest.mark.parametrize("overrides", [{"remat": "full"}, {"remat": "dots"}, {"remat": "dots_no_batch"},
                                       {"scan_unroll": TINY.num_layers}, {"remat": "dots", "scan_unroll": 2}])
def test_remat_and_unroll_same_gradients(overrides):
    tokens, positions, valid = (jnp.asarray(a) for a in _padded_batch())

    def grads(cfg):
        m = qwen3.Qwen3(cfg, rngs=nnx.Rngs(1))
        return nnx.grad(lambda mm: qwen3.forward_logprobs(mm, tokens, positions, valid).sum())(m)

    chex.assert_trees_all_close(grads(TINY), grads(TINY.replace(**overrides)), atol=1e-5)


def test_remat_bool_is_read_as_policy():
    assert TINY.replace(remat=True).remat == "full" and TINY.replace(remat=False).remat == "none"


def test_stacked_layers_equal_a_loop_over_slices(model):
    """The scan over stacked parameters is the same computation as calling each layer slice in turn."""
    tokens, positions, valid = (jnp.asarray(a) for a in _padded_batch())
    graphdef, state = nnx.split(model.layers)

    def attend(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=(jnp.tril(jnp.ones((8, 8), bool))[None, None]
                                                           & valid[:, None, None, :]), scale=TINY.head_dim ** -0.5)

    x = model.embed_tokens(tokens)
    for i in range(TINY.num_layers):
        x, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(x, positions, attend)
    want = model.logits(model.norm(x))
    got, _ = model(tokens, positions, valid)
    np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(want)[np.asarray(valid)],
                               atol=1e-5, rtol=0)


def test_stacked_layers_draw_the_keys_of_a_list_of_layers():
    """A seed gives the stacked layers the weights a Python list of layers built one after another would get (and
    leaves the stream where that list would), so initial weights did not change when the layers were stacked."""
    list_rngs, stacked_rngs = nnx.Rngs(3), nnx.Rngs(3)
    layers = [qwen3.DecoderLayer(TINY, list_rngs) for _ in range(TINY.num_layers)]
    stacked = nnx.state(qwen3.stacked_layers(TINY, stacked_rngs), nnx.Param)
    assert int(stacked_rngs.params.count[...]) == int(list_rngs.params.count[...]) \
        == TINY.num_layers * qwen3.KEY_DRAWS_PER_LAYER
    for i, layer in enumerate(layers):  # same structure; the stacked leaves carry the layer axis in their metadata
        for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(nnx.state(layer, nnx.Param)), strict=True):
            np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b))


def test_bf16_compute_fp32_params_end_to_end():
    cfg32 = qwen3.get_config("small")
    cfg16 = cfg32.replace(dtype="bfloat16")  # param_dtype stays float32 (master weights)
    m32 = qwen3.Qwen3(cfg32, rngs=nnx.Rngs(3))
    m16 = nnx.merge(nnx.graphdef(qwen3.Qwen3(cfg16, rngs=nnx.Rngs(3))), nnx.state(m32))
    tokens, positions, valid = (jnp.asarray(a) for a in _padded_batch())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    h, _ = m16.hidden(tokens, positions, valid)
    assert h.dtype == jnp.bfloat16
    logits16, _ = m16(tokens, positions, valid)
    assert logits16.dtype == jnp.float32
    logits32, _ = m32(tokens, positions, valid)
    v = np.asarray(valid)
    # bf16 has 8 mantissa bits: logits of this random model (std ~0.1-1) agree to a few 1e-2.
    assert np.abs(np.asarray(logits16)[v] - np.asarray(logits32)[v]).max() < 0.1
    cache = qwen3.init_cache(cfg16, batch=2, max_len=10)
    assert cache.k.dtype == jnp.bfloat16
    step_logits, cache = m16(tokens[:, :3], positions[:, :3], valid[:, :3], cache)
    assert cache.k.dtype == jnp.bfloat16 and step_logits.dtype == jnp.float32
    grads = nnx.grad(lambda mm: qwen3.forward_logprobs(mm, tokens, positions, valid).sum())(m16)
    assert all(g.dtype == jnp.float32 and np.isfinite(np.asarray(g)).all()
               for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


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
    assert len(by_path) == 3 + 11 - 1  # stacked layers; tied: no lm_head
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert var.get_metadata("out_sharding"), path
        if path[0] == "layers":  # a leading layer axis, never sharded
            assert var.get_value().shape[0] == TINY.num_layers, path
            assert len(var.get_metadata("out_sharding")) == var.get_value().ndim, path
    assert by_path["embed_tokens.embedding"] == jax.P("tensor", "fsdp")
    assert by_path["layers.self_attn.q_proj.kernel"] == jax.P(None, "fsdp", "tensor")
    assert by_path["layers.self_attn.o_proj.kernel"] == jax.P(None, "tensor", "fsdp")
    assert by_path["layers.mlp.down_proj.kernel"] == jax.P(None, "tensor", "fsdp")
    assert by_path["layers.self_attn.k_norm.scale"] == jax.P(None, None)
    assert by_path["norm.scale"] == jax.P(None)


def test_built_under_mesh_is_sharded():
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        m = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
    sharding = m.layers.mlp.gate_proj.kernel[...].sharding
    assert sharding.spec == jax.P(None, "fsdp", "tensor") and sharding.mesh.shape == mesh.shape
    tokens, positions, valid = (jnp.asarray(a) for a in _padded_batch())
    graphdef, state = nnx.split(m)
    with jax.set_mesh(mesh):  # the layer scan runs on the sharded stack
        logits = jax.jit(lambda s: nnx.merge(graphdef, s)(tokens, positions, valid)[0])(state)
    assert np.isfinite(np.asarray(logits)).all()


def test_layer_scan_keeps_activations_batch_split_under_a_mesh(model):
    """Under `jax.set_mesh` the scanned layers' activations stay split over (data, fsdp) even with fsdp-sharded
    weights, and the values equal the single-device forward."""
    mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    tokens, positions, valid = (jnp.asarray(np.tile(a, (4, 1))) for a in _padded_batch())  # batch 8
    expected = np.asarray(model.hidden(tokens, positions, valid)[0])
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(qwen3.Qwen3(TINY, rngs=nnx.Rngs(0)))  # same weights, fsdp-sharded
        got = jax.jit(lambda s, t, p, v: nnx.merge(graphdef, s).hidden(t, p, v)[0])(state, tokens, positions, valid)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    # Without the constraint GSPMD follows the weights: hidden states split over D by fsdp, batch replicated.
    assert got.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))), got.ndim)


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
    with pytest.raises(ValueError, match="remat must be one of"):
        TINY.replace(remat="some")
    with pytest.raises(ValueError, match="attention must be one of"):
        TINY.replace(attention="flash")
    with pytest.raises(ValueError, match="scan_unroll must be a positive int"):
        TINY.replace(scan_unroll=0)
    with pytest.raises(ValueError, match="unknown Qwen3Config field"):
        TINY.replace(n_layers=3)
    with pytest.raises(ValueError, match="unknown Qwen3 preset"):
        qwen3.get_config("qwen3-1000b")
    with pytest.raises(ValueError, match="rope_scaling"):
        qwen3.Qwen3Config.from_hf_dict({**TINY.to_hf_dict(), "rope_scaling": {"type": "yarn"}})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        qwen3.Qwen3Config.from_hf_dict({"vocab_size": 8})
