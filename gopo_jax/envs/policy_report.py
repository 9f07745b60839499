"""Look at a world: `python -m gopo_jax.envs.policy_report --env NAME --policy reference|random|greedy --episodes N
[--show 2] [--seed 0] [--data DIR]`.

Prints TSE, nTSE (against the reference policy on the same seeds), ESNDCG and GRE with bootstrap 95% intervals,
and with --show K the first K dialogues with the strategy, gain, engagement and relevance of every agent turn.
Works for every environment in gopo_jax.envs.registry, pure-JAX and host alike.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gopo_jax.envs import policies, registry
from gopo_jax.metrics import reporting


def format_report(result: dict) -> str:
    lines = [f"{result['env']} / {result['policy']}: {result['episodes']} episodes (mean ± 95% CI half-width)"]
    for key, label in [("tse", "TSE"), ("ntse", "nTSE"), ("esndcg", "ESNDCG"), ("gre", "GRE"),
                       ("purchase", "outcome"), ("turns", "turns")]:
        lines.append(f"  {label:8s} {reporting.format_ci(result[key])}   [{result[key]['lo']:.3f}, "
                     f"{result[key]['hi']:.3f}]")
    return "\n".join(lines)


def format_dialogue(transcript: dict) -> str:
    lines = [f"  context: {transcript['context']}"] if transcript.get("context") else []
    for t, turn in enumerate(transcript["turns"]):
        lines.append(f"  [{t}] customer: {turn['customer']}")
        lines.append(f"      agent <{turn['strategy']}> {turn['reply']}   "
                     f"(g={turn['gain']:.2f} c={turn['cont']:.2f} rel={turn['rel']:.0f})")
    if transcript.get("final"):
        lines.append(f"      customer: {transcript['final']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gopo_jax.envs.policy_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", required=True, choices=registry.names())
    parser.add_argument("--policy", default="reference", choices=policies.POLICIES)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", type=int, default=0, help="print this many sample dialogues")
    parser.add_argument("--data", default=None, help="data folder for file-backed worlds (default ../shared/data)")
    args = parser.parse_args(argv)
    if args.episodes < 2:
        parser.error("--episodes must be at least 2 (confidence intervals)")
    try:
        env = registry.make_env(args.env, data_dir=args.data)
    except (FileNotFoundError, ValueError) as e:  # data problems: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = policies.evaluate_policy(env, args.policy, args.episodes, args.seed, transcripts=args.show)
    print(format_report(result))
    for i, transcript in enumerate(result.get("transcripts", [])):
        print(f"\ndialogue {i}:")
        print(format_dialogue(transcript))
    return 0


if __name__ == "__main__":
    sys.exit(main())
