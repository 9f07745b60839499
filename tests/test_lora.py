"""Tests for LoRA: the adapted projections of gopo_jax.models.qwen3, the functions of gopo_jax.models.lora, a
LoRA model through hf_io, and the adapters-only optimizer and train step of gopo_jax.train.step."""
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gopo_jax import parallel
from gopo_jax.algorithms.sft import make_sft_loss_fn
from gopo_jax.models import heads, hf_io, lora, qwen3
from gopo_jax.train.state import create_train_state
from gopo_jax.train.step import make_optimizer, make_train_step, pure_train_step

TINY = qwen3.get_config("tiny")
LORA = TINY.replace(lora_rank=4, lora_alpha=8.0)
TOKENS = np.array([[3, 17, 255, 42, 7, 100, 9, 1], [500, 2, 2, 61, 33, 8, 400, 12]], np.int32)
# Trainable rows (the agents' marker ids) in an order of their own: 17 and 500 are in TOKENS, 64 and 301 are not.
MARKERS = (500, 17, 64, 301)
ROWS = LORA.replace(trainable_rows=MARKERS)


def _inputs(tokens=TOKENS):
    tokens = jnp.asarray(tokens)
    valid = jnp.ones(tokens.shape, bool)
    return tokens, qwen3.positions_from_valid(valid), valid


@jax.jit
def _logits(graphdef, state, tokens, positions, valid):
    return nnx.merge(graphdef, state)(tokens, positions, valid)[0]


def _model_logits(model):
    return np.asarray(_logits(*nnx.split(model), *_inputs()))


def _state_logits(graphdef, state):
    return np.asarray(_logits(graphdef, state, *_inputs()))


def _trained_adapters(state, seed=1):
    """`state` with every B and row delta random, as after some training (fresh adapters have them zero and change
    nothing)."""
    def set_b(path, x):
        names = lora._path_names(path)
        if names[-1] not in ("lora_b", "row_delta", "head_row_delta"):
            return x
        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(".".join(names).encode()))
        return 0.05 * jax.random.normal(key, x.shape, x.dtype)

    return jax.tree_util.tree_map_with_path(set_b, state)


def _split(config, seed=0):
    return nnx.split(qwen3.Qwen3(config, rngs=nnx.Rngs(seed)), nnx.Param)


def _base_leaves(state):
    return {p: v.get_value() for p, v in nnx.to_flat_state(state) if not lora.is_adapter(p)}


# --- the model ---

def test_rank_zero_builds_the_plain_model():
    model = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
    assert type(model.layers.self_attn.q_proj) is nnx.Linear
    assert not nnx.state(model, nnx.LoRAParam)


@pytest.mark.parametrize("tie", [True, False])
def test_adapters_leave_the_base_weights_and_logits_unchanged(tie):
    """Adapters draw from their own stream: a seed gives the same base with or without them (the untied head, drawn
    after the layers, too), and fresh adapters (B = 0) add exactly nothing."""
    plain_gd, plain = _split(TINY.replace(tie_word_embeddings=tie))
    lora_gd, adapted = _split(LORA.replace(tie_word_embeddings=tie))
    chex.assert_trees_all_equal(_base_leaves(adapted), _base_leaves(plain))
    np.testing.assert_array_equal(_state_logits(lora_gd, adapted), _state_logits(plain_gd, plain))


def test_adapter_shapes_dtypes_and_annotations():
    model = qwen3.Qwen3(LORA.replace(lora_targets=["q", "down"]), rngs=nnx.Rngs(0))
    assert model.config.lora_targets == ("q", "down")  # lists are kept as tuples (the config stays hashable)
    specs = {".".join(p): v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(
        nnx.state(model, nnx.LoRAParam)))}
    r, n = LORA.lora_rank, LORA.num_layers
    assert specs == {"layers.self_attn.q_proj.lora_a": jax.P(None, "fsdp", None),
                     "layers.self_attn.q_proj.lora_b": jax.P(None, None, "tensor"),
                     "layers.mlp.down_proj.lora_a": jax.P(None, "tensor", None),
                     "layers.mlp.down_proj.lora_b": jax.P(None, None, "fsdp")}
    q = model.layers.self_attn.q_proj
    assert q.lora_a[...].shape == (n, LORA.hidden_size, r) and q.lora_b[...].shape == (n, r, 64)
    assert not np.asarray(q.lora_b[...]).any() and q.lora_scale == LORA.lora_alpha / r
    # A ~ N(0, 1/in): x A keeps the scale of x.
    assert abs(float(jnp.std(q.lora_a[...])) * LORA.hidden_size ** 0.5 - 1) < 0.2
    assert type(model.layers.self_attn.k_proj) is nnx.Linear and type(model.layers.mlp.up_proj) is nnx.Linear


