"""Tests for gopo_jax.models.hf_io against the Hugging Face PyTorch Qwen3 (logits both ways, greedy decoding,
sharded loading, error messages)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from gopo_jax import sampling
from gopo_jax.models import hf_io, qwen3

transformers = pytest.importorskip("transformers")
TINY = qwen3.get_config("tiny")
TOKENS = np.array([[3, 17, 255, 42, 7, 100, 9, 1], [500, 2, 2, 61, 33, 8, 400, 12]], np.int32)


def _hf_model(tie: bool, seed: int = 0):
    cfg = transformers.Qwen3Config(**{k: v for k, v in TINY.replace(tie_word_embeddings=tie).to_hf_dict().items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1; random scales test that every tensor lands in place
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def _hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@jax.jit
def _jit_logits(graphdef, state, tokens):
    b, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    return nnx.merge(graphdef, state)(tokens, positions, jnp.ones((b, length), bool))[0]


def _our_logits(model, tokens):
    graphdef, state = nnx.split(model)
    return np.asarray(_jit_logits(graphdef, state, jnp.asarray(tokens)))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def hf_checkpoint(request, tmp_path_factory):
    model = _hf_model(tie=request.param)
    folder = tmp_path_factory.mktemp("hf_tied" if request.param else "hf_untied")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_from_pretrained_matches_hf_logits(hf_checkpoint):
    hf_model, folder = hf_checkpoint
    ours = hf_io.from_pretrained(folder)
    assert ours.config.tie_word_embeddings == hf_model.config.tie_word_embeddings
    diff = np.abs(_our_logits(ours, TOKENS) - _hf_logits(hf_model, TOKENS)).max()
    print(f"HF -> ours max |logit diff| (tied={ours.config.tie_word_embeddings}): {diff:.2e}")
    assert diff < 1e-4


def test_greedy_generation_matches_hf(hf_checkpoint):
    hf_model, folder = hf_checkpoint
    ours = hf_io.from_pretrained(folder)
    prompt = TOKENS[:, :5]
    with torch.no_grad():
        want = hf_model.generate(torch.from_numpy(prompt.astype(np.int64)), attention_mask=torch.ones(prompt.shape),
                                 do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=None,
                                 pad_token_id=0).numpy()[:, 5:]
    got = sampling.generate(ours, prompt, np.ones(prompt.shape, bool), jax.random.key(0), max_new_tokens=8,
                            temperature=0.0)
    np.testing.assert_array_equal(np.asarray(got.tokens), want)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, tie):
    ours = qwen3.Qwen3(TINY.replace(tie_word_embeddings=tie), rngs=nnx.Rngs(5))
    hf_io.save_pretrained(ours, tmp_path)
    hf_model = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf_model.config.tie_word_embeddings == tie
    diff = np.abs(_our_logits(ours, TOKENS) - _hf_logits(hf_model, TOKENS)).max()
    print(f"ours -> HF max |logit diff| (tied={tie}): {diff:.2e}")
    assert diff < 1e-4


def test_sharded_files_round_trip(tmp_path):
    ours = qwen3.Qwen3(TINY.replace(tie_word_embeddings=False), rngs=nnx.Rngs(6))
    hf_io.save_pretrained(ours, tmp_path, max_shard_bytes=100_000)
    index = json.loads((tmp_path / hf_io.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (tmp_path / hf_io.SINGLE_FILE).exists()
    back = hf_io.from_pretrained(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(ours, nnx.Param), nnx.state(back, nnx.Param))
    # Saving again unsharded removes the old shards.
    hf_io.save_pretrained(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", hf_io.SINGLE_FILE]


def test_load_onto_mesh(hf_checkpoint):
    hf_model, folder = hf_checkpoint
    mesh = jax.make_mesh((2, 2, 2), hf_io.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ours = hf_io.from_pretrained(folder, mesh=mesh)
    q = ours.layers.self_attn.q_proj.kernel[...]  # stacked [num_layers, D, H*hd]
    assert q.sharding.spec == jax.P(None, "fsdp", "tensor") and q.sharding.mesh.shape == mesh.shape
    assert q.addressable_shards[0].data.shape == (TINY.num_layers, TINY.hidden_size // 2,
                                                  TINY.num_heads * TINY.head_dim // 2)
    assert ours.embed_tokens.embedding[...].sharding.spec == jax.P("tensor", "fsdp")
    assert ours.norm.scale[...].sharding.spec == jax.P(None)
    with jax.set_mesh(mesh):
        logits = _our_logits(ours, TOKENS)
    assert np.abs(logits - _hf_logits(hf_model, TOKENS)).max() < 1e-4


def test_bf16_checkpoint_keeps_dtype(tmp_path):
    ours = qwen3.Qwen3(TINY.replace(param_dtype="bfloat16", dtype="bfloat16"), rngs=nnx.Rngs(2))
    hf_io.save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = hf_io.from_pretrained(tmp_path)
    assert back.config.param_dtype == "bfloat16" and back.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    as_f32 = hf_io.from_pretrained(tmp_path, param_dtype="float32")
    assert as_f32.layers.mlp.up_proj.kernel[...].dtype == jnp.float32


def test_key_tables_are_inverse():
    hf_names = set()
    for path, var in nnx.to_flat_state(nnx.state(qwen3.Qwen3(TINY.replace(tie_word_embeddings=False),
                                                             rngs=nnx.Rngs(0)), nnx.Param)):
        dotted = ".".join(map(str, path))
        layers = range(var.get_value().shape[0]) if path[0] == "layers" else [None]
        for layer in layers:
            hf_name, _ = hf_io.ours_to_hf(dotted, layer)
            assert hf_io.hf_to_ours(hf_name)[:2] == (dotted, layer)
            hf_names.add(hf_name)
    assert "model.layers.1.self_attn.q_proj.weight" in hf_names and len(hf_names) == 3 + 11 * TINY.num_layers
    with pytest.raises(hf_io.HFModelError, match="layer index"):
        hf_io.ours_to_hf("layers.mlp.up_proj.kernel")


def test_layer_slices_land_in_place(hf_checkpoint):
    """HF's model.layers.{i}.X is slice i of our stacked layers.X, both ways."""
    hf_model, folder = hf_checkpoint
    ours = hf_io.from_pretrained(folder)
    hf_params = dict(hf_model.named_parameters())
    for i in range(TINY.num_layers):
        np.testing.assert_array_equal(np.asarray(ours.layers.mlp.down_proj.kernel[...][i]),
                                      hf_params[f"model.layers.{i}.mlp.down_proj.weight"].detach().numpy().T)
        np.testing.assert_array_equal(np.asarray(ours.layers.self_attn.k_norm.scale[...][i]),
                                      hf_params[f"model.layers.{i}.self_attn.k_norm.weight"].detach().numpy())


