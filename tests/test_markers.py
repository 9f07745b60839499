"""Tests for gopo_jax/models/markers.py: marker tokens on a real Qwen3 vocabulary (free rows, no resize), a vocabulary
without free rows (resize or a clear error), reserved-token reuse, and embedding growth that leaves the logits of
existing tokens unchanged (tied and untied, on and off a mesh)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from gopo_jax.models import hf_io
from gopo_jax.models import tokenizer as tl
from gopo_jax.models.chat_format import ChatFormat
from gopo_jax.models.markers import MarkerError, add_markers, grow_embeddings
from tests.hf_fixtures import QWEN3_EMBEDDING_ROWS, qwen3_tok, tiny_qwen3, tiny_qwen3_checkpoint  # noqa: F401

MARKERS = ([tl.stage_token(s) for s in ("opening", "discovery", "closing")]
           + [tl.strategy_token(k) for k in ("greet", "elicit_need", "recommend", "close")])
QWEN3_TOKENS = 151_669
TEXT = "<|im_start|>user\nI'm looking for a light laptop, 900 dollars max.<|im_end|>\n<|im_start|>assistant\n"


@jax.jit
def _jit_logits(graphdef, state, tokens):
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return nnx.merge(graphdef, state)(tokens, positions, jnp.ones((b, length), bool))[0]


def _logits(model, ids) -> np.ndarray:
    return np.asarray(_jit_logits(*nnx.split(model), jnp.asarray([ids], jnp.int32)))[0]


def _output_rows(model) -> np.ndarray:
    return np.asarray(model.output_embedding(), np.float32)


def _assert_grown(before, after, plan):
    """Existing rows untouched, every new row (and padding row) the mean of the trained rows, for the input embedding
    and the output one."""
    old = before.config.vocab_size
    assert after.config.vocab_size == plan.vocab_size
    for table_before, table_after in [(np.asarray(before.embed_tokens.embedding[...]),
                                       np.asarray(after.embed_tokens.embedding[...])),
                                      (_output_rows(before), _output_rows(after))]:
        fresh = np.zeros(plan.vocab_size, bool)
        fresh[list(plan.new_rows)] = True
        fresh[old:] = True
        np.testing.assert_array_equal(table_after[~fresh], table_before[~fresh[:old]])
        mean = table_before[~fresh[:old]].mean(0)
        np.testing.assert_allclose(table_after[fresh], np.broadcast_to(mean, table_after[fresh].shape), atol=1e-6)


@pytest.fixture(scope="module")
def untied_qwen3(qwen3_tok, tmp_path_factory):
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("untied"), tie_word_embeddings=False, tokenizer=qwen3_tok)


@pytest.fixture(scope="module")
def full_qwen3(qwen3_tok, tmp_path_factory):
    """A checkpoint whose embedding has exactly one row per token: no free rows."""
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("full"), vocab_size=QWEN3_TOKENS, tokenizer=qwen3_tok)


# --- Qwen3: free rows past the tokenizer ------------------------------------------------------------------------------

def test_qwen3_markers_take_free_rows_without_resizing(qwen3_tok, tmp_path):
    plan = add_markers(qwen3_tok, MARKERS, QWEN3_EMBEDDING_ROWS, allow_resize=False)
    assert plan.ids == {t: QWEN3_TOKENS + n for n, t in enumerate(MARKERS)}
    assert plan.vocab_size == QWEN3_EMBEDDING_ROWS and plan.new_rows == tuple(plan.ids.values())
    assert len(qwen3_tok) == QWEN3_TOKENS and qwen3_tok.convert_tokens_to_ids(MARKERS[0]) is None  # input untouched
    tok = plan.tokenizer
    assert all(t in tok.all_special_tokens for t in MARKERS)
    glued = f"{TEXT}<stage:opening><s:greet>Hello!<s:close>"
    ids = tok.encode(glued, add_special_tokens=False)
    assert ids[-5:] == [plan.ids["<stage:opening>"], plan.ids["<s:greet>"], 9707, 0, plan.ids["<s:close>"]]
    assert tok.decode(ids) == glued  # "Hello" is 9707, "!" is 0
    # The chat pieces do not change; eos, pad and the chat template survive.
    assert ChatFormat.from_tokenizer(tok) == ChatFormat.from_tokenizer(qwen3_tok)
    # Saved and loaded back (a run's tokenizer on resume): the markers keep their ids and need no new rows.
    tok.save_pretrained(str(tmp_path))
    loaded = hf_io.load_tokenizer(tmp_path)
    assert loaded.encode(glued, add_special_tokens=False) == ids
    assert (loaded.eos_token, loaded.pad_token, loaded.chat_template) == (
        qwen3_tok.eos_token, qwen3_tok.pad_token, qwen3_tok.chat_template)
    resumed = add_markers(loaded, MARKERS, QWEN3_EMBEDDING_ROWS, allow_resize=False)
    assert resumed.ids == plan.ids and resumed.new_rows == () and resumed.vocab_size == QWEN3_EMBEDDING_ROWS


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_existing_logits_unchanged_after_markers(tied, tiny_qwen3, untied_qwen3):
    folder = tiny_qwen3 if tied else untied_qwen3
    model, tok = hf_io.from_pretrained(folder), hf_io.load_tokenizer(folder)
    assert model.config.tie_word_embeddings == tied
    plan = add_markers(tok, MARKERS, model.config.vocab_size, allow_resize=False)
    grown = grow_embeddings(model, plan.vocab_size, plan.new_rows)
    _assert_grown(model, grown, plan)
    ids = tok.encode(TEXT, add_special_tokens=False)
    before, after = _logits(model, ids), _logits(grown, ids)
    np.testing.assert_array_equal(after[:, :QWEN3_TOKENS], before[:, :QWEN3_TOKENS])
    # Every marker starts as the same average token: the Expert's first choice has no built-in preference.
    markers = after[:, list(plan.new_rows)]
    np.testing.assert_allclose(markers, np.broadcast_to(markers[:, :1], markers.shape), rtol=1e-6, atol=1e-6)
    # A dialogue with markers runs through the grown model (a longer sequence: another program, float noise only).
    marked = plan.tokenizer.encode(TEXT + "<stage:opening><s:greet>Hello", add_special_tokens=False)
    np.testing.assert_allclose(_logits(grown, marked)[:len(ids), :QWEN3_TOKENS], before[:, :QWEN3_TOKENS],
                               atol=1e-5)


# --- No free rows: resize or a clear error ----------------------------------------------------------------------------

def test_no_free_rows_without_resize_is_a_clear_error(qwen3_tok):
    with pytest.raises(MarkerError, match=r"7 marker token\(s\) need embedding rows but the checkpoint has only "
                                          r"0 free .* model\.resize_embeddings=True to grow the embedding to 151680 "
                                          r"rows"):
        add_markers(qwen3_tok, MARKERS, QWEN3_TOKENS, allow_resize=False)


def test_no_free_rows_resizes(full_qwen3, tmp_path):
    model, tok = hf_io.from_pretrained(full_qwen3), hf_io.load_tokenizer(full_qwen3)
    assert model.config.vocab_size == len(tok) == QWEN3_TOKENS
    plan = add_markers(tok, MARKERS, QWEN3_TOKENS, allow_resize=True)
    assert plan.vocab_size == 151_680  # 151,669 + 7 rounded up to a multiple of 64
    assert plan.new_rows == tuple(range(QWEN3_TOKENS, QWEN3_TOKENS + len(MARKERS)))
    grown = grow_embeddings(model, plan.vocab_size, plan.new_rows)
    _assert_grown(model, grown, plan)
    hf_io.check_vocab(plan.tokenizer, grown.config)
    ids = tok.encode(TEXT, add_special_tokens=False)
    np.testing.assert_allclose(_logits(grown, ids)[:, :QWEN3_TOKENS], _logits(model, ids), rtol=1e-6, atol=1e-6)
    hf_io.save_pretrained(grown, tmp_path)  # a grown model is an ordinary checkpoint
    assert hf_io.from_pretrained(tmp_path).config.vocab_size == 151_680
    # On resume the run's saved tokenizer meets the base checkpoint again: the same plan, or the same clear error.
    plan.tokenizer.save_pretrained(str(tmp_path))
    saved = hf_io.load_tokenizer(tmp_path)
    resumed = add_markers(saved, MARKERS, QWEN3_TOKENS, allow_resize=True)
    assert (resumed.ids, resumed.vocab_size, resumed.new_rows) == (plan.ids, plan.vocab_size, plan.new_rows)
    with pytest.raises(MarkerError, match=r"7 marker token\(s\) need embedding rows .* model\.resize_embeddings"):
        add_markers(saved, MARKERS, QWEN3_TOKENS, allow_resize=False)


# --- Reserved special tokens ------------------------------------------------------------------------------------------

def _reserved_tokenizer(reserved_in_model_vocab: bool):
    """A small tokenizer shaped like Llama-3's: 4 words, then 10 `<|reserved_special_token_N|>` special tokens (ids
    4-13), in the model's vocabulary too or only among the added tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    reserved = [f"<|reserved_special_token_{n}|>" for n in range(10)]
    words = ["<pad>", "<eos>", "hello", "world"]
    vocab = {w: i for i, w in enumerate(words + (reserved if reserved_in_model_vocab else []))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                               additional_special_tokens=reserved)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    assert [tok.convert_tokens_to_ids(t) for t in reserved] == list(range(4, 14))
    return tok