def test_adapters_are_float32_on_a_bf16_base():
    model = qwen3.Qwen3(LORA.replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(0))
    q = model.layers.self_attn.q_proj
    assert q.kernel[...].dtype == jnp.bfloat16 and q.lora_a[...].dtype == jnp.float32
    assert _model_logits(model).dtype == np.float32


def test_config_errors():
    for bad, match in [({"lora_rank": -1}, "lora_rank"), ({"lora_rank": 2.0}, "lora_rank"),
                       ({"lora_alpha": 0.0}, "lora_alpha"), ({"lora_alpha": float("nan")}, "lora_alpha"),
                       ({"lora_targets": ()}, "lora_targets"), ({"lora_targets": ("q", "q")}, "lora_targets"),
                       ({"lora_targets": ("q_proj",)}, "lora_targets"), ({"lora_param_dtype": "int8"},
                                                                         "lora_param_dtype")]:
        with pytest.raises(ValueError, match=match):
            TINY.replace(**bad)
    assert TINY.lora_scale == 0.0 and LORA.lora_scale == 2.0


@pytest.mark.parametrize("overrides", [{"remat": "full"}, {"remat": "dots", "scan_unroll": 2}])
def test_adapter_gradients_under_remat_and_unroll(overrides):
    """The adapters run inside the scanned, rematerialised layer body: their gradients do not depend on how."""
    tokens, positions, valid = _inputs()

    def adapter_grads(cfg):
        graphdef, state = _split(cfg, seed=1)
        state = _trained_adapters(state)
        grads = jax.grad(lambda s: qwen3.forward_logprobs(nnx.merge(graphdef, s), tokens, positions, valid).sum())(
            state)
        return {p: v.get_value() for p, v in nnx.to_flat_state(grads) if lora.is_adapter(p)}

    want = adapter_grads(LORA)
    assert all(np.abs(g).max() > 0 for g in want.values())
    chex.assert_trees_all_close(adapter_grads(LORA.replace(**overrides)), want, atol=1e-5)


def test_sharded_lora_model_matches_one_device():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    graphdef, state = _split(LORA)
    state = _trained_adapters(state)
    want = _state_logits(graphdef, state)
    placed = parallel.shard_params(state, mesh)
    b = placed["layers"]["self_attn"]["q_proj"]["lora_b"].get_value()
    assert b.sharding.spec == jax.P(None, None, "tensor") and b.sharding.mesh.shape == mesh.shape
    with jax.set_mesh(mesh):
        got = _state_logits(graphdef, placed)
    np.testing.assert_allclose(got, want, atol=1e-5)


# --- trainable rows (the marker tokens' embedding rows under LoRA) ---

def _flat(state):
    return {".".join(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def test_trainable_rows_add_params_only_with_adapters():
    """No adapters or no rows: no row deltas, and the model is bitwise the one without the field. With both: two
    zero deltas more (one for the untied head), drawing no key, so every other parameter is as before."""
    plain = _flat(_split(TINY)[1])
    chex.assert_trees_all_equal(_flat(_split(TINY.replace(trainable_rows=MARKERS))[1]), plain)
    assert "row_delta" not in _flat(_split(LORA)[1])
    for tie in (True, False):
        adapted = _flat(_split(LORA.replace(tie_word_embeddings=tie))[1])
        rows = _flat(_split(ROWS.replace(tie_word_embeddings=tie))[1])
        deltas = {"row_delta"} | ({"head_row_delta"} if not tie else set())
        assert set(rows) - set(adapted) == deltas
        chex.assert_trees_all_equal({k: rows[k] for k in adapted}, adapted)
        assert all(rows[k].shape == (len(MARKERS), ROWS.hidden_size) and rows[k].dtype == jnp.float32
                   and not rows[k].any() for k in deltas)


def test_trainable_rows_config():
    config = LORA.replace(trainable_rows=[np.int64(5), 7])  # a config's list, numpy ints: plain ints in a tuple
    assert config.trainable_rows == (5, 7) and all(type(r) is int for r in config.trainable_rows)
    assert config.has_row_deltas and not TINY.replace(trainable_rows=(5,)).has_row_deltas
    assert not LORA.has_row_deltas
    for bad in [(5, 5), (-1,), (TINY.vocab_size,), (2.0,), (True,)]:
        with pytest.raises(ValueError, match="trainable_rows"):
            LORA.replace(trainable_rows=bad)


def test_row_delta_annotations():
    model = qwen3.Qwen3(ROWS.replace(tie_word_embeddings=False), rngs=nnx.Rngs(0))
    specs = _flat(nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam)))
    assert specs["row_delta"] == specs["head_row_delta"] == jax.P(None, "fsdp")


