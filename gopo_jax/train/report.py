"""What a finished run writes about its agents: `summary.json`'s blocks, `samples.md`, `judge_samples.jsonl` and
the parameter hash. Used by the trainer's drivers and by the prompted-model evaluation."""
from __future__ import annotations

import hashlib
import json
import pathlib

import jax
import numpy as np

from gopo_jax.dialogue.layout import Trajectory
from gopo_jax.dialogue.render import judge_samples, render_dialogue
from gopo_jax.metrics.reporting import mean_ci, paired_difference

JUDGE_SAMPLES = "judge_samples.jsonl"  # the trained agents' held-out turns, for a G-Eval judge
CURVES = ("tse", "gre", "esndcg", "alignment")
TRAINING_CURVES = ("expert_kl_ref", "cs_kl_ref", "mu")


def summary_block(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict:
    """Mean and 95% interval of every per-episode metric, and TSE normalised by the reference policy's."""
    d = {k: mean_ci(v) for k, v in ep.items()}
    d["ntse"] = ntse(ep, reference)
    return d


def ntse(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """Mean TSE over the reference policy's mean TSE on the same customers (a ratio of means)."""
    return float(np.mean(ep["tse"]) / max(float(np.mean(reference["tse"])), 1e-9))


def eval_record(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """The `eval/*` line of metrics.jsonl: each metric's mean, and nTSE."""
    return {**{k: float(np.mean(v)) for k, v in ep.items()}, "ntse": ntse(ep, reference)}


def run_summary(*, env: str, method: str, eval_episodes: int, sft, final, reference, wall: float, params) -> dict:
    """summary.json of a trained run: reference, SFT and the method's blocks, the paired method − SFT
    differences, wall time and the final parameter hash."""
    return {
        "env": env, "method": method, "eval_episodes": int(eval_episodes),
        "reference": summary_block(reference, reference), "sft": summary_block(sft, reference),
        method: summary_block(final, reference),
        f"{method}_minus_sft": {k: paired_difference(final[k], sft[k]) for k in ("tse", "gre", "esndcg", "alignment")},
        "wall_seconds": wall,
        "final_params_sha256": params_hash(params),
    }


def params_hash(params) -> str:
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.asarray(leaf).tobytes())
    return h.hexdigest()


def write_samples(workdir: pathlib.Path, world, trajs: list[tuple[str, Trajectory]], num: int) -> None:
    """samples.md: the first `num` dialogues of each (name, batch), rendered as text."""
    parts = []
    for name, traj in trajs:
        parts.append(f"## {name}\n")
        for i in range(num):
            parts.append("```\n" + render_dialogue(traj, i, tokenizer=world.tokenizer, chat_format=world.chat_format,
                                                    layout=world.layout,
                                                    strategies=world.spec.strategies) + "\n```\n")
    (pathlib.Path(workdir) / "samples.md").write_text("\n".join(parts))


def write_judge_samples(workdir: pathlib.Path, world, traj: Trajectory, dialogues: int) -> None:
    """judge_samples.jsonl: the agent turns of the first `dialogues` dialogues as G-Eval samples (one JSON object
    per line: episode, turn, context, response, strategy), read by the comparison's judge."""
    samples = judge_samples(traj, range(min(dialogues, traj.tokens.shape[0])), tokenizer=world.tokenizer,
                            chat_format=world.chat_format, layout=world.layout, strategies=world.spec.strategies,
                            descriptions=world.spec.strategy_descriptions)
    (pathlib.Path(workdir) / JUDGE_SAMPLES).write_text("".join(json.dumps(s) + "\n" for s in samples))