@pytest.mark.parametrize("in_model_vocab", [True, False], ids=["model_vocab", "added_only"])
def test_reserved_tokens_are_reused(in_model_vocab, tmp_path):
    tok = _reserved_tokenizer(in_model_vocab)
    plan = add_markers(tok, MARKERS, 14, allow_resize=False)
    assert plan.ids == {t: 4 + n for n, t in enumerate(MARKERS)}
    assert plan.vocab_size == 14 and plan.new_rows == tuple(range(4, 11))
    new = plan.tokenizer
    vocab = new.get_vocab()
    assert len(vocab) == 14 and all(f"<|reserved_special_token_{n}|>" not in vocab for n in range(7))
    assert vocab["<|reserved_special_token_7|>"] == 11  # the unused ones stay
    assert new.encode("hello<stage:opening><s:greet> world", add_special_tokens=False) == [2, 4, 7, 3]
    assert new.convert_ids_to_tokens([4, 7]) == ["<stage:opening>", "<s:greet>"]
    assert (new.eos_token, new.pad_token, new.chat_template) == ("<eos>", "<pad>", tok.chat_template)
    new.save_pretrained(str(tmp_path))
    assert add_markers(hf_io.load_tokenizer(tmp_path), MARKERS, 14, allow_resize=False).ids == plan.ids