@pytest.mark.parametrize("tie", [True, False])
def test_zero_row_deltas_give_the_base_model(tie):
    """Fresh (zero) deltas: inputs and hidden states bitwise the base's; logits too, but for the marker columns,
    which the head recomputes from the trained rows in a matmul of their own (last-bit differences)."""
    base_gd, base = _split(LORA.replace(tie_word_embeddings=tie))
    rows_gd, rows = _split(ROWS.replace(tie_word_embeddings=tie))
    tokens, positions, valid = _inputs()
    hidden = jax.jit(lambda gd, s: nnx.merge(gd, s).hidden(tokens, positions, valid)[0])
    np.testing.assert_array_equal(hidden(rows_gd, rows), hidden(base_gd, base))
    got, want = _state_logits(rows_gd, rows), _state_logits(base_gd, base)
    others = np.setdiff1d(np.arange(TINY.vocab_size), MARKERS)
    np.testing.assert_array_equal(got[..., others], want[..., others])
    np.testing.assert_allclose(got[..., list(MARKERS)], want[..., list(MARKERS)], rtol=1e-6, atol=1e-6)


def _table_edited_model(config, state):
    """The model without trainable rows whose embedding (and untied head) rows were edited directly to what the
    deltas of `state` make them, with the same base and adapters."""
    plain = config.replace(trainable_rows=())
    graphdef, reference = _split(plain)
    values, ids = _flat(state), np.asarray(MARKERS)
    flat = []
    for path, var in nnx.to_flat_state(reference):
        value = values[".".join(path)]
        if path == ("embed_tokens", "embedding"):
            value = value.at[ids].set(value[ids] + values["row_delta"])
        elif path == ("lm_head", "kernel"):
            value = value.at[:, ids].set(value[:, ids] + values["head_row_delta"].T)
        flat.append((path, var.replace(value)))
    return graphdef, nnx.from_flat_state(flat)


@pytest.mark.parametrize("tie", [True, False])
def test_row_deltas_equal_editing_the_table(tie):
    config = ROWS.replace(tie_word_embeddings=tie)
    graphdef, state = _split(config)
    trained = _trained_adapters(state)
    np.testing.assert_allclose(_state_logits(graphdef, trained), _state_logits(*_table_edited_model(config, trained)),
                               rtol=1e-5, atol=1e-5)


