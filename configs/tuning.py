"""The equal tuning budget of the comparison (configs/compare.py): every trained method gets a grid of at most 4
settings of its main hyper-parameters, the same shape for all (its step size × the strength of its objective's
trust region or temperature, 2 × 2), each trained on `tuning_seeds` seeds and scored on VALIDATION customers
(`eval.split="validation"`, disjoint from the test customers the tables report). The setting with the best mean
validation `selection_metric` is the method's; ablations of a method use its setting (they ablate the tuned method).

Settings are run-config overrides with flattened keys (`configs.overrides`); the first listed is the method's
default, the tie-break. Methods with nothing to tune after the warm start (SFT, a prompted model) have no grid.
"""
from __future__ import annotations

import ml_collections

from configs import overrides

def _two_by_two(step_name: str, step: dict, knob_name: str, knob: dict) -> dict:
    """The method's defaults, each of two alternative settings alone, and both: {name: flattened overrides}."""
    return {"default": {}, step_name: step, knob_name: knob, f"{step_name}_{knob_name}": step | knob}


GRIDS = {
    # GOPO: the CS step size × β_pref, the preference temperature of the Expert's loss.
    "gopo": _two_by_two("lr_cs_half", {"train.lr_cs": 2.5e-4}, "beta_pref_1", {"gopo.beta_pref": 1.0}),
    # PPO and GRPO: the CS step size × β, the KL coefficient to the SFT reference.
    "ppo": _two_by_two("lr_cs_half", {"train.lr_cs": 2.5e-4}, "beta_0p05", {"baselines.ppo.beta": 0.05}),
    "grpo": _two_by_two("lr_cs_half", {"train.lr_cs": 2.5e-4}, "beta_0p05", {"baselines.grpo.beta": 0.05}),
    # DPO: its own step size × β (Rafailov et al. use β in 0.1-0.5).
    "dpo": _two_by_two("lr_double", {"baselines.dpo.lr": 1e-4}, "beta_0p5", {"baselines.dpo.beta": 0.5}),
    # Memento: the soft-Q step size × α, the temperature of its case-based policy over the SFT prior.
    "memento": _two_by_two("lr_q_triple", {"baselines.memento.lr_q": 3e-2}, "alpha_1",
                           {"baselines.memento.alpha": 1.0}),
}


def grids():
    """GRIDS as nested ConfigDicts (label -> setting -> overrides), each a command-line flag of the comparison
    config, e.g. `--config.grids.ppo.beta_0p05.baselines.ppo.beta=0.1`."""
    return ml_collections.ConfigDict(
        {label: ml_collections.ConfigDict({name: overrides(flat) for name, flat in settings.items()}, sort_keys=False)
         for label, settings in GRIDS.items()}, sort_keys=False)
