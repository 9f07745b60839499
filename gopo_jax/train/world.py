"""Builds what a run needs from its config: the environment, its tokenizer, the buffer layout, the agent vocabulary,
the rollout functions and the two Qwen3 agents (config → env + models, the first arrow of the data flow).

Both kinds of environment look the same to the training loop: `world.make_rollout(agents)` returns
`rollout(params, episodes, agent_key) -> Trajectory`, where `episodes` are PRNG keys (pure-JAX worlds; one jitted
`lax.scan`) or integer seeds (host worlds; a Python turn loop around the jitted agent turn).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.dialogue.host_rollout import HostScriptedAgents, TextAgents, TextCodec, host_env_factory, rollout_host
from gopo_jax.dialogue.layout import Layout
from gopo_jax.dialogue.rollout import HEADER_LEN, AgentVocab, ScriptedAgents, make_rollout
from gopo_jax.models import qwen3
from gopo_jax.models.tokenizer import (ROLE_TOKENS, load_tokenizer, save_tokenizer, stage_token, strategy_token,
                                       train_tokenizer)

HOST_ENVS = ("mgshop", "multiwoz", "tmallbrand")


@dataclasses.dataclass
class World:
    env: Any
    tokenizer: Any
    layout: Layout
    vocab: AgentVocab
    model_config: qwen3.Qwen3Config
    kind: str  # "jax" | "host"

    @property
    def spec(self):
        return self.env.spec

    # --- episodes: keys for pure-JAX worlds, seeds for host worlds ---
    def episodes(self, key: jax.Array, n: int):
        keys = jax.random.split(key, n)
        if self.kind == "jax":
            return keys
        return np.asarray(jax.random.randint(key, (n,), 0, 2**31 - 1))

    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        """G rollouts per start state: each episode repeated G times (same customer, same world seed)."""
        base = self.episodes(key, groups)
        return jnp.repeat(base, group_size, axis=0) if self.kind == "jax" else np.repeat(base, group_size)

    def eval_episodes(self, seed: int, n: int):
        if self.kind == "jax":
            return jax.random.split(jax.random.key(seed), n)
        return seed + np.arange(n)

    # --- rollouts ---
    def make_rollout(self, agents):
        if self.kind == "jax":
            return make_rollout(self.env, self.layout, self.vocab, agents)
        codec = TextCodec(self.tokenizer, self.layout, self.vocab)
        factory = host_env_factory(self.env)
        if isinstance(agents, (HostScriptedAgents, TextAgents)):
            return lambda params, seeds, key: rollout_host(factory, codec, agents, params, seeds, key)
        init, act = jax.jit(agents.init), jax.jit(agents.act)
        return lambda params, seeds, key: rollout_host(factory, codec, agents, params, seeds, key,
                                                       jitted_act=act, jitted_init=init)

    def demo_agents(self, noise: float, emit_decision: bool, kind: str = "random"):
        if self.kind == "jax":
            return ScriptedAgents(functools.partial(_demo_turn, self.env, noise, kind), self.vocab,
                                  emit_decision=emit_decision)
        if kind != "random":
            raise ValueError(f"sft.noise_kind={kind!r} exists only for the synthetic shop; host worlds deviate from "
                             "their reference with random allowed strategies (sft.noise_kind='random')")
        return HostScriptedAgents(noise=noise, emit_decision=emit_decision)

    def reference_agents(self):
        if self.kind == "jax":
            return ScriptedAgents(self.env.reference_turn, self.vocab)
        return HostScriptedAgents(noise=0.0)


def _demo_turn(env, noise, kind, state, key):
    return env.demonstration_turn(state, key, noise=noise, kind=kind)


def _stage_names(env) -> tuple[str, ...]:
    """Stage tokens for the agent header. Worlds whose automaton changes per scenario (TmallBrand: one per
    subflow) expose `max_stages` and get positional stage tokens."""
    n = getattr(env, "max_stages", None)
    return tuple(f"#{i}" for i in range(n)) if n else tuple(env.spec.sop.stages)


def _host_env(config):
    name, data_dir = config.env.name, config.env.data_dir or None
    if name == "mgshop":
        from gopo_jax.envs import mgshop
        return mgshop.make_env(data_dir)
    if name == "multiwoz":
        from gopo_jax.envs import multiwoz
        return multiwoz.make_env(data_dir, max_turns=config.env.max_turns if config.env.max_turns > 0 else 20)
    from gopo_jax.envs import tmallbrand
    return tmallbrand.make_env(data_dir)


def build_world(config, workdir: str | pathlib.Path | None) -> World:
    """The tokenizer is saved in `workdir/tokenizer` on the first run and reloaded on resume, so a resumed run
    uses exactly the ids its checkpoint was trained with."""
    tok_dir = pathlib.Path(workdir) / "tokenizer" if workdir else None
    tokenizer = load_tokenizer(tok_dir) if tok_dir and (tok_dir / "tokenizer.json").exists() else None
    name = config.env.name
    if name == "synthetic_shop":
        from gopo_jax.envs import synthetic_shop
        env = synthetic_shop.make_env(synthetic_shop.SyntheticShopConfig(vocab_size=config.tokenizer.vocab_size),
                                      tokenizer=tokenizer)
        kind, tokenizer = "jax", env.tokenizer
        layout = Layout(context_len=env.context_len, customer_len=env.customer_len, header_len=HEADER_LEN,
                        reply_len=env.reply_len, max_turns=env.spec.max_turns)
        stages = tuple(env.spec.sop.stages)
    elif name in HOST_ENVS:
        env = _host_env(config)
        kind = "host"
        stages = _stage_names(env)
        if tokenizer is None:
            specials = ([*ROLE_TOKENS] + [strategy_token(k) for k in env.spec.strategies]
                        + [stage_token(s) for s in stages])
            tokenizer = train_tokenizer(env.corpus(), vocab_size=config.tokenizer.vocab_size,
                                        special_tokens=specials)
        lay = config.layout
        layout = Layout(context_len=lay.context_len, customer_len=lay.customer_len, header_len=HEADER_LEN,
                        reply_len=lay.reply_len, max_turns=min(lay.max_turns, env.spec.max_turns))
    else:
        raise ValueError(f"unknown env.name {name!r}; choose 'synthetic_shop' or one of {HOST_ENVS}")
    if tok_dir and not (tok_dir / "tokenizer.json").exists():
        save_tokenizer(tokenizer, tok_dir)
    vocab = AgentVocab.from_tokenizer(tokenizer, env.spec.sop, stage_names=stages)
    m = config.model
    vocab_size = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64 (shardable, aligned)
    model_config = qwen3.get_config(m.preset, vocab_size=vocab_size, hidden_size=m.hidden_size,
                                    num_layers=m.num_layers, intermediate_size=m.intermediate_size, dtype=m.dtype,
                                    max_position_embeddings=max(layout.length, 64))
    return World(env=env, tokenizer=tokenizer, layout=layout, vocab=vocab, model_config=model_config, kind=kind)


def init_agents(world: World, seed: int) -> tuple[Any, Any, dict]:
    """(expert graphdef, cs graphdef, params {"expert", "cs"}): two independently initialised models."""
    expert = qwen3.Qwen3(world.model_config, rngs=nnx.Rngs(seed))
    cs = qwen3.Qwen3(world.model_config, rngs=nnx.Rngs(seed + 1))
    ge, pe = nnx.split(expert, nnx.Param)
    gc, pc = nnx.split(cs, nnx.Param)
    return ge, gc, {"expert": pe, "cs": pc}
