"""The run's schedule: which random draw each phase takes, and at which steps the driver evaluates and saves.

Every random number of a run is a function of (config.seed, phase, index), so a run resumed from a checkpoint
draws what the uninterrupted run drew, and seed s of a vmapped seed group draws what the run with `seed = s` draws.
Both drivers (`gopo_jax.train.driver`, single seed or vmapped seeds) take their keys and their step schedule from
here only; the key functions accept a traced seed and index, so they work inside `jax.vmap` and `lax.scan`.

Steps count SFT steps first, then method iterations: step `sft_steps + i + 1` is the end of iteration i.
"""
from __future__ import annotations

import dataclasses

import jax

from gopo_jax.envs import customers

# Phase tags folded into the seed's key. EVAL_CUSTOMERS is the domain of the pure-JAX world's held-out customers:
# a tag no training draw uses, so they are other keys than every training customer even when eval.seed == seed.
SFT, METHOD, EVAL, DEMO, EVAL_CUSTOMERS = 1, 2, 3, 4, 5
_STATE_RNG = 1_000_000  # index of a phase's train-state key (beyond any step index of the phase)
_EXTRA_PARAMS_OFFSET = 7  # a method's extra models are initialised from seed + 7 (the agents use seed, seed + 1)
SFT_HELDOUT_EVERY = 25  # SFT steps between held-out evaluations of the warm start
SAMPLE_DIALOGUES = 4  # held-out dialogues per agent pair in samples.md


def phase_key(seed: jax.Array | int, phase: int, index: jax.Array | int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), phase), index)


def extra_params_key(seed: int) -> jax.Array:
    return jax.random.key(seed + _EXTRA_PARAMS_OFFSET)


def state_key(seed, phase: int) -> jax.Array:
    """The train state's own key (split once per update) when a phase starts."""
    return phase_key(seed, phase, _STATE_RNG)


def demo_keys(seed) -> tuple[jax.Array, jax.Array]:
    """(customers' key, scripted agents' key) of the demonstrations."""
    return phase_key(seed, DEMO, 0), phase_key(seed, DEMO, 1)


def sft_batch_key(seed, step) -> jax.Array:
    """The permutation that draws SFT step `step`'s demonstrations."""
    return phase_key(seed, SFT, step)


def iteration_keys(seed, iteration) -> tuple[jax.Array, jax.Array]:
    """(customers' key, agents' sampling key) of method iteration `iteration`'s rollout."""
    return phase_key(seed, METHOD, 2 * iteration), phase_key(seed, METHOD, 2 * iteration + 1)


def epoch_key(seed, iteration, epoch) -> jax.Array:
    """The shuffle of the groups into minibatches in epoch `epoch` of iteration `iteration`."""
    return phase_key(seed, METHOD, 10_000 + iteration * 100 + epoch)


def fresh_adapters_key(seed, agent_index: int) -> jax.Array:
    """The LoRA adapters a LoRA agent starts the method with, after its warm-start adapters are merged."""
    return phase_key(seed, METHOD, _STATE_RNG + 1 + agent_index)


def eval_key(seed) -> jax.Array:
    """The agents' key on the held-out customers (greedy agents ignore it)."""
    return phase_key(seed, EVAL, 0)


def reference_eval_key(seed) -> jax.Array:
    return phase_key(seed, EVAL, 1)


def eval_customers_key(eval_seed: int, split: str) -> jax.Array:
    """The root of a pure-JAX world's held-out customers of `split` (each customer is a key split from it): one
    stream per split, disjoint from each other and from the training customers (`iteration_keys`, `demo_keys`)."""
    customers.check_split(split)
    return phase_key(eval_seed, EVAL_CUSTOMERS, customers.EVAL_SPLITS.index(split))


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When the driver evaluates and saves. `method_steps` is 0 for a method that does not train (SFT)."""

    sft_steps: int
    method_steps: int
    eval_every: int
    checkpoint_every: int

    @classmethod
    def from_config(cls, config, *, trains: bool) -> "Schedule":
        t = config.train
        return cls(sft_steps=int(config.sft.steps), method_steps=int(t.steps) if trains else 0,
                   eval_every=int(t.eval_every), checkpoint_every=int(t.checkpoint_every))

    @property
    def total(self) -> int:
        return self.sft_steps + self.method_steps

    def sft_block_end(self, step: int) -> int:
        """The SFT step at which the block starting after `step` ends: the next held-out evaluation or the end."""
        return min((step // SFT_HELDOUT_EVERY + 1) * SFT_HELDOUT_EVERY, self.sft_steps)

    def evaluates_after(self, step: int) -> bool:
        """Held-out evaluation after the method iteration that ends at `step`."""
        return (step - self.sft_steps) % self.eval_every == 0 or step == self.total

    def saves_after(self, step: int) -> bool:
        return (step - self.sft_steps) % self.checkpoint_every == 0 or step == self.total
