"""The method registry (`config.method`): a name maps to a function building the method's bundle of pure functions
from a `MethodContext`. Adding a method is one module in this package plus one line here.

`prompted` is not a method of this pipeline: a chat model behind an endpoint is evaluated, not trained, by
`gopo_jax.clients.prompted_eval` (`gopo_jax.launch.train` routes it there).
"""
from __future__ import annotations

from collections.abc import Callable

from gopo_jax.train.methods.base import Method, MethodContext
from gopo_jax.train.methods.dpo import make_dpo
from gopo_jax.train.methods.gopo import make_gopo
from gopo_jax.train.methods.grpo import make_grpo
from gopo_jax.train.methods.memento import make_memento
from gopo_jax.train.methods.ppo import make_ppo
from gopo_jax.train.methods.sft import make_sft

METHODS: dict[str, Callable[[MethodContext], Method]] = {
    "gopo": make_gopo,
    "sft": make_sft,
    "grpo": make_grpo,
    "ppo": make_ppo,
    "dpo": make_dpo,
    "memento": make_memento,
}


def make_method(name: str, ctx: MethodContext) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (config.method); choose one of {sorted(METHODS)} (or "
                         "'prompted', a chat model evaluated instead of trained)")
    return METHODS[name](ctx)


__all__ = ["METHODS", "Method", "MethodContext", "make_method"]
