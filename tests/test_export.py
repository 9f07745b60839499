"""`python -m gopo_jax.export`: a tiny trained run exported as Hugging Face folders loads in `transformers`, gives
our logits on the run's own evaluation dialogues (fp32, max |Δlogit| printed), keeps the marker tokens and the chat
template, and its sop.json reloads with the project's loader; LoRA agents export with their adapters merged;
single-agent runs export the CS only; errors name the fix."""
import json
import os
import pathlib
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gopo_jax import export
from gopo_jax.dialogue.sop import load_sop
from gopo_jax.models import lora, qwen3
from gopo_jax.models.tokenizer import strategy_token
from gopo_jax.train.checkpoint import CheckpointError
from tests.helpers import checkpointed_run, tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SFT_STEPS = 4  # the warm start's last checkpoint step; the one GOPO iteration is the next


def tiny_config(method="gopo"):
    c = tiny_run_config()
    with c.unlocked():
        c.method = method
        c.sft.steps, c.sft.episodes, c.sft.batch_size = SFT_STEPS, 16, 8
        c.train.steps, c.train.groups, c.train.group_size, c.train.minibatches, c.train.epochs = 1, 2, 4, 1, 1
        c.train.eval_every = c.train.checkpoint_every = 1
        c.eval.episodes = 4
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from gopo_jax.train.driver import train_run

    workdir = tmp_path_factory.mktemp("trained")
    train_run(tiny_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported")
    lines = []
    folders = export.export_run(trained, out, log=lines.append)
    return export.load_run(trained), folders, lines


def _our_logits(model, tokens, valid):
    return np.asarray(jax.jit(lambda t, v: model(t, qwen3.positions_from_valid(v), v)[0])(tokens, valid))


@pytest.mark.slow
def test_exported_agents_give_our_logits_on_the_runs_dialogues(exported):
    run, folders, lines = exported
    assert set(folders) == {"expert", "cs"} and len(lines) == 2
    c = run.components
    traj = c.eval_rollout(run.params, c.eval_episodes(), jax.random.key(0))
    tokens, valid = np.asarray(traj.tokens), np.asarray(traj.valid)
    for name, folder in folders.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
        ours = _our_logits(export.agent_model(run, name), jnp.asarray(tokens), jnp.asarray(valid))
        worst = 0.0
        for b in range(tokens.shape[0]):
            # A Hugging Face user feeds the dialogue without the buffer's pad slots; ours skip them by the mask.
            ids = torch.from_numpy(tokens[b][valid[b]].astype(np.int64))[None]
            with torch.no_grad():
                theirs = hf(ids).logits[0].numpy()
            worst = max(worst, float(np.abs(theirs - ours[b][valid[b]]).max()))
        print(f"{name}: max |Δlogit| = {worst:.2e} over {int(valid.sum())} valid positions of "
              f"{tokens.shape[0]} evaluation dialogues")
        assert worst < 1e-4, f"{name}: exported model differs from ours by {worst}"


def test_exported_tokenizer_keeps_markers_template_and_stop_token(exported):
    run, folders, _ = exported
    world = run.world
    for folder in folders.values():
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        table = json.loads((folder / "strategies.json").read_text())
        assert [s["name"] for s in table["strategies"]] == list(world.spec.strategies)
        for entry in table["strategies"] + table["stages"]:
            assert tok.encode(entry["marker"], add_special_tokens=False) == [entry["token_id"]]
        assert [s["token_id"] for s in table["strategies"]] == list(world.vocab.strategy_ids)
        assert [s["token_id"] for s in table["stages"]] == list(world.vocab.stage_ids)
        assert table["strategies"][0]["marker"] == strategy_token(world.spec.strategies[0])
        assert all(s["description"] for s in table["strategies"])
        messages = [{"role": "system", "content": "welcome"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": table["stages"][0]["marker"] + "hello"}]
        assert (tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                == world.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        generation = transformers.GenerationConfig.from_pretrained(folder)
        assert generation.eos_token_id == world.vocab.eot == table["end_of_turn"]["token_id"]
        assert generation.pad_token_id == world.vocab.pad


def test_sop_json_reloads_with_the_project_loader(exported):
    run, folders, _ = exported
    sop, loaded = run.world.spec.sop, load_sop(folders["expert"] / export.SOP_FILE)
    assert (loaded.name, loaded.strategies, loaded.stages, loaded.initial) == (sop.name, sop.strategies, sop.stages,
                                                                               sop.initial)
    for field in ("allowed", "transition", "terminal"):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(sop, field))


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"]}


@pytest.mark.slow
def test_command_line_exports_an_earlier_step(trained, tmp_path):
    out = tmp_path / "warm_start"
    result = subprocess.run([sys.executable, "-m", "gopo_jax.export", "--workdir", str(trained), "--out", str(out),
                             f"--step={SFT_STEPS}"], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    assert f"iteration {SFT_STEPS}" in result.stdout
    warm = export.load_run(trained, SFT_STEPS)
    back = transformers.AutoModelForCausalLM.from_pretrained(out / "cs", dtype=torch.float32)
    want = np.asarray(export.agent_model(warm, "cs").embed_tokens.embedding[...])
    np.testing.assert_array_equal(back.model.embed_tokens.weight.detach().numpy(), want)


def test_single_agent_run_exports_the_cs_only(tmp_path):
    workdir = checkpointed_run(tiny_config("grpo"), tmp_path / "grpo")
    out = tmp_path / "out"
    (out / "expert").mkdir(parents=True)
    (out / "expert" / export.STRATEGIES_FILE).write_text("{}")  # an earlier export of another run
    lines = []
    folders = export.export_run(workdir, out, log=lines.append)
    assert set(folders) == {"cs"} and not (out / "expert").exists()
    assert "single-agent run" in lines[0] and "grpo" in lines[0]
    assert json.loads((out / "cs" / export.STRATEGIES_FILE).read_text())["use_expert"] is False
    transformers.AutoModelForCausalLM.from_pretrained(out / "cs")


def test_lora_agents_export_with_their_adapters_merged(tmp_path):
    config = tiny_config()
    with config.unlocked():
        config.model.lora.rank = 4

    def trained_adapters(params):  # B = 0 at initialisation would make the adapters a no-op
        def b_drawn(path, x):
            where = jax.tree_util.keystr(path)
            if not (lora.is_adapter(path) and "lora_b" in where):
                return x
            return 0.1 * jax.random.normal(jax.random.key(zlib.crc32(where.encode())), x.shape, x.dtype)

        return jax.tree_util.tree_map_with_path(b_drawn, params)

    run = export.load_run(checkpointed_run(config, tmp_path / "lora", trained_adapters))
    folders = export.export_run(run.workdir, tmp_path / "out", log=[].append)
    tokens = np.asarray(run.world.tokenizer.encode(" hello and welcome how can i help you today"), np.int32)[None]
    for name, folder in folders.items():
        graphdef = run.components.expert_gd if name == "expert" else run.components.cs_gd
        adapted, base = (nnx.merge(graphdef, p) for p in (run.params[name], lora.adapters_off(run.params[name])))
        assert adapted.config.lora_rank == 4
        ours = _our_logits(adapted, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))[0]
        assert np.abs(ours - _our_logits(base, jnp.asarray(tokens), jnp.ones(tokens.shape, bool))[0]).max() > 1e-3
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = hf(torch.from_numpy(tokens.astype(np.int64))).logits[0].numpy()
        np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(export.RunError, match="does not exist"):
        export.load_run(tmp_path / "nowhere")
    with pytest.raises(export.RunError, match="config.json is missing"):
        export.load_run(tmp_path)
    workdir = checkpointed_run(tiny_config(), tmp_path / "run")
    with pytest.raises(CheckpointError, match="No checkpoint step 7 .* available steps: \\[0\\]"):
        export.load_run(workdir, 7)
    foreign = tmp_path / "mine"
    (foreign / "cs").mkdir(parents=True)
    (foreign / "cs" / "notes.txt").write_text("keep")
    with pytest.raises(export.RunError, match="not an export of gopo_jax"):
        export.export_run(workdir, foreign)
    assert (foreign / "cs" / "notes.txt").exists()
    for ckpt in (workdir / "checkpoints").iterdir():
        ckpt.rename(tmp_path / ckpt.name)
    with pytest.raises(export.RunError, match="holds no checkpoint; train the run first"):
        export.load_run(workdir)


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gopo_jax.export", "--workdir", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "out")], cwd=REPO, env=_env(), capture_output=True, text=True,
                            timeout=300, check=False)
    message = (f"error: --workdir {tmp_path / 'nowhere'} does not exist; point it at a run directory written by the "
               "trainer (python -m experiments.mgshop --config configs/mgshop.py --workdir DIR)")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [message]
