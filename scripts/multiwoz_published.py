"""Our MultiWOZ scorer against the published Inform / Success of every system whose test-set predictions are in the
shared MultiWOZ folder (`mwzeval/predictions/*.json.gz`): a markdown table, notes, and a last line
`RESULT multiwoz_scorer max_abs_diff=<largest |ours − published| over systems and both rates> goal=1.0`.

    python -m scripts.multiwoz_published [--data ../shared/data/multiwoz] > docs/results/multiwoz_scorer.md

Each file is scored as given (its own states and active domains where it has them). For a system whose gap exceeds
the goal, the notes add its score with the active domains estimated from its states instead, the evaluator's way
for a file without domains: a published number computed from a different input shows up there.
"""

import gzip
import json
import pathlib

from absl import flags

from gopo_jax import command_line
from gopo_jax.metrics import multiwoz_eval

GOAL = 1.0
COMMAND = "python -m scripts.multiwoz_published > docs/results/multiwoz_scorer.md"
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multiwoz"

# (setting, Inform, Success) published under the standardised evaluator (Nekvinda & Dušek 2021) in the benchmark
# tables of budzianowski/multiwoz's README, for every system of Tomiinek/MultiWOZ_Evaluation's predictions/ folder.
PUBLISHED = {
    "augpt": ("end-to-end", 76.6, 60.5),
    "damd": ("end-to-end", 57.9, 47.6),
    "dots": ("end-to-end", 80.4, 68.7),
    "galaxy-e2e": ("end-to-end", 85.4, 75.7),
    "labes": ("end-to-end", 68.5, 58.1),
    "mintl": ("end-to-end", 73.7, 65.4),
    "pptod": ("end-to-end", 83.1, 72.7),
    "soloist": ("end-to-end", 82.3, 72.4),
    "ubar": ("end-to-end", 83.4, 70.3),
    "galaxy-policy": ("gold states", 92.8, 83.5),
    "hdno": ("gold states", 93.3, 83.4),
    "hdsa": ("gold states", 87.9, 79.4),
    "lava": ("gold states", 95.9, 93.5),
    "marco": ("gold states", 94.5, 87.2),
    "sfn": ("gold states", 93.4, 82.3),
    "uniconv": ("gold states", 66.7, 58.7),
}


def _gap(row: dict) -> float:
    return max(abs(row["inform"] - row["published_inform"]), abs(row["success"] - row["published_success"]))


def score_systems(data_dir) -> list[dict]:
    """One row per prediction file with published numbers: ours (as given) next to the published rates; rows over
    the goal add `from_states`, (Inform, Success) with the active domains estimated from the states."""
    data_dir = pathlib.Path(data_dir)
    folder = data_dir / "mwzeval" / "predictions"
    if not folder.is_dir():
        raise multiwoz_eval.MultiWOZDataError(
            f"{folder}: not found; this needs the shared MultiWOZ folder (db/, mwzeval/, mwz21_convlab3/, see its "
            "README.md): pass --data DIR"
        )
    files = sorted(folder.glob("*.json.gz"))
    if not files:
        raise multiwoz_eval.MultiWOZDataError(f"{folder}: no *.json.gz prediction files; re-fetch the shared data")
    unknown = [f.name for f in files if f.name.removesuffix(".json.gz") not in PUBLISHED]
    if unknown:
        raise multiwoz_eval.MultiWOZDataError(f"{folder}: no published numbers for {unknown}; add them to PUBLISHED")
    rows = []
    for path in files:
        system = path.name.removesuffix(".json.gz")
        with gzip.open(path, "rt", encoding="utf-8") as f:
            predictions = json.load(f)
        report = multiwoz_eval.evaluate(predictions, data_dir, bleu=False)
        setting, inform, success = PUBLISHED[system]
        row = dict(
            system=system,
            setting=setting,
            dialogues=report["num_dialogues"],
            published_inform=inform,
            published_success=success,
            inform=report["inform"],
            success=report["success"],
            states=report["states"],
            active_domains=report["active_domains"],
        )
        if _gap(row) > GOAL:
            estimated = multiwoz_eval.evaluate(predictions, data_dir, bleu=False, domains_from_states=True)
            row["from_states"] = (estimated["inform"], estimated["success"])
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        f"<!-- Produced by `{COMMAND}` (the shared MultiWOZ folder must be in ../shared/data/multiwoz). -->",
        "# Our MultiWOZ scorer against published Inform / Success",
        "",
        "`gopo_jax.metrics.multiwoz_eval` on the test-set predictions of published systems (the standard "
        "evaluator's `predictions/` folder, as stored in the shared data), against the rates published for them "
        "under the standardised evaluator (Nekvinda & Dušek 2021; budzianowski/multiwoz benchmark tables). "
        "Rates in percent; Δ = ours − published.",
        "",
        "| system | setting | dialogues | published Inform | published Success | our Inform | our Success "
        "| Δ Inform | Δ Success | states | active domains |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['setting']} | {r['dialogues']} | {r['published_inform']:.1f} "
            f"| {r['published_success']:.1f} | {r['inform']:.2f} | {r['success']:.2f} "
            f"| {r['inform'] - r['published_inform']:+.2f} | {r['success'] - r['published_success']:+.2f} "
            f"| {r['states']} | {r['active_domains']} |"
        )
    lines += [
        "",
        "Notes:",
        "- Goals are rebuilt from the ConvLab-3 goals and, for systems without states (\"gold states\"), the "
        "ConvLab belief states stand in for the MultiWOZ 2.2 gold states: the evaluator's goals.json and the 2.2 "
        "dialogues are not in the shared data.",
        "- Fuzzy name matching is rapidfuzz's `partial_ratio` rounded to an integer, fuzzywuzzy's score; the "
        "evaluator's Moses detokenisation is replaced by regex spacing rules, which do not change the slot tokens "
        "that Inform and Success look for.",
    ]
    for r in rows:
        if "from_states" in r:
            inform, success = r["from_states"]
            lines.append(
                f"- {r['system']} is {_gap(r):.2f} points off as given; with its active domains estimated from its "
                f"states instead (`domains_from_states=True`) it scores {inform:.2f} / {success:.2f}."
            )
    worst = max(_gap(r) for r in rows)
    lines += ["", f"RESULT multiwoz_scorer max_abs_diff={worst:.2f} goal={GOAL}"]
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_string("data", str(DEFAULT_DATA), "the shared MultiWOZ folder (db/, mwzeval/, mwz21_convlab3/)")


def main(argv) -> None:
    del argv
    try:
        rows = score_systems(flags.FLAGS.data)
    except multiwoz_eval.MultiWOZDataError as err:
        command_line.fail(str(err))
    print(markdown(rows))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
