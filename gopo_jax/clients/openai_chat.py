"""A prompted large model acting as the CS agent, through an OpenAI-compatible endpoint (`gopo_jax.endpoint`).

`PromptedAgent` is the prompt-only baseline for host environments: a system prompt with the service procedure
(the strategies the SOP allows at the current stage, with their descriptions) and the whole strategy set asks the
model to answer as the customer-service agent with one line `STRATEGY: <name>` followed by the reply.
`act(obs)` returns (strategy index, reply text). If the model names no valid strategy the environment's
realisation check decides later what the reply carried out (the strategy is then reported as UNRECOGNISED).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from gopo_jax.dialogue.sop import SOP, UNRECOGNISED
from gopo_jax.endpoint import ChatClient


@dataclasses.dataclass
class PromptedAgent:
    """A prompted chat model as the CS agent of a host environment (HostObs in, (strategy, reply) out)."""

    client: ChatClient
    sop: SOP
    strategy_descriptions: Sequence[str] = ()
    temperature: float = 0.0
    max_tokens: int = 128
    history: list = dataclasses.field(default_factory=list)

    def system_prompt(self, stage: int, allowed, context: str = "") -> str:
        descriptions = dict(zip(self.sop.strategies, self.strategy_descriptions))
        lines = [f"- {k}: {descriptions.get(k, k)}" for k in self.sop.strategies]
        allowed_names = [k for k, ok in zip(self.sop.strategies, allowed) if ok]
        business = f"Business context: {context}\n" if context else ""
        return ("You are the customer-service agent of a shop. Follow the standard operating procedure (SOP).\n"
                f"{business}Strategies:\n" + "\n".join(lines) + "\n\n"
                f"Current SOP stage: {self.sop.stages[stage]}. Allowed strategies now: {', '.join(allowed_names)}. "
                "Using any other strategy violates the SOP.\n"
                "Answer with exactly two lines:\nSTRATEGY: <one allowed strategy name>\nREPLY: <your reply to the "
                "customer, one or two sentences>")

    def reset(self) -> None:
        self.history = []

    def act(self, obs) -> tuple[int, str]:
        """One agent turn for `obs` (a HostObs): the strategy index (UNRECOGNISED if none named) and the reply."""
        self.history.append({"role": "user", "content": obs.customer})
        system = self.system_prompt(obs.stage, obs.allowed, getattr(obs, "context", ""))
        messages = [{"role": "system", "content": system}, *self.history]
        text = self.client.complete_text(messages, temperature=self.temperature, max_tokens=self.max_tokens)
        strategy, reply = parse_answer(text, self.sop.strategies)
        self.history.append({"role": "assistant", "content": reply})
        return strategy, reply


def parse_answer(text: str, strategies: Sequence[str]) -> tuple[int, str]:
    """"STRATEGY: x\\nREPLY: y" -> (index of x or UNRECOGNISED, y); without a REPLY line the whole text is the reply."""
    match = re.search(r"STRATEGY:\s*([A-Za-z_\-]+)", text)
    name = match.group(1).strip().lower() if match else ""
    strategy = strategies.index(name) if name in strategies else UNRECOGNISED
    reply_match = re.search(r"REPLY:\s*(.*)", text, flags=re.S)
    reply = reply_match.group(1).strip() if reply_match else re.sub(r"STRATEGY:.*\n?", "", text).strip()
    return strategy, reply
