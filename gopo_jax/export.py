"""Exports a finished run's agent pair as Hugging Face model folders that `transformers` loads as they are.

    gopo-export --workdir runs/mgshop --out exported/mgshop [--step N]   # or python -m gopo_jax.export

`DIR/expert` and `DIR/cs` each hold:
* `config.json` + `model.safetensors` (shards above 4 GB): the agent as a `Qwen3ForCausalLM`, LoRA adapters merged
  into the base weights (`gopo_jax.models.hf_io.save_pretrained`);
* the run's tokenizer with its marker tokens (`<s:NAME>` strategies, `<stage:NAME>` stages) and chat template;
* `generation_config.json`: generation stops on the end-of-turn token and pads with the run's pad token;
* `sop.json`: the world's SOP in the format `gopo_jax.dialogue.sop.load_sop` reads (stages, allowed strategies,
  transitions, terminal stages);
* `strategies.json`: the strategy table (name, marker token, token id, description) and the stage markers;
* `README.md`: how the pair is driven (which token each agent writes after which prompt).

A run without an Expert (the no-Expert ablation and the single-agent baselines) exports `cs` only, and says so; an
earlier export's `expert` folder in DIR is removed then, so DIR never mixes two runs.

The weights are the run's trained agents at checkpoint `--step` (default: the newest), restored with the run's own
config (`config.json`) and tokenizer (`tokenizer/`), exactly as `gopo_jax.serve` restores them.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import ml_collections
import transformers
from absl import flags
from flax import nnx

from gopo_jax import command_line
from gopo_jax.models import hf_io, lora
from gopo_jax.models import tokenizer as tokenizer_lib
from gopo_jax.models.qwen3 import Qwen3
from gopo_jax.train.checkpoint import CheckpointError

AGENTS = ("expert", "cs")
# Written into every agent folder; its presence marks a folder this module may replace on a later export.
STRATEGIES_FILE = "strategies.json"
SOP_FILE = "sop.json"


class RunError(Exception):
    """A run directory, checkpoint or export folder that cannot be used as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run's components and acting parameters at one checkpoint, as the trainer left them."""

    workdir: pathlib.Path
    config: ml_collections.ConfigDict
    components: Any  # gopo_jax.train.build.Components
    params: dict  # {"expert", "cs", ...}: nnx.State of each agent
    iteration: int

    @property
    def world(self):
        return self.components.world

    @property
    def use_expert(self) -> bool:
        return bool(self.components.method.use_expert)


def load_run(workdir: str | pathlib.Path, step: int | None = None) -> RestoredRun:
    """The run in `workdir` at checkpoint `step` (default: the newest); RunError names what is missing."""
    from gopo_jax.train.driver import restore_agents  # builds the world: heavy, and only when asked

    workdir = pathlib.Path(workdir)
    if not workdir.is_dir():
        raise RunError(f"--workdir {workdir} does not exist; point it at a run directory written by the trainer "
                       "(python -m experiments.mgshop --config configs/mgshop.py --workdir DIR)")
    for needed, what in (("config.json", "the resolved run config"), ("tokenizer/tokenizer.json",
                                                                       "the run's tokenizer")):
        if not (workdir / needed).exists():
            raise RunError(f"{workdir / needed} is missing ({what}); point --workdir at a run directory written "
                           "by the trainer")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    restored = restore_agents(workdir, config, step=step)
    if restored is None:
        raise RunError(f"{workdir / 'checkpoints'} holds no checkpoint; train the run first (its first "
                       "checkpoint is written at the end of the warm start)")
    components, params, iteration = restored
    return RestoredRun(workdir=workdir, config=config, components=components, params=params, iteration=iteration)


def agent_model(run: RestoredRun, name: str) -> Qwen3:
    """Agent `name` ("expert" | "cs") as one plain Qwen3: LoRA adapters, when the run trained some, merged in."""
    graphdef = run.components.expert_gd if name == "expert" else run.components.cs_gd
    return lora.merged_model(nnx.merge(graphdef, run.params[name]))


def save_generation_config(world, folder: pathlib.Path) -> None:
    """generation_config.json: a reply ends with the end-of-turn token, as the CS was trained to end it."""
    transformers.GenerationConfig(eos_token_id=world.vocab.eot, pad_token_id=world.vocab.pad).save_pretrained(folder)


