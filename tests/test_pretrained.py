"""A run from a Hugging Face Qwen3 checkpoint with a real 151k-token Qwen vocabulary: the world takes the
checkpoint's tokenizer and chat template, puts the marker tokens in free embedding rows, loads the weights, and the
whole pipeline (SFT -> GOPO -> evaluation) runs on it."""
import jax
import numpy as np
import pytest

from configs.tmallbrand import get_config
from gopo_jax.dialogue.rollout import ModelAgents, SamplingConfig
from gopo_jax.models import hf_io
from gopo_jax.train.driver import train_run
from tests.hf_fixtures import QWEN3_EMBEDDING_ROWS, qwen3_tok, tiny_qwen3  # noqa: F401, F811  (fixtures)
from tests.helpers import world_and_agents

QWEN3_TOKENS = 151_669


def pretrained_config(shared_data, checkpoint, **overrides):
    c = get_config()
    c.unlock()
    c.env.data_dir = str(shared_data / "abcd")
    c.model.init_from = str(checkpoint)  # "" leaves it to the per-agent keys
    # Qwen's chat pieces take ids of their own: "<|im_start|>system\n" ... "<|im_end|>", the think block.
    c.layout.context_len, c.layout.customer_len, c.layout.reply_len, c.layout.max_turns = 48, 40, 32, 4
    # Rows of [rows, 151,936] fp32 logits at a time (~156 MB), as configs/qwen3: the toy worlds' 4096 rows would
    # hold every position of these batches at once, several GB per vocabulary-wide buffer.
    c.model.logits_chunk = 256
    # The tests' batches have 4 rows: on the 8 fake devices, data=8 cannot split them and every device would hold
    # and compute all of them (and a full copy of the parameters); data=4 x fsdp=2 splits both.
    c.mesh.data, c.mesh.fsdp = 4, 2
    for k, v in overrides.items():
        section, key = k.split("__")
        c[section][key] = v
    c.lock()
    return c


@pytest.fixture(scope="module")
def pretrained(shared_data, tiny_qwen3, tmp_path_factory):
    return world_and_agents(pretrained_config(shared_data, tiny_qwen3), tmp_path_factory.mktemp("pre"))


def test_world_takes_the_checkpoints_tokenizer_template_and_free_rows(pretrained, qwen3_tok):
    world = pretrained[0]
    n_markers = len(world.vocab.strategy_ids) + len(world.vocab.stage_ids)
    assert len(world.tokenizer) == QWEN3_TOKENS + n_markers
    # Qwen3 has 267 embedding rows past its tokenizer: the markers take them, the embedding keeps its size.
    assert world.model_config.vocab_size == world.expert_config.vocab_size == QWEN3_EMBEDDING_ROWS
    assert sorted([*world.vocab.strategy_ids, *world.vocab.stage_ids]) == list(
        range(QWEN3_TOKENS, QWEN3_TOKENS + n_markers))
    assert world.chat_format.eot == qwen3_tok.convert_tokens_to_ids("<|im_end|>")
    assert qwen3_tok.decode(world.vocab.header_open) == "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert world.model_config.hidden_size == 64 and world.model_config.num_layers == 2


def test_loaded_agents_have_the_checkpoints_weights(pretrained, tiny_qwen3):
    world, _, _, params = pretrained
    reference = hf_io.from_pretrained(tiny_qwen3)
    emb = np.asarray(params["cs"]["embed_tokens"]["embedding"][...])
    np.testing.assert_array_equal(emb[:QWEN3_TOKENS], np.asarray(reference.embed_tokens.embedding[...])[:QWEN3_TOKENS])
    # The markers' rows (never trained in the checkpoint) start at the mean of the checkpoint's other rows.
    markers = [*world.vocab.strategy_ids, *world.vocab.stage_ids]
    others = np.delete(emb, markers, axis=0)
    np.testing.assert_allclose(emb[markers], np.broadcast_to(others.mean(0), (len(markers), emb.shape[1])),
                               atol=1e-6)


def test_rollout_renders_the_chat_template(pretrained, qwen3_tok):
    world, ge, gc, params = pretrained
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.eval_episodes(0, 2), jax.random.key(0))
    tokens, valid = np.asarray(traj.tokens[0]), np.asarray(traj.valid[0])
    text = world.tokenizer.decode(tokens[valid])
    assert text.startswith("<|im_start|>system\n")
    assert "<|im_end|>\n<|im_start|>user\n" in text
    assert "<|im_start|>assistant\n<think>\n\n</think>\n\n<stage:" in text
    # Every reply ends on <|im_end|> or fills its slot; nothing re-tokenised: the record is the sampled ids.
    assert np.isfinite(np.asarray(traj.cs_logprob)).all()


