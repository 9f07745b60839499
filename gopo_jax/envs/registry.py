"""The one table of worlds: env.name -> the world's kind and how to build it.

A world's kind decides how it is played: "jax" worlds keep their state in arrays and a whole batch of dialogues
runs in one jitted `lax.scan` (dialogue/rollout.py); "host" worlds are Python objects that speak text, played by a
Python turn loop around the jitted agents (dialogue/host_rollout.py). Builders import their module lazily, so that
looking at one world never loads another's data or code. Every builder takes the run's config (None: the world's
defaults, as `python -m gopo_jax.envs.policy_report` builds it), a data folder and a tokenizer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

@dataclasses.dataclass(frozen=True)
class WorldEntry:
    kind: str  # "jax" | "host"
    build: Callable[..., Any]  # build(config | None, data_dir, tokenizer) -> environment


def _max_turns(config) -> dict:
    """env.max_turns > 0 overrides the world's own T_max; -1 keeps it."""
    return {"max_turns": config.env.max_turns} if config is not None and config.env.max_turns > 0 else {}


def _synthetic_shop(config, data_dir, tokenizer):
    from gopo_jax.envs import synthetic_shop
    from gopo_jax.models.tokenizer import is_embedded

    shop = synthetic_shop.SyntheticShopConfig()
    preamble = ""
    if config is not None:
        shop = dataclasses.replace(shop, vocab_size=config.tokenizer.vocab_size, **_max_turns(config))
        if tokenizer is not None and not is_embedded(tokenizer):
            # A checkpoint's tokenizer spells world words in several ids: the context and customer slots take the
            # longest filling; the reply slot is the run's (a pretrained CS writes more than the templates).
            shop = dataclasses.replace(shop, context_len=-1, customer_len=-1, reply_len=config.layout.reply_len)
        if config.layout.sop_in_system:
            sop = synthetic_shop.load_sop(synthetic_shop.SOP_PATH)
            preamble = sop.prompt(tuple(synthetic_shop.DESCRIPTIONS.get(k, k) for k in sop.strategies))
    return synthetic_shop.make_env(shop, tokenizer=tokenizer, system_preamble=preamble)


def _mg_shopdial(config, data_dir, tokenizer):
    from gopo_jax.envs import mgshop

    return mgshop.make_env(data_dir, **_max_turns(config))


def _multiwoz(config, data_dir, tokenizer):
    from gopo_jax.envs import multiwoz

    return multiwoz.make_env(data_dir, **_max_turns(config))


def _tmallbrand(config, data_dir, tokenizer):
    from gopo_jax.envs import tmallbrand

    return tmallbrand.make_env(data_dir, **_max_turns(config))


WORLDS = {
    "synthetic_shop": WorldEntry("jax", _synthetic_shop),
    "mg_shopdial": WorldEntry("host", _mg_shopdial),
    "multiwoz": WorldEntry("host", _multiwoz),
    "tmallbrand": WorldEntry("host", _tmallbrand),
}
# Old names a config may still say; they are errors that name the new one.
RENAMED = {"mgshop": "mg_shopdial"}


def names() -> list[str]:
    return list(WORLDS)


def entry(name: str) -> WorldEntry:
    if name in RENAMED:
        raise ValueError(f"env.name={name!r} was renamed to {RENAMED[name]!r} (the MG-ShopDial world); set "
                         f"--config.env.name={RENAMED[name]}")
    if name not in WORLDS:
        raise ValueError(f"unknown env.name {name!r}; known worlds: {names()} (new ones go in "
                         "gopo_jax/envs/registry.py)")
    return WORLDS[name]


def is_pure_jax(name: str) -> bool:
    """Whether world `name` runs entirely in traced JAX (one jit per rollout, vmappable over seeds)."""
    return entry(name).kind == "jax"


def make_env(name: str, *, config=None, data_dir=None, tokenizer=None):
    """Builds world `name` from a run's config (its env.data_dir, env.max_turns, tokenizer.vocab_size) or, without
    one, with the world's defaults; an explicit `data_dir` wins over the config's."""
    data_dir = data_dir or (config.env.data_dir if config is not None else None) or None
    return entry(name).build(config, data_dir, tokenizer)
