"""The deployment-time n-candidate filter (GOPO.md §1) on a finished run, without retraining: its restored agents play
the run's held-out evaluation episodes (greedy, the evaluation's keys) once per n, and each n's TSE, alignment, SOP
validity, GRE and filter_rescue_rate are printed. Pure-JAX worlds only (synthetic_shop).

    python -m scripts.candidate_filter_eval RUN_DIR [--n 1,2,4] [--candidate_temperature 0.7] [--temperature 1.0]
"""
import argparse
import dataclasses

import jax
import numpy as np

from gopo_jax import export
from gopo_jax.train import schedule
from gopo_jax.train.phases import Phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--n", default="1,2,4", help="comma-separated candidate counts, each >= 1")
    parser.add_argument("--candidate_temperature", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="the CS's own temperature (candidate 0); 0: greedy, as the run's evaluation")
    args = parser.parse_args()
    ns = [int(x) for x in args.n.split(",")]
    if any(n < 1 for n in ns) or args.candidate_temperature <= 0 or args.temperature < 0:
        raise SystemExit("--n must list ints >= 1, --candidate_temperature must be > 0 and --temperature >= 0")
    run = export.load_run(args.workdir)
    c = run.components
    if c.world.kind != "jax":
        raise SystemExit(f"the filter needs a pure-JAX world; {c.world.spec.name} realises replies on the host")
    print(f"{'n':>3} {'tse':>8} {'alignment':>10} {'sop_valid':>10} {'gre':>8} {'rescue':>8}")
    for n in ns:
        eval_rollout = c.world.make_rollout(c.method.make_agents(
            dataclasses.replace(c.eval_sampling, temperature=args.temperature, n_candidates=n,
                                candidate_temperature=args.candidate_temperature)))
        # run.params are already the acting parameters (`restore_agents`): the rollout takes them as they are.
        traj = eval_rollout(run.params, c.eval_episodes(), schedule.eval_key(int(c.config.seed)))
        metrics = Phases(c).eval_metrics(traj)
        m = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items()}
        print(f"{n:>3} {m['tse']:8.4f} {m['alignment']:10.4f} {m['sop_validity']:10.4f} {m['gre']:8.4f} "
              f"{m.get('filter_rescue_rate', 0.0):8.4f}")


if __name__ == "__main__":
    main()