def test_reserved_tokens_then_resize():
    tok = _reserved_tokenizer(True)
    markers = MARKERS + [tl.strategy_token(f"extra{n}") for n in range(5)]  # 12 markers, 10 reserved tokens
    with pytest.raises(MarkerError, match=r"12 marker token\(s\) need embedding rows but the checkpoint has only "
                                          r"10 free \(10 unused reserved token\(s\), 0 row\(s\) past"):
        add_markers(tok, markers, 14, allow_resize=False)
    plan = add_markers(tok, markers, 14, allow_resize=True)
    assert list(plan.ids.values()) == list(range(4, 16)) and plan.vocab_size == 64
    assert plan.new_rows == tuple(range(4, 16))


# --- Tokenizers that already have the markers -------------------------------------------------------------------------

def test_markers_the_tokenizer_has_keep_their_ids():
    corpus = ["hello there how can i help", "i recommend the red one"] * 10
    tok = tl.train_tokenizer(corpus, vocab_size=300, special_tokens=MARKERS[:5])
    before = {t: tok.convert_tokens_to_ids(t) for t in MARKERS[:5]}
    plan = add_markers(tok, MARKERS, len(tok) + 10, allow_resize=False)
    assert {t: plan.ids[t] for t in MARKERS[:5]} == before
    assert plan.new_rows == (len(tok), len(tok) + 1) == (plan.ids[MARKERS[5]], plan.ids[MARKERS[6]])
    assert plan.vocab_size == len(tok) + 10
    assert ChatFormat.from_tokenizer(plan.tokenizer) == ChatFormat.from_tokenizer(tok)
    assert add_markers(tok, MARKERS[:5], len(tok), allow_resize=False).new_rows == ()


# --- Sharding and errors ----------------------------------------------------------------------------------------------

def test_grow_keeps_sharding(tiny_qwen3, qwen3_tok):
    mesh = jax.make_mesh((2, 2, 2), hf_io.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = hf_io.from_pretrained(tiny_qwen3, mesh=mesh)
    plan = add_markers(qwen3_tok, MARKERS, QWEN3_EMBEDDING_ROWS, allow_resize=False)
    grown = grow_embeddings(sharded, QWEN3_EMBEDDING_ROWS + 64, plan.new_rows)
    table = grown.embed_tokens.embedding[...]
    assert table.shape == (QWEN3_EMBEDDING_ROWS + 64, 64)
    assert table.sharding == sharded.embed_tokens.embedding[...].sharding  # ("tensor", "fsdp") on the same mesh
    assert nnx.get_partition_spec(nnx.state(grown)) == nnx.get_partition_spec(nnx.state(sharded))
    # Every other parameter is the very same array.
    assert grown.layers.mlp.up_proj.kernel[...] is sharded.layers.mlp.up_proj.kernel[...]
    reference = grow_embeddings(hf_io.from_pretrained(tiny_qwen3), QWEN3_EMBEDDING_ROWS + 64, plan.new_rows)
    np.testing.assert_allclose(np.asarray(table), np.asarray(reference.embed_tokens.embedding[...]), atol=1e-7)


def test_errors(qwen3_tok, tiny_qwen3):
    with pytest.raises(MarkerError, match="ids up to 151668 but the checkpoint's embedding has 151000 rows; use the "
                                          "tokenizer saved with this checkpoint"):
        add_markers(qwen3_tok, MARKERS, 151_000, allow_resize=True)
    model = hf_io.from_pretrained(tiny_qwen3)
    with pytest.raises(MarkerError, match="must be >= the model's 151936"):
        grow_embeddings(model, 1000, ())
    with pytest.raises(MarkerError, match=r"must lie in \[0, 151936\)"):
        grow_embeddings(model, QWEN3_EMBEDDING_ROWS, (QWEN3_EMBEDDING_ROWS,))
    assert grow_embeddings(model, QWEN3_EMBEDDING_ROWS, ()) is model