def test_errors(tmp_path):
    with pytest.raises(hf_io.HFModelError, match="does not exist"):
        hf_io.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(hf_io.HFModelError, match="config.json not found"):
        hf_io.from_pretrained(tmp_path)
    ours = qwen3.Qwen3(TINY, rngs=nnx.Rngs(0))
    hf_io.save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama",
                                                      "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(hf_io.HFModelError, match="only Qwen3ForCausalLM"):
        hf_io.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    shape_error = r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight in .* has shape .* but config.json implies"
    with pytest.raises(hf_io.HFModelError, match=shape_error):
        hf_io.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(hf_io.HFModelError, match=r"missing tensors \['model\.layers\.2\."):
        hf_io.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(hf_io.HFModelError, match=r"unexpected tensors \['model\.layers\.1\."):
        hf_io.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn"}}))
    with pytest.raises(hf_io.HFModelError, match="rope_scaling"):
        hf_io.from_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / hf_io.SINGLE_FILE).unlink()
    with pytest.raises(hf_io.HFModelError, match="looked for model.safetensors"):
        hf_io.from_pretrained(tmp_path)


def test_tokenizer_and_vocab_check(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate("hello world how are you".split())}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(tmp_path)
    loaded = hf_io.load_tokenizer(tmp_path)
    assert isinstance(loaded, transformers.PreTrainedTokenizerFast)
    assert loaded("hello you")["input_ids"] == [2, 6]
    assert loaded.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi "
    hf_io.check_vocab(loaded, TINY)
    with pytest.raises(hf_io.HFModelError, match="tokenizer ids go up to 6 but the model's vocab_size is 5"):
        hf_io.check_vocab(loaded, TINY.replace(vocab_size=5))
    with pytest.raises(hf_io.HFModelError, match="tokenizer.json not found"):
        hf_io.load_tokenizer(tmp_path / "empty")
