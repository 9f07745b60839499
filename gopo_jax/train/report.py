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
from gopo_jax.metrics.tse import ntse

JUDGE_SAMPLES = "judge_samples.jsonl"  # the trained agents' held-out turns, for a G-Eval judge
CURVES = ("tse", "gre", "esndcg", "alignment")
TRAINING_CURVES = ("expert_kl_ref", "cs_kl_ref", "mu")
# Metrics of a chosen strategy k_t. Without an Expert (single-agent baselines, the no-EA ablation) nothing is
# chosen: the world counts the realised strategy as chosen, so these would silently mean "the reply was recognised"
# (that is `recognised`, reported for every method). They are undefined there: null in summary.json, left out of
# metrics.jsonl and curves (docs/metrics.md, "One meaning per column").
EXPERT_ONLY = ("alignment", "esndcg_chosen")
MINUS_SFT = ("tse", "gre", "esndcg", "alignment")


def defined_metrics(ep: dict, *, use_expert: bool) -> dict:
    """`ep` without the metrics a method without an Expert does not have (`EXPERT_ONLY`)."""
    return ep if use_expert else {k: v for k, v in ep.items() if k not in EXPERT_ONLY}


def run_ntse(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    """nTSE of an evaluation (`gopo_jax.metrics.tse.ntse`): the reference ran on the same customers, in order."""
    return float(ntse(ep["tse"], reference["tse"]))


def summary_block(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, use_expert: bool) -> dict:
    """Mean and 95% interval of every per-episode metric (None for one the method does not have: `EXPERT_ONLY`
    without an Expert), and nTSE."""
    d = {k: mean_ci(v) if k in defined_metrics(ep, use_expert=use_expert) else None for k, v in ep.items()}
    d["ntse"] = run_ntse(ep, reference)
    return d


def eval_record(ep: dict[str, np.ndarray], reference: dict[str, np.ndarray], *, use_expert: bool
                ) -> dict[str, float]:
    """The `eval/*` line of metrics.jsonl: each metric's mean (those the method has), and nTSE."""
    return {**{k: float(np.mean(v)) for k, v in defined_metrics(ep, use_expert=use_expert).items()},
            "ntse": run_ntse(ep, reference)}


def curve_names(*, use_expert: bool, trains: bool) -> list[str]:
    """The learning curves a run plots: the evaluation metrics it has, and the training diagnostics if it trains."""
    return [k for k in CURVES if use_expert or k not in EXPERT_ONLY] + list(TRAINING_CURVES if trains else ())


def run_summary(*, env: str, method: str, use_expert: bool, eval_episodes: int, sft, final, reference, wall: float,
                params) -> dict:
    """summary.json of a trained run: reference, SFT and the method's blocks, the paired method − SFT
    differences, wall time and the final parameter hash. The SFT agents act as the method's do (with or without
    the Expert); the reference policy always chooses its strategy."""
    return {
        "env": env, "method": method, "eval_episodes": int(eval_episodes),
        "reference": summary_block(reference, reference, use_expert=True),
        "sft": summary_block(sft, reference, use_expert=use_expert),
        method: summary_block(final, reference, use_expert=use_expert),
        f"{method}_minus_sft": {k: paired_difference(final[k], sft[k]) if use_expert or k not in EXPERT_ONLY else None
                                for k in MINUS_SFT},
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
