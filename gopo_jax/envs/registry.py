"""Name -> environment constructor, imported lazily so that looking at one world never loads another's data or code.

Every entry is "module:function"; the function builds the environment and accepts keyword arguments (the
synthetic shop takes `config`/`tokenizer`; the file-backed worlds take `data_dir`).
"""
from __future__ import annotations

import importlib
from typing import Any

ENVIRONMENTS = {
    "synthetic_shop": "gopo_jax.envs.synthetic_shop:make_env",
    "mgshop": "gopo_jax.envs.mgshop:make_env",
    "multiwoz": "gopo_jax.envs.multiwoz:make_env",
    "tmallbrand": "gopo_jax.envs.tmallbrand:make_env",
}


def names() -> list[str]:
    return list(ENVIRONMENTS)


def constructor(name: str):
    if name not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {name!r}; known: {names()} (add new ones to "
                         "gopo_jax/envs/registry.py)")
    module, _, fn = ENVIRONMENTS[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def make_env(name: str, *, data_dir=None, **kwargs: Any):
    """Builds environment `name`; `data_dir` is passed only when given (the synthetic shop needs no files)."""
    if data_dir is not None:
        kwargs["data_dir"] = data_dir
    return constructor(name)(**kwargs)
