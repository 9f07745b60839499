"""A config value of the wrong type or out of range is one `error: ...` line and exit status 2, before anything is
built: the command line turns type errors into that line (gopo_jax.command_line), gopo_jax.train.build's
`validate_config` the range checks, which these tests go through one by one."""
import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import pytest

from configs import mgshop, multiwoz, tmallbrand
from gopo_jax.train.build import validate_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _with(key: str, value):
    config = mgshop.get_config()
    *parents, name = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[name] = value
    return config


# The checks tests/test_build.py does not already go through.
@pytest.mark.parametrize("key, value, message", [
    ("sampling.temperature", -1.0, "sampling.temperature must be a finite number >= 0 (0: greedy)"),
    ("sampling.temperature", math.nan, "sampling.temperature must be a finite number >= 0"),
    ("sampling.top_k", -1, "sampling.top_k must be >= 0"),
    ("sampling.top_p", 3.0, "sampling.top_p must be in (0, 1]"),
    ("sampling.top_p", 0.0, "sampling.top_p must be in (0, 1]"),
    ("train.lr_cs", -1e-3, "train.lr_expert, train.lr_cs and sft.learning_rate must be finite numbers >= 0"),
    ("train.lr_expert", math.nan, "train.lr_expert, train.lr_cs and sft.learning_rate must be finite"),
    ("sft.learning_rate", math.inf, "train.lr_expert, train.lr_cs and sft.learning_rate must be finite"),
    ("train.clip_norm", 0.0, "train.clip_norm must be a finite number > 0"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints must be >= 1"),
    ("eval.judge_dialogues", -1, "eval.judge_dialogues must be >= 0"),
    ("layout.reply_len", 0, "layout.context_len, layout.customer_len, layout.reply_len and layout.max_turns"),
    ("model.hidden_size", 0, "model.hidden_size, model.num_layers, model.intermediate_size and model.vocab_size "
                             "must be -1 (the preset's) or >= 1"),
    ("model.lora.rank", -1, "model.lora.rank must be >= 0 (0: full fine-tune) and model.lora.alpha a finite"),
    ("model.lora.alpha", 0.0, "model.lora.rank must be >= 0 (0: full fine-tune) and model.lora.alpha a finite"),
    ("env.max_turns", 0, "env.max_relevance and env.max_turns must be -1 (the environment's own) or >= 1"),
    ("gopo.clip_eps", -0.2, "gopo.clip_eps and gopo.kl_clamp must be finite numbers > 0"),
    ("gopo.kl_clamp", 0.0, "gopo.clip_eps and gopo.kl_clamp must be finite numbers > 0"),
    ("gopo.beta_pref", 0.0, "gopo.beta_pref must be a finite number > 0"),
    ("gopo.beta_cs", -0.05, "gopo.beta_expert, gopo.beta_cs and gopo.mu_lr must be finite numbers >= 0"),
    ("gopo.mu_lr", math.nan, "gopo.beta_expert, gopo.beta_cs and gopo.mu_lr must be finite numbers >= 0"),
])
def test_an_out_of_range_value_names_its_key(key, value, message):
    with pytest.raises(ValueError) as error:
        validate_config(_with(key, value))
    assert str(error.value).startswith(f"bad config: {message}") and "\n" not in str(error.value)


def test_the_shipped_configs_are_in_range():
    for module in (mgshop, multiwoz, tmallbrand):
        validate_config(module.get_config())


def test_a_run_config_written_before_the_newer_keys_still_validates():
    """Serving and export rebuild a run from its config.json, which may predate eval.judge_dialogues and model.lora."""
    old = json.loads(mgshop.get_config().to_json())
    del old["eval"]["judge_dialogues"], old["model"]["lora"]
    validate_config(ml_collections.ConfigDict(old))


def _train(tmp_path: pathlib.Path, override: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", "experiments.mgshop", "--workdir", str(tmp_path / "run"), override],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("override, message", [
    ("--config.train.steps=abc", "flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    ("--config.train.group_size=2.5", "flag --config.train.group_size=2.5: invalid literal for int() with base 10"),
    ("--config.sampling.top_p=high", "flag --config.sampling.top_p=high: could not convert string to float"),
    ("--config.train.steps=-5", "bad config: train.steps must be >= 0"),
    ("--config.sampling.top_p=3", "bad config: sampling.top_p must be in (0, 1]"),
    ("--config.sampling.temperature=-1", "bad config: sampling.temperature must be a finite number >= 0"),
])
def test_a_bad_override_is_one_error_line_before_anything_is_built(tmp_path, override, message):
    result = _train(tmp_path, override)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr[-2000:]
    # Nothing was built: the run directory holds no tokenizer, checkpoint or metrics.
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
