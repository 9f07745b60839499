"""gopo_jax.models.bert: MiniLM embeddings against the PyTorch reference, pooling maths, load errors."""
import chex
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax.models import bert

TEXTS = [
    "Hello, how can I help?",
    "I am looking for a pair of red running shoes in size 7, made from recycled material.",
    "",
    "ok",
    "Regretting You by Colleen Hoover is $4.99 as an ebook and $14.77 as a paperback. " * 6,
]


@pytest.fixture(scope="module")
def encoder():
    return bert.sentence_encoder()


def test_embeddings_match_transformers_bert(encoder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder = str(bert.minilm_dir())
    model = transformers.BertModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    tok = transformers.BertTokenizerFast.from_pretrained(folder)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(pooled, dim=-1).numpy()
    ours = encoder.encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    # Same tokenisation as the HF fast tokenizer, then fp32 maths: agreement to float rounding.
    assert [len(x) for x in encoder.tokenize(TEXTS)] == batch["attention_mask"].sum(1).tolist()
    assert np.abs(ours - ref).max() < 1e-5


def test_encode_is_batch_independent(encoder):
    together = encoder.encode(TEXTS)
    alone = np.stack([encoder.encode([t])[0] for t in TEXTS[:2]])
    np.testing.assert_allclose(together[:2], alone, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-6)


def test_encode_rejects_a_single_string(encoder):
    with pytest.raises(TypeError, match="sequence of strings"):
        encoder.encode("hello")


class MeanPoolTest(chex.TestCase):

    @chex.all_variants(with_pmap=False)
    def test_mean_pool_normalise_hand_computed(self):
        hidden = jnp.array([[[3.0, 0.0], [1.0, 4.0], [100.0, 100.0]]])  # last token is padding
        mask = jnp.array([[True, True, False]])
        out = self.variant(bert.mean_pool_normalise)(hidden, mask)
        # mean of the valid tokens = (2, 2); normalised = (1/sqrt2, 1/sqrt2)
        np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5]], atol=1e-6)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(bert.BertLoadError, match="config.json"):
        bert.load_bert(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(bert.BertLoadError, match="model_type"):
        bert.load_bert(tmp_path)