@pytest.mark.slow
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_sft_gopo_eval_export_reload_from_a_pretrained_checkpoint(lora_rank, shared_data, tiny_qwen3, tmp_path):
    """The whole path on the real-vocabulary checkpoint: SFT on ABCD's logged agent turns rendered with Qwen3's
    chat template -> GOPO -> evaluation -> export -> transformers gives our logits."""
    import torch
    import transformers
    from flax import nnx

    from gopo_jax import export

    c = pretrained_config(shared_data, tiny_qwen3, sft__source="logged", sft__steps=2, sft__episodes=8,
                          sft__batch_size=4, train__steps=1, train__groups=2, train__group_size=2,
                          train__minibatches=1, train__epochs=1, eval__episodes=4)
    with c.unlocked():
        c.model.lora.rank = lora_rank
    summary = train_run(c, tmp_path / "run")
    assert np.isfinite(summary["gopo"]["gre"]["mean"])
    out = export.export_run(tmp_path / "run", tmp_path / "hf")
    run = export.load_run(tmp_path / "run")
    world = run.components.world
    if lora_rank:
        # The markers' rows trained with the adapters: they no longer all hold the same (mean) row.
        rows = np.asarray(export.agent_model(run, "expert").embed_tokens.embedding[...])[
            list(world.vocab.strategy_ids)]
        assert np.abs(rows - rows[0]).max() > 0
    ids = world.tokenizer.apply_chat_template([{"role": "system", "content": "welcome"},
                                               {"role": "user", "content": "my order is late"}],
                                              add_generation_prompt=True, enable_thinking=False)
    ids = [*ids, world.vocab.stage_ids[0], world.vocab.strategy_ids[1]]
    tokens = np.asarray([ids], np.int32)
    for agent in ("expert", "cs"):
        ours = nnx.merge(run.components.expert_gd if agent == "expert" else run.components.cs_gd, run.params[agent])
        mine = np.asarray(ours(tokens, np.arange(len(ids))[None], np.ones_like(tokens, bool))[0])
        hf = transformers.AutoModelForCausalLM.from_pretrained(out[agent], dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
        assert np.abs(mine - theirs).max() < 1e-3, agent


@pytest.mark.parametrize("shape", [dict(tie_word_embeddings=False, num_heads=8, num_kv_heads=2, head_dim=32),
                                   dict(tie_word_embeddings=True, num_heads=4, num_kv_heads=4, head_dim=8)],
                         ids=["untied-gqa4-hd32", "tied-mha-hd8"])
def test_other_checkpoint_shapes_roll_out_on_policy(shape, shared_data, qwen3_tok, tmp_path):
    """Untied heads, other GQA ratios and head sizes: the rollout's log-probs are the training forward's."""
    from flax import nnx

    from gopo_jax.dialogue import scoring
    from tests.hf_fixtures import tiny_qwen3_checkpoint

    folder = tiny_qwen3_checkpoint(tmp_path / "ckpt", tokenizer=qwen3_tok, **shape)
    world, ge, gc, params = world_and_agents(pretrained_config(shared_data, folder), tmp_path / "run")
    assert world.model_config.tie_word_embeddings == shape["tie_word_embeddings"]
    assert (world.model_config.num_kv_heads, world.model_config.head_dim) == (shape["num_kv_heads"],
                                                                              shape["head_dim"])
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.eval_episodes(0, 2), jax.random.key(1))
    cs_logp, _ = scoring.cs_token_log_probs(nnx.merge(gc, params["cs"]), traj, world.layout)
    m = np.asarray(traj.cs_mask)
    np.testing.assert_allclose(np.asarray(cs_logp)[m], np.asarray(traj.cs_logprob)[m], atol=2e-4)


def test_agents_of_different_sizes_share_the_tokenizer(shared_data, qwen3_tok, tiny_qwen3, tmp_path):
    """A small Expert beside a larger CS of the same family (per-agent init_from)."""
    from tests.hf_fixtures import tiny_qwen3_checkpoint

    cs_folder = tiny_qwen3_checkpoint(tmp_path / "cs", tokenizer=qwen3_tok, hidden_size=96, num_layers=3, seed=1)
    config = pretrained_config(shared_data, "", model__expert_init_from=str(tiny_qwen3),
                               model__cs_init_from=str(cs_folder))
    world, ge, gc, params = world_and_agents(config, tmp_path / "run")
    assert (world.expert_config.hidden_size, world.expert_config.num_layers) == (64, 2)
    assert (world.model_config.hidden_size, world.model_config.num_layers) == (96, 3)
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.eval_episodes(0, 2), jax.random.key(2))
    assert int(np.asarray(traj.ea_mask).sum()) > 0 and np.isfinite(np.asarray(traj.ea_logprob)).all()


def test_the_synthetic_shop_runs_on_a_checkpoints_tokenizer(tiny_qwen3, tmp_path):
    """The pure-JAX shop with Qwen3's tokenizer: its words are id sequences, its slots sized for them."""
    from configs.mgshop import get_config as shop_config

    c = shop_config()
    with c.unlocked():
        c.model.init_from = str(tiny_qwen3)
        c.layout.reply_len = 24
    world, ge, gc, params = world_and_agents(c, tmp_path)
    assert world.kind == "jax" and world.layout.reply_len == 24
    traj = world.make_rollout(world.reference_agents())({}, world.eval_episodes(0, 4), jax.random.key(0))
    assert np.asarray(traj.aligned)[np.asarray(traj.turn_mask)].mean() == 1.0
    rollout = world.make_rollout(ModelAgents(ge, gc, world.vocab, world.layout, SamplingConfig()))
    traj = rollout(params, world.eval_episodes(0, 2), jax.random.key(3))
    assert np.isfinite(np.asarray(traj.cs_logprob)).all()
