"""Look at a world through a scripted policy.

    python -m gopo_jax.envs.policy_report --env NAME [--policy reference|random|greedy] [--episodes N] [--show 2]
        [--seed 0] [--data DIR]

Prints TSE, nTSE (against the reference policy on the same seeds), ESNDCG and GRE with bootstrap 95% intervals,
and with --show K the first K dialogues with the strategy, gain, engagement and relevance of every agent turn.
Works for every environment in gopo_jax.envs.registry, pure-JAX and host alike.
"""
from __future__ import annotations

from absl import flags

from gopo_jax import command_line
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


def report(env_name: str, policy: str, episodes: int, *, seed: int = 0, show: int = 0,
           data_dir: str | None = None) -> str:
    """The printed report: metrics with intervals, then `show` sample dialogues. A file-backed world's missing or
    malformed data raises FileNotFoundError or ValueError, naming the folder and the fix."""
    env = registry.make_env(env_name, data_dir=data_dir)
    result = policies.evaluate_policy(env, policy, episodes, seed, transcripts=show)
    parts = [format_report(result)]
    parts += [f"\ndialogue {i}:\n{format_dialogue(t)}" for i, t in enumerate(result.get("transcripts", []))]
    return "\n".join(parts)


def define_flags() -> None:
    flags.DEFINE_enum("env", None, registry.names(), "the world")
    flags.DEFINE_enum("policy", "reference", policies.POLICIES, "the scripted policy that plays the agents")
    flags.DEFINE_integer("episodes", 100, "dialogues evaluated (at least 2, for the confidence intervals)",
                         lower_bound=2)
    flags.DEFINE_integer("seed", 0, "seed of the first dialogue")
    flags.DEFINE_integer("show", 0, "print this many sample dialogues", lower_bound=0)
    flags.DEFINE_string("data", None, "data folder of a file-backed world (default: its folder in ../shared/data)")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.env is None:
        command_line.fail(f"--env is required: one of {', '.join(registry.names())}")
    try:
        print(report(f.env, f.policy, f.episodes, seed=f.seed, show=f.show, data_dir=f.data))
    except (FileNotFoundError, ValueError) as e:
        command_line.fail(str(e))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
