"""Inspects a run directory: what the run was configured to do, what it saved and what it measured.

    gopo-inspect --workdir runs/mgshop [--json] [--nocheck_fingerprint]   # or python -m gopo_jax.inspect_run

Reads, never writes: the resolved config (config.json: world, method, model size, seeds, training lengths), the
checkpoints (steps, bytes on disk, the fingerprint each stores and whether it matches the fingerprint the config
builds, which is what a resume or `gopo_jax.export.load_run` requires), metrics.jsonl (the last value of every metric
per phase: sft, train, eval, ...), summary.json (the held-out evaluation's headline) and the tokenizer (its size,
end-of-turn and pad tokens, chat template, and the strategy and stage marker tokens with their ids). Plain text, or
`--json` for machines. Checking the fingerprint builds the run's world from its config and saved tokenizer (seconds
for the synthetic shop, longer for a world fitted from data); `--nocheck_fingerprint` skips it.
"""
from __future__ import annotations

import json
import logging
import pathlib
import re
import textwrap
from typing import Any

import tokenizers
from absl import flags

from gopo_jax import command_line

CHECKPOINTS = "checkpoints"
# Where orbax's JsonSave writes the checkpoint's "metadata" item (gopo_jax.train.checkpoint) inside a step directory.
FINGERPRINT_FILE = pathlib.Path("metadata") / "metadata"
STRATEGY_MARKER = re.compile(r"^<s:(.+)>$")  # gopo_jax.models.tokenizer.strategy_token
STAGE_MARKER = re.compile(r"^<stage:(.+)>$")  # gopo_jax.models.tokenizer.stage_token
HEADLINE_METRICS = ("tse", "gre", "esndcg", "alignment")
WIDTH = 118  # of the plain-text report's wrapped metric lines


class NotARunError(ValueError):
    """A directory that is not a run directory written by the trainer; the message says what is missing."""


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise NotARunError(f"{path} cannot be read as JSON ({e})") from None


