"""Builds what a run needs from its config: the environment, its tokenizer, the buffer layout, the agent vocabulary,
and the rollout functions (config → world, the first arrow of the data flow; the agents are built by
`gopo_jax.train.build`).

Both kinds of world (gopo_jax/envs/registry.py) look the same to the training loop: `world.make_rollout(agents)`
returns `rollout(params, episodes, agent_key) -> Trajectory`, where `episodes` are PRNG keys (`JaxWorld`; one jitted
`lax.scan`) or integer seeds (`HostWorld`; a Python turn loop around the jitted agent turn).
"""
from __future__ import annotations

import abc
import dataclasses
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.host_rollout import HostScriptedAgents, TextAgents, TextCodec, host_env_factory, rollout_host
from gopo_jax.dialogue.layout import Layout
from gopo_jax.dialogue.rollout import HEADER_LEN, AgentVocab, ScriptedAgents, jax_env_layout, make_rollout
from gopo_jax.envs import policies, registry
from gopo_jax.models import qwen3
from gopo_jax.models.tokenizer import (ROLE_TOKENS, load_tokenizer, save_tokenizer, stage_token, strategy_token,
                                       train_tokenizer)


@dataclasses.dataclass
class World(abc.ABC):
    env: Any
    tokenizer: Any
    layout: Layout
    vocab: AgentVocab
    model_config: qwen3.Qwen3Config
    kind: ClassVar[str]  # the registry's kind of this world: "jax" | "host"

    @property
    def spec(self):
        return self.env.spec

    @classmethod
    @abc.abstractmethod
    def build(cls, config, tokenizer) -> World:
        """The world of `config.env.name`, reusing `tokenizer` when one was saved by an earlier run."""

    @classmethod
    def _assemble(cls, config, env, tokenizer, layout: Layout, stage_names) -> World:
        vocab = AgentVocab.from_tokenizer(tokenizer, env.spec.sop, stage_names=tuple(stage_names))
        m = config.model
        vocab_size = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64 (shardable, aligned)
        # A real model's embedding size (e.g. Qwen3's 151,936): the rows past the tokenizer's are ids no input ever
        # holds, though the softmax still spreads probability over them, as over a real checkpoint's unused rows.
        if m.vocab_size != -1:
            if m.vocab_size < len(tokenizer):
                raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                                 f"{len(tokenizer)} tokens; use -1 for the tokenizer's own size")
            vocab_size = m.vocab_size
        sizes = {k: m[k] for k in ("hidden_size", "num_layers", "intermediate_size") if m[k] != -1}
        model_config = qwen3.get_config(m.preset, vocab_size=vocab_size, dtype=m.dtype, param_dtype=m.param_dtype,
                                        remat=m.remat, scan_unroll=m.scan_unroll, attention=m.attention,
                                        logits_chunk=m.logits_chunk,
                                        max_position_embeddings=max(layout.length, 64), **sizes)
        return cls(env=env, tokenizer=tokenizer, layout=layout, vocab=vocab, model_config=model_config)

    @abc.abstractmethod
    def episodes(self, key: jax.Array, n: int):
        """n training episodes: PRNG keys (pure-JAX worlds) or reset seeds (host worlds)."""

    @abc.abstractmethod
    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        """G rollouts per start state: each episode repeated G times (same customer, same world seed)."""

    @abc.abstractmethod
    def eval_episodes(self, seed: int, n: int):
        """The fixed evaluation episodes of `seed` (the same for every method and checkpoint)."""

    @abc.abstractmethod
    def make_rollout(self, agents):
        """`rollout(params, episodes, agent_key) -> Trajectory` for model, scripted or text agents."""

    @abc.abstractmethod
    def demo_agents(self, noise: float, emit_decision: bool, kind: str = "random"):
        """The reference policy with a share `noise` of its turns replaced (the SFT demonstrator)."""

    @abc.abstractmethod
    def reference_agents(self):
        """The world's reference policy as agents (the nTSE baseline)."""


