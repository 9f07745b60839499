"""The SFT baseline (GOPO.md §4): the warm-start Expert + CS are the result; nothing trains after them."""
from __future__ import annotations

from gopo_jax.train.methods.base import Method, MethodContext


def make_sft(ctx: MethodContext) -> Method:
    return Method(name="sft", use_expert=ctx.hyper.use_expert, learning_rates={"expert": 0.0, "cs": 0.0},
                  make_agents=ctx.model_agents)