def _size(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def config_highlights(config: dict) -> dict:
    """The settings that tell runs apart, from a resolved config (config.json)."""
    model, sft, train = config.get("model", {}), config.get("sft", {}), config.get("train", {})
    lora = model.get("lora", {})
    return {
        "env": config.get("env", {}).get("name"),
        "method": config.get("method"),
        "seed": config.get("seed"),
        "model": {k: model.get(k) for k in ("preset", "hidden_size", "num_layers", "intermediate_size", "vocab_size",
                                             "dtype", "param_dtype", "init_from", "expert_init_from", "cs_init_from")}
        | {"lora_rank": lora.get("rank"), "lora_agents": lora.get("agents")},
        "sft": {k: sft.get(k) for k in ("source", "steps", "batch_size")},
        "train": {k: train.get(k) for k in ("steps", "groups", "group_size", "epochs", "minibatches")},
        "eval_episodes": config.get("eval", {}).get("episodes"),
        "mesh": config.get("mesh"),
    }


def parameter_counts(fingerprint: dict) -> dict[str, int]:
    """Parameters of each agent (LoRA adapters included) from a checkpoint fingerprint's model configs."""
    from flax import nnx  # noqa: PLC0415  (JAX: only when there is a checkpoint to count)

    from gopo_jax.models import qwen3  # noqa: PLC0415

    counts = {}
    for agent, key in (("expert", "expert_config"), ("cs", "model_config")):
        if key in fingerprint:
            config = qwen3.Qwen3Config(**fingerprint[key])
            counts[agent] = qwen3.count_params(nnx.eval_shape(lambda c=config: qwen3.Qwen3(c, rngs=nnx.Rngs(0))))
    return counts


def fingerprint_check(workdir: pathlib.Path, config: dict, stored: dict) -> dict:
    """Whether the fingerprint a checkpoint stores equals the one the run's config builds: {"status": "matches" |
    "differs" | "not checked", "differences" | "reason"}."""
    if not (workdir / "tokenizer" / "tokenizer.json").exists():
        # Building the world without the run's tokenizer would train and save one into the run directory.
        return {"status": "not checked", "reason": "the run has no saved tokenizer (tokenizer/tokenizer.json)"}
    import ml_collections  # noqa: PLC0415

    from gopo_jax.train.build import model_fingerprint  # noqa: PLC0415  (heavy: JAX, models, worlds)
    from gopo_jax.train.checkpoint import flatten_json  # noqa: PLC0415
    from gopo_jax.train.world import build_world  # noqa: PLC0415

    try:
        wanted = model_fingerprint(build_world(ml_collections.ConfigDict(config), workdir))
    except (ValueError, FileNotFoundError) as e:
        return {"status": "not checked", "reason": f"the config does not build its world here: {e}"}
    a, b = flatten_json(stored), flatten_json(wanted)
    differences = [{"key": k, "checkpoint": a.get(k), "config": b.get(k)}
                   for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return {"status": "differs", "differences": differences} if differences else {"status": "matches"}


def checkpoints(workdir: pathlib.Path, config: dict, *, check: bool) -> dict:
    """The finished checkpoint steps (bytes, stored fingerprint), unfinished saves, steps set aside as unreadable,
    and the newest step's fingerprint against the config's."""
    directory = workdir / CHECKPOINTS
    if not directory.is_dir():
        return {"directory": str(directory), "steps": [], "unfinished": [], "set_aside": []}
    steps = []
    for entry in sorted((p for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        stored = entry / FINGERPRINT_FILE
        steps.append({"step": int(entry.name), "bytes": _size(entry),
                      "fingerprint": _read_json(stored) if stored.is_file() else None})
    others = sorted(p.name for p in directory.iterdir() if p.is_dir() and not p.name.isdigit())
    out = {"directory": str(directory), "steps": steps,
           # orbax's temporary directory of a save that did not complete (never restored)
           "unfinished": [name for name in others if ".orbax-checkpoint-tmp" in name],
           # a step a resume found unreadable and renamed `<step>.corrupt-<time>` (gopo_jax.train.checkpoint)
           "set_aside": [name for name in others if ".corrupt-" in name]}
    newest = steps[-1]["fingerprint"] if steps else None
    if newest is not None:
        out["parameters"] = parameter_counts(newest)
        out["fingerprint_check"] = (fingerprint_check(workdir, config, newest) if check
                                    else {"status": "not checked", "reason": "--nocheck_fingerprint"})
    return out


def last_metrics(path: pathlib.Path) -> dict:
    """{"lines", "unreadable", "phases": {phase: {"step", "values": {name: value}}}}: the last logged value of every
    metric of metrics.jsonl, grouped by its phase prefix (`sft/loss` -> phase sft), with the step it was last logged
    at. Lines that are not JSON (a write cut by kill -9) are counted, not read."""
    phases: dict[str, dict] = {}
    lines, unreadable = 0, []
    text = path.read_text() if path.exists() else ""
    for number, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable.append(number)
            continue
        lines += 1
        for key, value in record.items():
            phase, sep, name = key.partition("/")
            if sep:
                entry = phases.setdefault(phase, {"step": None, "values": {}})
                entry["step"] = record.get("step")
                entry["values"][name] = value
    return {"file": str(path), "lines": lines, "unreadable": unreadable, "phases": phases}


def summary_headline(summary: dict) -> dict:
    """The part of summary.json that `headline` shows: the run and, per evaluated policy, the headline metrics."""
    if summary.get("stopped"):
        return {"stopped": True, "iteration": summary.get("iteration")}
    out = {k: summary.get(k) for k in ("env", "method", "eval_episodes", "wall_seconds")}
    for name in ("reference", "sft", summary.get("method")):
        block = summary.get(name)
        if isinstance(block, dict):
            out[name] = {k: block[k] for k in HEADLINE_METRICS if isinstance(block.get(k), dict)}
    return out


def _interval(ci: dict) -> str:
    """mean [lo, hi]; summary.json writes a non-finite bound (one held-out episode) as null."""
    return " ".join([f"{ci['mean']:.3f}",
                     "[" + ", ".join("n/a" if ci.get(k) is None else f"{ci[k]:.3f}" for k in ("lo", "hi")) + "]"])


def headline(summary: dict) -> str:
    """summary.json (or its `summary_headline`) as the lines a finished training command prints."""
    if summary.get("stopped"):
        return f"stopped at iteration {summary['iteration']} (checkpoint saved; rerun the command to resume)"
    wall = summary.get("wall_seconds")
    lines = [f"{summary['env']} · {summary['method']} · {summary['eval_episodes']} held-out episodes"
             + ("" if wall is None else f" · {wall:.0f} s")]
    for name in ("reference", "sft", summary["method"]):
        block = summary.get(name)
        if block:
            # A metric the method does not have (alignment without an Expert) is null in summary.json.
            lines.append(f"  {name:>9}: " + "  ".join(f"{k} {_interval(block[k])}" for k in HEADLINE_METRICS
                                                       if block.get(k) is not None))
    return "\n".join(lines)


def tokenizer_markers(folder: pathlib.Path, strategies: list[str] | None) -> dict | None:
    """The saved tokenizer's size, special tokens, chat template and marker tokens (token -> id); `strategies`
    (a checkpoint fingerprint's) are checked to each have a marker."""
    config_path = folder / "tokenizer_config.json"
    if not config_path.exists():
        return None
    config = _read_json(config_path)
    added = {int(i): entry["content"] for i, entry in config.get("added_tokens_decoder", {}).items()}
    strategy = {m[1]: i for i, token in sorted(added.items()) if (m := STRATEGY_MARKER.match(token))}
    stage = {m[1]: i for i, token in sorted(added.items()) if (m := STAGE_MARKER.match(token))}
    tokenizer_file = folder / "tokenizer.json"
    size = (tokenizers.Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
            if tokenizer_file.exists() else None)
    return {"folder": str(folder), "tokens": size, "end_of_turn": config.get("eos_token"),
            "pad": config.get("pad_token"), "chat_template": bool(config.get("chat_template")),
            "strategy_markers": strategy, "stage_markers": stage,
            "strategies_without_marker": [s for s in strategies or [] if s not in strategy]}


def inspect_run(workdir: str | pathlib.Path, *, check_fingerprint: bool = True) -> dict:
    """Everything `gopo-inspect` shows, as a JSON-able dict; NotARunError for a directory the trainer did not
    write."""
    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise NotARunError(f"{workdir} is not a directory; point --workdir at a run directory written by the "
                           "trainer (gopo-train --workdir DIR)")
    if not (workdir / "config.json").is_file():
        raise NotARunError(f"{workdir} is not a run directory: it has no config.json (the resolved config the "
                           "trainer writes first); point --workdir at a directory written by gopo-train")
    config = _read_json(workdir / "config.json")
    saved = checkpoints(workdir, config, check=check_fingerprint)
    newest = saved["steps"][-1]["fingerprint"] if saved["steps"] else None
    summary_path = workdir / "summary.json"
    return {
        "workdir": str(workdir.resolve()),
        "config": config_highlights(config),
        "checkpoints": saved,
        "metrics": last_metrics(workdir / "metrics.jsonl"),
        "summary": summary_headline(_read_json(summary_path)) if summary_path.exists() else None,
        "tokenizer": tokenizer_markers(workdir / "tokenizer", (newest or {}).get("strategies")),
    }


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_report(report: dict) -> str:
    """The plain-text view of `inspect_run`'s dict."""
    c = report["config"]
    m = c["model"]
    init = ", ".join(f"{k} {m[k]}" for k in ("init_from", "expert_init_from", "cs_init_from") if m.get(k))
    lines = [f"run {report['workdir']}",
             f"config: env {c['env']} · method {c['method']} · seed {c['seed']}",
             f"  model: preset {m['preset']} · layers {m['num_layers']} · hidden {m['hidden_size']} · intermediate "
             f"{m['intermediate_size']} · {m['dtype']} compute / {m['param_dtype']} params"
             + (f" · LoRA rank {m['lora_rank']} ({m['lora_agents']})" if m.get("lora_rank") else "")
             + (f" · from {init}" if init else ""),
             "  training: " + " · ".join([f"sft {c['sft']['steps']} steps ({c['sft']['source']})",
                                          f"{c['train']['steps']} iterations of {c['train']['groups']} x "
                                          f"{c['train']['group_size']} dialogues",
                                          f"{c['eval_episodes']} held-out episodes"])]
    saved = report["checkpoints"]
    if not saved["steps"]:
        lines.append(f"checkpoints: none in {saved['directory']}")
    else:
        lines.append(f"checkpoints: {len(saved['steps'])} in {saved['directory']}")
        for s in saved["steps"]:
            lines.append(f"  step {s['step']}: {s['bytes'] / 1e6:.1f} MB"
                         + ("" if s["fingerprint"] else " · no fingerprint metadata"))
        newest = saved["steps"][-1]["fingerprint"]
        if newest:
            mc = newest.get("model_config", {})
            params = " · ".join(f"{agent} {n:,}" for agent, n in saved.get("parameters", {}).items())
            lines.append(f"  fingerprint (step {saved['steps'][-1]['step']}): env {newest.get('env')} · "
                         f"vocabulary {mc.get('vocab_size')} · {len(newest.get('strategies', []))} strategies · "
                         "layout " + ", ".join(f"{k} {v}" for k, v in newest.get("layout", {}).items()))
            lines.append(f"  parameters: {params}")
            check = saved["fingerprint_check"]
            lines.append(f"  matches the config: {'yes' if check['status'] == 'matches' else check['status']}"
                         + (f" ({check['reason']})" if "reason" in check else ""))
            for d in check.get("differences", []):
                lines.append(f"    {d['key']}: checkpoint {d['checkpoint']!r}, config {d['config']!r}")
    if saved["unfinished"]:
        lines.append(f"  unfinished saves (never restored): {', '.join(saved['unfinished'])}")
    if saved["set_aside"]:
        lines.append(f"  unreadable steps set aside by a resume: {', '.join(saved['set_aside'])}")
    metrics = report["metrics"]
    lines.append(f"metrics: {metrics['lines']} lines in {metrics['file']}" if metrics["lines"]
                 else f"metrics: none ({metrics['file']})")
    for phase, entry in metrics["phases"].items():
        values = " · ".join(f"{k} {_number(v)}" for k, v in entry["values"].items())
        lines += textwrap.wrap(f"{phase} (step {entry['step']}): {values}", width=WIDTH, initial_indent="  ",
                               subsequent_indent="    ", break_on_hyphens=False)
    if metrics["unreadable"]:
        lines.append(f"  unreadable lines (not JSON): {', '.join(map(str, metrics['unreadable']))}")
    summary = report["summary"]
    lines.append("summary: " + ("none (the run has not finished its final evaluation)" if summary is None
                                else headline(summary)))
    tok = report["tokenizer"]
    if tok is None:
        lines.append("tokenizer: none saved")
    else:
        lines.append(f"tokenizer: {tok['tokens']} tokens · end of turn {tok['end_of_turn']} · pad {tok['pad']} · "
                     f"chat template {'yes' if tok['chat_template'] else 'no'}")
        for kind, markers in (("strategy", tok["strategy_markers"]), ("stage", tok["stage_markers"])):
            lines.append(f"  {kind} markers: " + (", ".join(f"{k}={i}" for k, i in markers.items()) or "none"))
        if tok["strategies_without_marker"]:
            lines.append(f"  strategies without a marker: {', '.join(tok['strategies_without_marker'])}")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by the trainer")
    flags.DEFINE_bool("json", False, "print the report as one JSON object")
    flags.DEFINE_bool("check_fingerprint", True, "build the run's world from its config to check the newest "
                      "checkpoint's fingerprint against it")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    # absl shows every INFO record (JAX's backend probing, orbax); the report is the output.
    logging.getLogger().setLevel(logging.WARNING)
    if not f.workdir:
        command_line.fail("--workdir (a run directory written by the trainer) is required")
    try:
        report = inspect_run(f.workdir, check_fingerprint=f.check_fingerprint)
    except NotARunError as e:
        command_line.fail(str(e))
    print(json.dumps(report, indent=1) if f.json else format_report(report))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