@dataclasses.dataclass
class JaxWorld(World):
    """A pure-JAX world: episodes are PRNG keys and the whole rollout is one jitted `lax.scan`."""

    kind: ClassVar[str] = "jax"

    @classmethod
    def build(cls, config, tokenizer) -> JaxWorld:
        env = registry.make_env(config.env.name, config=config, tokenizer=tokenizer)
        return cls._assemble(config, env, env.tokenizer, jax_env_layout(env), env.spec.sop.stages)

    def episodes(self, key: jax.Array, n: int):
        return jax.random.split(key, n)

    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        return jnp.repeat(self.episodes(key, groups), group_size, axis=0)

    def eval_episodes(self, seed: int, n: int):
        return jax.random.split(jax.random.key(seed), n)

    def make_rollout(self, agents):
        return make_rollout(self.env, self.layout, self.vocab, agents)

    def demo_agents(self, noise: float, emit_decision: bool, kind: str = "random"):
        return ScriptedAgents(policies.JaxDemonstrator(self.env, noise, kind), self.vocab,
                              emit_decision=emit_decision)

    def reference_agents(self):
        return ScriptedAgents(policies.JaxReference(self.env), self.vocab)


@dataclasses.dataclass
class HostWorld(World):
    """A text world: episodes are reset seeds, played by a Python turn loop around the jitted agent turn; the
    tokenizer is trained on the world's corpus (with the role, strategy and stage tokens) on the first run."""

    kind: ClassVar[str] = "host"

    @classmethod
    def build(cls, config, tokenizer) -> HostWorld:
        env = registry.make_env(config.env.name, config=config)
        stages = env.stage_names()
        if tokenizer is None:
            specials = ([*ROLE_TOKENS] + [strategy_token(k) for k in env.spec.strategies]
                        + [stage_token(s) for s in stages])
            tokenizer = train_tokenizer(env.corpus(), vocab_size=config.tokenizer.vocab_size,
                                        special_tokens=specials)
        lay = config.layout
        layout = Layout(context_len=lay.context_len, customer_len=lay.customer_len, header_len=HEADER_LEN,
                        reply_len=lay.reply_len, max_turns=min(lay.max_turns, env.spec.max_turns))
        return cls._assemble(config, env, tokenizer, layout, stages)

    def episodes(self, key: jax.Array, n: int):
        return np.asarray(jax.random.randint(key, (n,), 0, 2**31 - 1))

    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        return np.repeat(self.episodes(key, groups), group_size)

    def eval_episodes(self, seed: int, n: int):
        return seed + np.arange(n)

    def make_rollout(self, agents):
        codec = TextCodec(self.tokenizer, self.layout, self.vocab)
        factory = host_env_factory(self.env)
        if isinstance(agents, (HostScriptedAgents, TextAgents)):
            return lambda params, seeds, key: rollout_host(factory, codec, agents, params, seeds, key)
        init, act = jax.jit(agents.init), jax.jit(agents.act)
        return lambda params, seeds, key: rollout_host(factory, codec, agents, params, seeds, key,
                                                       jitted_act=act, jitted_init=init)

    def demo_agents(self, noise: float, emit_decision: bool, kind: str = "random"):
        if kind != "random":
            raise ValueError(f"sft.noise_kind={kind!r} exists only for the synthetic shop; host worlds deviate from "
                             "their reference with random allowed strategies (sft.noise_kind='random')")
        return HostScriptedAgents(noise=noise, emit_decision=emit_decision)

    def reference_agents(self):
        return HostScriptedAgents(noise=0.0)


_WORLDS = {world.kind: world for world in (JaxWorld, HostWorld)}


def build_world(config, workdir: str | pathlib.Path | None) -> World:
    """The tokenizer is saved in `workdir/tokenizer` on the first run and reloaded on resume, so a resumed run
    uses exactly the ids its checkpoint was trained with."""
    tok_dir = pathlib.Path(workdir) / "tokenizer" if workdir else None
    saved = tok_dir is not None and (tok_dir / "tokenizer.json").exists()
    world = _WORLDS[registry.entry(config.env.name).kind].build(config, load_tokenizer(tok_dir) if saved else None)
    if tok_dir is not None and not saved:
        save_tokenizer(world.tokenizer, tok_dir)
    return world