def strategy_table(world, *, use_expert: bool, sop_mask: bool) -> dict:
    """strategies.json: the Expert's action space (marker token and id per strategy) and the stage markers."""
    spec, vocab, tokenizer = world.spec, world.vocab, world.tokenizer
    descriptions = spec.strategy_descriptions or ("",) * spec.num_strategies
    return {
        "sop": spec.sop.name,
        "use_expert": use_expert,
        "sop_mask": sop_mask,  # False: the run's Expert chose among all strategies (the no-SOP-mask ablation)
        "end_of_turn": {"token": tokenizer.convert_ids_to_tokens(vocab.eot), "token_id": vocab.eot},
        "strategies": [{"index": k, "name": name, "marker": tokenizer.convert_ids_to_tokens(token_id),
                        "token_id": token_id, "description": descriptions[k]}
                       for k, (name, token_id) in enumerate(zip(spec.strategies, vocab.strategy_ids))],
        # Marker i is the header token of SOP stage i (a world may name its markers apart from its stages).
        "stages": [{"index": s, "marker": tokenizer.convert_ids_to_tokens(token_id), "token_id": token_id,
                    "stage": spec.sop.stages[s] if s < spec.sop.num_stages else None}
                   for s, token_id in enumerate(vocab.stage_ids)],
    }


def model_card(run: RestoredRun, name: str) -> str:
    """README.md of one agent folder: what it is and which token it writes after which prompt."""
    role = ("the Expert: after the agent header (the chat template's generation prompt and the stage marker "
            "`<stage:NAME>`) its next token is the strategy marker `<s:NAME>`; the run chose it by a softmax over the "
            "strategy rows of the logits masked with the stage's allowed strategies (sop.json, strategies.json)"
            if name == "expert" else
            "the Customer-Service agent: after the agent header and the Expert's strategy marker (no marker in a "
            "single-agent run) it writes the reply and ends it with the end-of-turn token (generation_config.json)")
    return (f"# {run.workdir.resolve().name} / {name}\n\n"
            f"A GOPO-trained Qwen3 ({run.config.method} on {run.world.spec.name}, iteration {run.iteration}), "
            f"exported by `python -m gopo_jax.export`.\n\nThis is {role}.\n\n"
            "The dialogue is the tokenizer's chat template: the business context as the system message, customer "
            "turns as user messages, agent turns as assistant messages whose content starts with the stage and "
            "strategy markers.\n")


def export_agent(run: RestoredRun, name: str, folder: pathlib.Path) -> pathlib.Path:
    """Writes agent `name` of `run` into the new folder `folder` (see the module docstring)."""
    world = run.world
    hf_io.save_pretrained(agent_model(run, name), folder)
    tokenizer_lib.save_tokenizer(world.tokenizer, folder)
    save_generation_config(world, folder)
    (folder / SOP_FILE).write_text(json.dumps(world.spec.sop.to_json(), indent=1) + "\n")
    table = strategy_table(world, use_expert=run.use_expert, sop_mask=bool(run.components.hyper.sop_mask))
    (folder / STRATEGIES_FILE).write_text(json.dumps(table, indent=1) + "\n")
    (folder / "README.md").write_text(model_card(run, name))
    return folder


def _foreign(folder: pathlib.Path) -> bool:
    """A non-empty folder that no export wrote (it has no strategies.json): never overwritten."""
    return folder.is_dir() and any(folder.iterdir()) and not (folder / STRATEGIES_FILE).is_file()


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
               log=print) -> dict[str, pathlib.Path]:
    """Exports the run in `workdir` into `out`; returns {agent: folder}. `log` receives one line per folder."""
    out = pathlib.Path(out)
    for folder in (out / name for name in AGENTS):  # checked before anything is restored, written or removed
        if _foreign(folder):
            raise RunError(f"{folder} exists and is not an export of gopo_jax (no {STRATEGIES_FILE}); choose "
                           "another --out or empty it")
    run = load_run(workdir, step)
    for folder in (out / name for name in AGENTS):
        if folder.exists():
            shutil.rmtree(folder)
    if not run.use_expert:
        log(f"single-agent run (method {run.config.method}: no Expert acts): exporting the CS only")
    written = {}
    for name in AGENTS if run.use_expert else ("cs",):
        written[name] = export_agent(run, name, out / name)
        log(f"wrote {written[name]} ({name}, iteration {run.iteration})")
    return written


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "a run directory written by the trainer (config.json, tokenizer/, "
                                         "checkpoints/)")
    flags.DEFINE_string("out", None, "the export folder: DIR/expert and DIR/cs are written there")
    flags.DEFINE_integer("step", None, "the checkpoint step to export (default: the newest)")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax reports every restore at INFO through absl
    try:
        if not f.workdir or not f.out:
            raise RunError("--workdir (a run directory) and --out (the export folder) are both required")
        export_run(f.workdir, f.out, step=f.step)
    except (RunError, CheckpointError, hf_io.HFModelError) as e:
        command_line.fail(str(e))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
