"""G-Eval in the comparison: every finished run's held-out turns are judged through an OpenAI-compatible endpoint
(a stub server on loopback, test_openai_client.StubOpenAI), the score becomes a column of the tables and the third
panel of Figure 1, and a resumed comparison reads each run's cached geval.json instead of asking the judge again."""
import json

import pytest

from configs import compare as compare_config
from experiments import compare as compare_lib
from test_openai_client import StubOpenAI

SAMPLES = [{"episode": 0, "turn": 0, "context": "Customer: hi, i want a phone", "response": "hello, which brand?",
            "strategy": "elicit: ask what the customer wants"},
           {"episode": 0, "turn": 1, "context": "Customer: hi\nAgent: hello\nCustomer: cheap", "response": "try the x1",
            "strategy": "recommend: suggest an item"}]


def fake_train(config, directory):
    """A finished run's files without training: a summary and the judge samples."""
    block = {k: {"mean": 0.3 + 0.1 * config.seed, "lo": 0.2, "hi": 0.4, "n": 4}
             for k in ("tse", "gre", "esndcg", "alignment", "sop_validity", "outcome", "turns")}
    summary = {"env": config.env.name, "method": config.method, "eval_episodes": 4, "reference": block,
               config.method: block | {"ntse": 1.0}, "wall_seconds": 0.0}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "metrics.jsonl").write_text(json.dumps({"step": config.sft.steps, "eval/tse": 0.3}) + "\n")
    (directory / "judge_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return summary


def test_compare_judges_every_run_once(tmp_path):
    judge = StubOpenAI(("judge-model",), top_logprobs={"4": 0.6, " 5": 0.3, "The": 0.1})
    c = compare_config.get_config()
    c.quick, c.seeds, c.methods, c.convergence_seeds, c.environments = True, 2, "gopo,sft", 0, "synthetic_shop"
    c.tuning_seeds, c.vmap_seeds = 0, False
    c.geval.judge, c.geval.endpoint_model, c.geval.endpoint_url = "endpoint", "judge-model", judge.url
    c.geval.criteria = "fluency,coherence"
    try:
        results = compare_lib.compare(c, tmp_path, train_fn=fake_train)
    finally:
        judge.close()
    # 2 methods x 2 seeds x 2 criteria x 2 samples, each judged once from its log-probabilities: (4·0.6 + 5·0.3)/0.9.
    assert len(judge.chat_requests()) == 16
    assert results["geval"]["available"] and results["geval"]["judge"] == "endpoint:judge-model"
    for label in ("gopo", "sft"):
        ci = results["table"]["synthetic_shop"][label]["geval"]
        assert ci["n"] == 2 and ci["mean"] == pytest.approx(3.9 / 0.9)
        stored = json.loads((tmp_path / "runs" / "synthetic_shop" / label / "seed0" / "geval.json").read_text())
        assert stored["samples"] == 2 and set(stored["per_criterion"]) == {"fluency", "coherence"}
    md = (tmp_path / "results.md").read_text()
    assert "| geval |" in md and "judge endpoint:judge-model" in md
    assert (tmp_path / "figure1.png").stat().st_size > 0
    # A report-only call with more seeds trains nothing and says what is missing.
    c.seeds = 3
    partial = compare_lib.compare(c, tmp_path, report_only=True)
    assert {r["status"] for r in partial["runs"] if r["seed"] == 2} == {"not run"}
    assert partial["table"]["synthetic_shop"]["gopo"]["tse"]["n"] == 2
    assert "Not trained (yet): 2 runs" in (tmp_path / "results.md").read_text()
    c.seeds = 2
    # Resumed with the judge gone: the cached scores are read, nothing is asked.
    c.geval.endpoint_url = "http://127.0.0.1:9"
    again = compare_lib.compare(c, tmp_path, train_fn=fake_train)
    assert again["table"]["synthetic_shop"]["gopo"]["geval"] == json.loads(json.dumps(
        results["table"]["synthetic_shop"]["gopo"]["geval"]))