def _rows_off(state):
    """`state` with its row deltas zero and its other adapters as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if lora._path_names(p)[-1].endswith("row_delta") else x, state)


@pytest.mark.parametrize("tie", [True, False])
def test_row_deltas_change_exactly_the_marker_rows(tie):
    """Against the same adapters with zero deltas: the input lookup differs at marker tokens only; the output
    embedding at marker rows only, and so do the logits of an input without markers (its hidden states are the
    same)."""
    graphdef, state = _split(ROWS.replace(tie_word_embeddings=tie))
    trained = _trained_adapters(state)
    model, rows_off = nnx.merge(graphdef, trained), nnx.merge(graphdef, _rows_off(trained))
    tokens = jnp.asarray(TOKENS)
    changed = np.any(np.asarray(model.input_embeddings(tokens) != rows_off.input_embeddings(tokens)), axis=-1)
    np.testing.assert_array_equal(changed, np.isin(TOKENS, MARKERS))
    changed = np.any(np.asarray(model.output_embedding() != rows_off.output_embedding()), axis=-1)
    np.testing.assert_array_equal(changed, np.isin(np.arange(TINY.vocab_size), MARKERS))
    edited = model.head_embedding()
    assert edited.row_ids == MARKERS
    np.testing.assert_array_equal(edited.dense(), model.output_embedding())

    no_markers = _inputs(np.where(np.isin(TOKENS, MARKERS), 1, TOKENS))
    got = np.asarray(_logits(graphdef, trained, *no_markers))
    want = np.asarray(_logits(graphdef, _rows_off(trained), *no_markers))
    moved = np.any(np.abs(got - want) > 1e-6, axis=(0, 1))
    np.testing.assert_array_equal(moved, np.isin(np.arange(TINY.vocab_size), MARKERS))


def _marker_batch(config, batch=8, length=16, seed=0):
    """An SFT batch in which markers are inputs and targets."""
    b = _sft_batch(batch, length, config.vocab_size, seed)
    b["tokens"][:, ::3] = np.asarray(MARKERS)[np.arange(b["tokens"][:, ::3].size).reshape(batch, -1) % len(MARKERS)]
    return b


@pytest.mark.parametrize("tie", [True, False])
def test_row_delta_gradients_come_through_the_input_and_the_output(tie):
    config = ROWS.replace(tie_word_embeddings=tie)
    graphdef, state = _split(config)
    tokens, positions, valid = _inputs()
    w = jax.random.normal(jax.random.key(3), (*TOKENS.shape, config.hidden_size))
    no_markers = _inputs(np.where(np.isin(TOKENS, MARKERS), 1, TOKENS))

    def delta_grads(loss):
        grads = _flat(jax.grad(lambda s: loss(nnx.merge(graphdef, s)))(state))
        return {k: np.abs(v).max(axis=-1) for k, v in grads.items() if k.endswith("row_delta")}

    # Input only: a loss on the hidden states reads no output row. Markers 500 and 17 are in TOKENS, 64 and 301 not.
    through_input = delta_grads(lambda m: jnp.sum(w * m.hidden(tokens, positions, valid)[0]))
    np.testing.assert_array_equal(through_input["row_delta"] > 0, np.isin(MARKERS, TOKENS))
    # Output only: no marker in the input, the log-normaliser reads every marker column.
    through_output = delta_grads(lambda m: jnp.sum(jax.nn.logsumexp(m(*no_markers)[0], axis=-1)))
    head = "row_delta" if tie else "head_row_delta"
    assert (through_output[head] > 0).all()
    if not tie:
        assert not through_output["row_delta"].any() and not through_input["head_row_delta"].any()


@pytest.mark.parametrize("tie", [True, False])
def test_lora_train_step_trains_the_rows_and_freezes_the_table(tie):
    config = ROWS.replace(tie_word_embeddings=tie)
    graphdef, state = _split(config)
    groups = ("policy",)
    tx = make_optimizer({"policy": 1e-2}, clip_norm=1.0, lora_groups=groups)
    train = create_train_state({"policy": state}, tx)
    before = _flat(jax.tree.map(np.asarray, train.params)["policy"])
    step = jax.jit(pure_train_step(_policy_loss(graphdef), tx, lora_groups=groups))
    for seed in range(2):
        train, metrics = step(train, jax.tree.map(jnp.asarray, _marker_batch(config, seed=seed)))
    assert int(metrics["nonfinite"]) == 0
    after = _flat(jax.tree.map(np.asarray, train.params)["policy"])
    for name in ("row_delta", "head_row_delta")[:1 if tie else 2]:
        assert np.abs(after[name]).min(axis=-1).all(), name  # every marker row moved
    for name in ("embed_tokens.embedding", "lm_head.kernel")[:1 if tie else 2]:
        np.testing.assert_array_equal(after[name], before[name])


def test_row_deltas_are_adapters():
    """Trained and zeroed like the adapters: `is_adapter` names them, `adapters_off` zeroes them (the reference
    policy has the base's marker rows), `fresh_adapter` starts them at zero."""
    assert lora.is_adapter(("row_delta",)) and lora.is_adapter(("expert", "head_row_delta"))
    graphdef, state = _split(ROWS.replace(tie_word_embeddings=False))
    trained = _trained_adapters(state)
    off = lora.adapters_off(trained)
    assert not _flat(off)["row_delta"].any() and not _flat(off)["head_row_delta"].any()
    np.testing.assert_array_equal(_state_logits(graphdef, off), _state_logits(graphdef, state))
    assert not lora.fresh_adapter(("row_delta",), (2, 3), jnp.float32, jax.random.key(0)).any()


def test_sharded_row_deltas_match_one_device():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = ROWS.replace(tie_word_embeddings=False)
    graphdef, state = _split(config)
    state = _trained_adapters(state)
    want = _state_logits(graphdef, state)
    placed = parallel.shard_params(state, mesh)
    delta = placed["head_row_delta"].get_value()
    assert delta.sharding.spec == jax.P(None, "fsdp") and delta.sharding.mesh.shape == mesh.shape
    with jax.set_mesh(mesh):
        got = _state_logits(graphdef, placed)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sharded_lora_step_trains_the_rows():
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = ROWS.replace(tie_word_embeddings=False)
    graphdef, state = _split(config)
    groups = ("policy",)
    tx = make_optimizer({"policy": 1e-2}, clip_norm=1.0, lora_groups=groups)
    train = parallel.shard_params(create_train_state({"policy": state}, tx), mesh)
    step = make_train_step(_policy_loss(graphdef), tx, mesh=mesh, lora_groups=groups)
    train, metrics = step(train, parallel.shard_batch(_marker_batch(config), mesh))
    assert int(metrics["nonfinite"]) == 0
    after = _flat(train.params["policy"])
    assert after["row_delta"].sharding.spec == jax.P(None, "fsdp")
    assert np.abs(np.asarray(after["row_delta"])).min(axis=-1).all()
    assert np.abs(np.asarray(after["head_row_delta"])).min(axis=-1).all()
    np.testing.assert_array_equal(after["embed_tokens.embedding"], _flat(state)["embed_tokens.embedding"])


@pytest.mark.parametrize("tie", [True, False])
def test_merging_folds_the_rows_into_the_table(tie):
    config = ROWS.replace(tie_word_embeddings=tie)
    graphdef, state = _split(config)
    trained = _trained_adapters(state)
    want = _state_logits(graphdef, trained)
    merged = lora.merge_adapters(trained, config, jax.random.key(7))
    np.testing.assert_allclose(_state_logits(graphdef, merged), want, atol=1e-5)
    np.testing.assert_allclose(_state_logits(graphdef, lora.adapters_off(merged)), want, atol=1e-5)
    flat, edited = _flat(merged), _flat(_table_edited_model(config, trained)[1])
    for name in ("row_delta", "head_row_delta")[:1 if tie else 2]:
        assert not flat[name].any()
    for name in ("embed_tokens.embedding", "lm_head.kernel")[:1 if tie else 2]:
        np.testing.assert_array_equal(flat[name], edited[name])
    jitted = jax.jit(lora.merge_adapters, static_argnums=1)(trained, config, jax.random.key(7))
    chex.assert_trees_all_close(_flat(jitted), flat)
    with pytest.raises(ValueError, match="trainable_rows"):
        lora.merge_adapters(trained, config.replace(trainable_rows=MARKERS[:2]), jax.random.key(7))

    plain = lora.merged_model(nnx.merge(graphdef, trained))
    assert plain.config == config.replace(lora_rank=0, trainable_rows=())
    np.testing.assert_allclose(_model_logits(plain), want, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_writes_the_trained_rows(tmp_path, tie):
    graphdef, state = _split(ROWS.replace(tie_word_embeddings=tie))
    model = nnx.merge(graphdef, _trained_adapters(state))
    hf_io.save_pretrained(model, tmp_path)
    np.testing.assert_allclose(_hf_logits(tmp_path), _model_logits(model), atol=1e-4)


def test_from_pretrained_with_trainable_rows(tmp_path):
    hf_io.save_pretrained(qwen3.Qwen3(TINY.replace(tie_word_embeddings=False), rngs=nnx.Rngs(3)), tmp_path)
    plain = hf_io.from_pretrained(tmp_path)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    adapted = hf_io.from_pretrained(tmp_path, mesh=mesh, config_overrides={"lora_rank": 4, "trainable_rows": MARKERS})
    assert adapted.config.trainable_rows == MARKERS
    for delta in (adapted.row_delta[...], adapted.head_row_delta[...]):
        assert delta.sharding.spec == jax.P(None, "fsdp") and not np.asarray(delta).any()
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(_model_logits(adapted), _model_logits(plain), atol=1e-5)
    with pytest.raises(hf_io.HFModelError, match="trainable_rows"):
        hf_io.from_pretrained(tmp_path, config_overrides={"lora_rank": 4, "trainable_rows": (TINY.vocab_size,)})


# --- gopo_jax.models.lora ---

def test_is_adapter_reads_both_kinds_of_path():
    assert lora.is_adapter(("layers", "mlp", "up_proj", "lora_a"))
    assert not lora.is_adapter(("layers", "mlp", "up_proj", "kernel"))
    _, state = _split(LORA)
    mask = lora.adapter_mask({"expert": state})  # jax key paths, through the Variable's `value`
    flags = [(lora._path_names(p), m) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]]
    assert sum(m for _, m in flags) == 2 * len(qwen3.LORA_TARGETS)
    assert all(m == (names[-1] in ("lora_a", "lora_b")) for names, m in flags)


def test_adapters_off_is_the_base_and_shares_its_arrays():
    graphdef, state = _split(LORA)
    trained = _trained_adapters(state)
    off = lora.adapters_off(trained)
    np.testing.assert_array_equal(_state_logits(graphdef, off), _model_logits(qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))))
    assert np.abs(_state_logits(graphdef, trained) - _state_logits(graphdef, off)).max() > 1e-3
    new, old = _base_leaves(off), _base_leaves(trained)
    assert all(new[p] is old[p] for p in old)  # no copy of the base


