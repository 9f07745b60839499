"""The command line of every entry point (gopo_jax.command_line): each console script of pyproject.toml shows its
help from outside the repository, a typo in a config override is a one-line error naming the flag, and
gopo-inspect reports a tiny run's config, checkpoint fingerprint, metrics, summary and tokenizer markers.

A console script runs as installed (`pip install -e .` puts it beside the interpreter) or, where the package is not
installed, as its `module:function` entry called the way the installed wrapper calls it."""
import json
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from gopo_jax import inspect_run
from tests.helpers import checkpointed_run, fake_train, tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def command(name: str) -> list[str]:
    installed = pathlib.Path(sys.executable).parent / name
    if installed.exists():
        return [str(installed)]
    module, function = SCRIPTS[name].split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.argv[0] = {name!r}; "
                                  f"sys.exit({function}())"]


def run(name: str, *argv: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([*command(name), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def test_the_console_scripts():
    assert set(SCRIPTS) == {"gopo-train", "gopo-compare", "gopo-serve", "gopo-chat", "gopo-export", "gopo-inspect"}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_from_outside_the_repository(name, tmp_path):
    module = __import__(SCRIPTS[name].split(":")[0], fromlist=["cli"])
    result = run(name, "--help", cwd=tmp_path)
    # absl's --help exits with status 1 after printing the usage.
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith(module.__doc__.splitlines()[0]), result.stdout[:400]
    assert "--workdir" in result.stdout


def test_a_typo_in_an_override_is_a_one_line_error(tmp_path):
    for argv, message in (
            (["--config.train.stpes=3"], "error: --config.train.stpes: the config has no key 'stpes' (did you mean "
                                         "'steps'?); an override must name an existing key"),
            (["--config.train.steps=many"], "error: flag --config.train.steps=many: invalid literal for int()"),
            (["--config", "nowhere.py"], "error: --config: no such config file nowhere.py")):
        result = run("gopo-train", "--workdir", str(tmp_path / "run"), *argv, cwd=tmp_path)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "run").exists()
    result = run("gopo-compare", "--workdir", str(tmp_path / "cmp"), "--config.variants.gopo_no_ea.gopo.use_expret=0",
                 cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: --config.variants.gopo_no_ea.gopo.use_expret: the config has no key 'use_expret' (did you mean "
        "'use_expert'?); an override must name an existing key")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return checkpointed_run(tiny_run_config(), tmp_path_factory.mktemp("run"))


def test_inspect_a_checkpointed_run(tiny_run):
    report = inspect_run.inspect_run(tiny_run)
    config = report["config"]
    assert (config["env"], config["method"], config["seed"]) == ("synthetic_shop", "gopo", 0)
    assert (config["model"]["hidden_size"], config["model"]["num_layers"]) == (32, 1)
    (step,) = report["checkpoints"]["steps"]
    assert step["step"] == 0 and step["bytes"] > 0 and step["fingerprint"]["env"] == "synthetic_shop"
    assert report["checkpoints"]["fingerprint_check"] == {"status": "matches"}
    assert report["checkpoints"]["parameters"]["cs"] > 0
    tokenizer = report["tokenizer"]
    assert list(tokenizer["strategy_markers"]) == step["fingerprint"]["strategies"]
    assert tokenizer["strategies_without_marker"] == [] and tokenizer["chat_template"]
    assert report["metrics"]["lines"] == 0 and report["summary"] is None
    text = inspect_run.format_report(report)
    assert "matches the config: yes" in text and "strategy markers: greet=" in text
    assert "summary: none" in text


def test_inspect_metrics_summary_and_a_changed_config(tiny_run, tmp_path):
    workdir = tmp_path / "run"
    for path in tiny_run.rglob("*"):
        if path.is_file():
            (workdir / path.relative_to(tiny_run)).parent.mkdir(parents=True, exist_ok=True)
            (workdir / path.relative_to(tiny_run)).write_bytes(path.read_bytes())
    config = tiny_run_config()
    fake_train(config, workdir)  # metrics.jsonl (eval/tse at two steps) and summary.json: TSE β_pref/10
    (workdir / "checkpoints" / "7.corrupt-20250101-000000").mkdir()  # what a resume does with an unreadable step
    tse = config.gopo.beta_pref / 10
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 1, "sft/loss": 2.5}\n{"step": 2, "train/lo')  # a write cut by kill -9
    resolved = json.loads((workdir / "config.json").read_text())
    resolved["model"]["hidden_size"] = 64
    (workdir / "config.json").write_text(json.dumps(resolved))
    report = inspect_run.inspect_run(workdir)
    metrics = report["metrics"]
    assert metrics["lines"] == 3 and metrics["unreadable"] == [4]
    assert metrics["phases"]["eval"] == {"step": config.sft.steps + 1, "values": {"tse": pytest.approx(tse)}}
    assert metrics["phases"]["sft"] == {"step": 1, "values": {"loss": 2.5}}
    assert report["summary"]["gopo"]["tse"]["mean"] == pytest.approx(tse)
    check = report["checkpoints"]["fingerprint_check"]
    assert check["status"] == "differs"
    assert {"key": "model_config.hidden_size", "checkpoint": 32, "config": 64} in check["differences"]
    text = inspect_run.format_report(report)
    assert "matches the config: differs" in text and "model_config.hidden_size: checkpoint 32, config 64" in text
    assert "summary: synthetic_shop · gopo · 4 held-out episodes" in text and "unreadable lines (not JSON): 4" in text
    assert report["checkpoints"]["set_aside"] == ["7.corrupt-20250101-000000"]
    assert "unreadable steps set aside by a resume: 7.corrupt-20250101-000000" in text


def test_inspect_command_line(tiny_run, tmp_path):
    result = run("gopo-inspect", "--workdir", str(tiny_run), "--json", "--nocheck_fingerprint", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["checkpoints"]["fingerprint_check"] == {"status": "not checked", "reason": "--nocheck_fingerprint"}
    result = run("gopo-inspect", "--workdir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {tmp_path} is not a run directory: it has no config.json (the resolved config the trainer writes "
        "first); point --workdir at a directory written by gopo-train")