def test_merge_adapters_keeps_the_function_and_restarts_the_adapters():
    graphdef, state = _split(LORA)
    trained = _trained_adapters(state)
    merged = lora.merge_adapters(trained, LORA, jax.random.key(7))
    np.testing.assert_allclose(_state_logits(graphdef, merged), _state_logits(graphdef, trained), atol=1e-5)
    # The reference (adapters off) is now the merged policy.
    np.testing.assert_allclose(_state_logits(graphdef, lora.adapters_off(merged)),
                               _state_logits(graphdef, trained), atol=1e-5)
    flat, before = dict(nnx.to_flat_state(merged)), dict(nnx.to_flat_state(trained))
    q = ("layers", "self_attn", "q_proj")
    assert not np.asarray(flat[(*q, "lora_b")].get_value()).any()
    assert not np.allclose(flat[(*q, "lora_a")].get_value(), before[(*q, "lora_a")].get_value())
    assert flat[("embed_tokens", "embedding")].get_value() is before[("embed_tokens", "embedding")].get_value()
    with pytest.raises(ValueError, match="lora_rank"):
        lora.merge_adapters(trained, LORA.replace(lora_rank=8), jax.random.key(7))


def test_merge_adapters_runs_under_jit():
    graphdef, state = _split(LORA)
    trained = _trained_adapters(state)
    merged = jax.jit(lora.merge_adapters, static_argnums=1)(trained, LORA, jax.random.key(7))
    np.testing.assert_allclose(_state_logits(graphdef, merged), _state_logits(graphdef, trained), atol=1e-5)


def test_merged_model_is_the_plain_model_with_the_same_logits():
    graphdef, state = _split(LORA)
    model = nnx.merge(graphdef, _trained_adapters(state))
    plain = lora.merged_model(model)
    assert plain.config == LORA.replace(lora_rank=0) and not nnx.state(plain, nnx.LoRAParam)
    np.testing.assert_allclose(_model_logits(plain), _model_logits(model), atol=1e-5)
    unadapted = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
    assert lora.merged_model(unadapted) is unadapted


def test_fresh_adapter_rejects_other_leaves():
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        lora.fresh_adapter(("layers", "mlp", "up_proj", "kernel"), (2, 3), jnp.float32, jax.random.key(0))


# --- hf_io ---

def _hf_logits(folder):
    """Logits of the Hugging Face PyTorch model loaded from `folder`."""
    torch = pytest.importorskip("torch")
    import transformers  # with torch, only the Hugging Face comparisons need it

    model = transformers.Qwen3ForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()


def test_save_pretrained_of_a_lora_model_loads_in_transformers(tmp_path):
    graphdef, state = _split(LORA.replace(tie_word_embeddings=False))
    model = nnx.merge(graphdef, _trained_adapters(state))
    hf_io.save_pretrained(model, tmp_path)
    np.testing.assert_allclose(_hf_logits(tmp_path), _model_logits(model), atol=1e-4)


def test_from_pretrained_with_adapters(tmp_path):
    hf_io.save_pretrained(qwen3.Qwen3(TINY, rngs=nnx.Rngs(3)), tmp_path)
    plain = hf_io.from_pretrained(tmp_path)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    adapted = hf_io.from_pretrained(tmp_path, mesh=mesh, config_overrides={"lora_rank": 4, "lora_targets": ("q", "up")})
    assert adapted.config.lora_rank == 4 and adapted.config.lora_targets == ("q", "up")
    up = adapted.layers.mlp.up_proj
    assert up.lora_a[...].sharding.spec == jax.P(None, "fsdp", None) and np.asarray(up.lora_a[...]).std() > 0
    assert not np.asarray(up.lora_b[...]).any()
    with jax.set_mesh(mesh):
        np.testing.assert_allclose(_model_logits(adapted), _model_logits(plain), atol=1e-5)
    again = hf_io.from_pretrained(tmp_path, config_overrides={"lora_rank": 4, "lora_targets": ("q", "up")})
    np.testing.assert_array_equal(again.layers.mlp.up_proj.lora_a[...], up.lora_a[...])  # same default key
    for bad in ({"hidden_size": 8}, {"lora_rnak": 4}, {"dtype": "bfloat16"}):
        with pytest.raises(hf_io.HFModelError, match="config_overrides"):
            hf_io.from_pretrained(tmp_path, config_overrides=bad)


# --- the optimizer and the train step ---

def _sft_batch(batch=8, length=16, vocab=512, seed=0):
    rs = np.random.RandomState(seed)
    valid = rs.rand(batch, length) > 0.2
    return {"tokens": rs.randint(0, vocab, (batch, length)).astype(np.int32), "valid": valid,
            "loss_mask": valid & (rs.rand(batch, length) > 0.3)}


def _policy_loss(graphdef):
    sft = make_sft_loss_fn(graphdef)
    return lambda params, extras, batch, rng: sft(params["policy"], extras, batch, rng)


def test_lora_train_step_moves_only_the_adapters():
    graphdef, state = _split(LORA)
    groups = ("policy",)
    tx = make_optimizer({"policy": 1e-2}, clip_norm=1.0, lora_groups=groups)
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    train = parallel.shard_params(create_train_state({"policy": state}, tx), mesh)
    before = jax.tree.map(np.asarray, train.params)
    step = make_train_step(_policy_loss(graphdef), tx, mesh=mesh, lora_groups=groups)
    for _ in range(2):
        train, metrics = step(train, parallel.shard_batch(_sft_batch(), mesh))
    assert int(metrics["nonfinite"]) == 0 and float(metrics["grad_norm"]) > 0
    after = jax.tree.map(np.asarray, train.params)
    chex.assert_trees_all_equal(_base_leaves(after["policy"]), _base_leaves(before["policy"]))
    moved = {p: not np.array_equal(v.get_value(), dict(nnx.to_flat_state(before["policy"]))[p].get_value())
             for p, v in nnx.to_flat_state(after["policy"]) if lora.is_adapter(p)}
    assert all(moved.values()), moved
    # AdamW state (mu, nu) for the adapters only.
    adapter_size = sum(v.get_value().size for p, v in nnx.to_flat_state(state) if lora.is_adapter(p))
    opt_size = sum(x.size for x in jax.tree.leaves(train.opt_state) if jnp.issubdtype(x.dtype, jnp.floating))
    assert opt_size == 2 * adapter_size


def test_clipping_sees_only_the_adapters():
    """Huge gradients on the frozen base must not scale the adapters' update down."""
    _, state = _split(LORA)
    params = {"policy": state}
    tx = make_optimizer({"policy": 1.0}, clip_norm=1.0, lora_groups=("policy",))
    grads = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full_like(x, 1.0 if lora.is_adapter(p) else 1e8), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        # Adam's first step is -lr · g / (|g| + eps): -1 unless clipping shrank g towards eps; the base gets 0.
        np.testing.assert_allclose(np.asarray(u), -1.0 if lora.is_adapter(path) else 0.0, atol=1e-3)


def test_make_optimizer_lora_errors():
    with pytest.raises(ValueError, match="lora_groups"):
        make_optimizer({"expert": 0.1}, lora_groups=("cs",))
    with pytest.raises(ValueError, match="frozen"):
        make_optimizer({"expert": 0.1, "frozen": 0.1}, lora_groups=("expert",))
    _, plain = _split(TINY)
    tx = make_optimizer({"expert": 0.1}, lora_groups=("expert",))
    with pytest.raises(ValueError, match="no LoRA adapter leaves"):
        tx.init({"expert": plain})


def _step_memory(config, lora_groups):
    graphdef, state = _split(config)
    tx = make_optimizer({"policy": 1e-3}, lora_groups=lora_groups)
    train = create_train_state({"policy": state}, tx)
    batch = jax.tree.map(jnp.asarray, _sft_batch(batch=4, length=32, vocab=config.vocab_size))
    step = jax.jit(pure_train_step(_policy_loss(graphdef), tx, lora_groups=lora_groups), donate_argnums=0)
    return step.lower(train, batch).compile().memory_analysis()


def test_lora_step_needs_no_base_gradients_or_optimizer_state():
    """XLA's own accounting of the compiled step: no AdamW state for the base (arguments) and no base weight
    gradients (temporaries). Measured on this 4-layer model: arguments 48.0 -> 18.2 MB, temporaries 42.0 -> 13.2 MB;
    with the base's gradients only left unused by the optimizer (not behind stop_gradient) temporaries were 31.2 MB."""
    config = qwen3.Qwen3Config(vocab_size=256, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=4,
                               num_kv_heads=2, head_dim=64, tie_word_embeddings=True, remat="full")
    full = _step_memory(config, ())
    adapted = _step_memory(config.replace(lora_rank=8), ("policy",))
    print(f"full: args {full.argument_size_in_bytes / 1e6:.1f} MB temp {full.temp_size_in_bytes / 1e6:.1f} MB; "
          f"LoRA: args {adapted.argument_size_in_bytes / 1e6:.1f} MB temp {adapted.temp_size_in_bytes / 1e6:.1f} MB")
    assert adapted.argument_size_in_bytes < 0.45 * full.argument_size_in_bytes
    assert adapted.temp_size_in_bytes < 0.45 * full.temp_size_in_bytes


def _head_loss(graphdef):
    """Mean next-token NLL through the chunked head on the model's `head_embedding` (as the trainer's losses take
    the output embedding)."""
    def loss(params, extras, batch, rng):
        model = nnx.merge(graphdef, params["policy"])
        h, _ = model.hidden(batch["tokens"], qwen3.positions_from_valid(batch["valid"]), batch["valid"])
        logp, _ = heads.token_log_probs_and_entropy(h[:, :-1], model.head_embedding(), batch["tokens"][:, 1:],
                                                    chunk=model.config.logits_chunk)
        value = -jnp.mean(logp)
        return value, ({"loss": value}, extras)

    return loss


def test_trainable_rows_cost_the_step_no_table_gradient():
    """With the table frozen, training its marker rows through `head_embedding` costs the compiled LoRA step (almost)
    nothing: no [V, D] gradient of the table and no second [chunk, V] logits buffer (each would exceed the margin;
    measured: 10.4 -> 10.5 MB, where replacing the edited columns instead of adding a correction gave 15.8 MB)."""
    config = qwen3.Qwen3Config(vocab_size=16384, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=64, tie_word_embeddings=True, lora_rank=8, logits_chunk=64)

    def temp_bytes(cfg):
        graphdef, state = _split(cfg)
        tx = make_optimizer({"policy": 1e-3}, lora_groups=("policy",))
        train = create_train_state({"policy": state}, tx)
        batch = jax.tree.map(jnp.asarray, _sft_batch(batch=4, length=32, vocab=cfg.vocab_size))
        step = jax.jit(pure_train_step(_head_loss(graphdef), tx, lora_groups=("policy",)), donate_argnums=0)
        return step.lower(train, batch).compile().memory_analysis().temp_size_in_bytes

    without, with_rows = temp_bytes(config), temp_bytes(config.replace(trainable_rows=MARKERS))
    table_bytes = config.vocab_size * config.hidden_size * 4
    print(f"LoRA step temporaries: {without / 1e6:.1f} MB, with trainable rows {with_rows / 1e6:.1f} MB "
          f"(the table: {table_bytes / 1e6:.1f} MB)")
    assert with_rows < without + table_bytes // 4
