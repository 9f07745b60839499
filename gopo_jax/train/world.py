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
import functools
import pathlib
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.host_rollout import (HostScriptedAgents, TextAgents, TextCodec, host_env_factory,
                                           logged_trajectory, rollout_host)
from gopo_jax.dialogue.layout import Layout
from gopo_jax.dialogue.rollout import AgentVocab, ScriptedAgents, jax_env_layout, make_rollout
from gopo_jax.envs import customers, policies, registry
from gopo_jax.models import hf_io, markers, qwen3
from gopo_jax.models.chat_format import ChatFormat
from gopo_jax.models.tokenizer import (ROLE_TOKENS, load_tokenizer, save_tokenizer, stage_token, strategy_token,
                                       train_tokenizer)
from gopo_jax.train import schedule


@dataclasses.dataclass
class World(abc.ABC):
    env: Any
    tokenizer: Any
    chat_format: ChatFormat
    layout: Layout
    vocab: AgentVocab
    model_config: qwen3.Qwen3Config  # the CS's (and the single agent's of methods without an Expert)
    expert_config: qwen3.Qwen3Config
    # Ids of marker rows a pretrained embedding gains (new or never trained): set to the mean row at initialisation.
    new_marker_rows: tuple[int, ...]
    system_preamble: str = ""  # the SOP as instructions before every business context (`layout.sop_in_system`)
    kind: ClassVar[str]  # the registry's kind of this world: "jax" | "host"

    @property
    def spec(self):
        return self.env.spec

    def codec(self) -> TextCodec:
        """Text <-> the slots of the layout (contexts, customer turns, replies), in the run's chat template."""
        return TextCodec(self.tokenizer, self.chat_format, self.layout, self.vocab, self.system_preamble)

    def agent_config(self, agent: str) -> qwen3.Qwen3Config:
        return self.expert_config if agent == "expert" else self.model_config

    @classmethod
    @abc.abstractmethod
    def build(cls, config, tokenizer) -> World:
        """The world of `config.env.name` over `tokenizer` (a run's saved one on resume, a checkpoint's, or None:
        the world's embedded tokenizer)."""

    @classmethod
    def _assemble(cls, config, env, tokenizer, make_layout, stage_names) -> World:
        """Registers the strategy and stage markers, cuts the chat template and sizes both agents."""
        sources = pretrained_sources(config)
        marker_tokens = ([strategy_token(k) for k in env.spec.strategies]
                         + [stage_token(s) for s in stage_names])
        base = {agent: hf_io.checkpoint_config(folder) for agent, folder in sources.items() if folder}
        if base:
            plan = markers.add_markers(tokenizer, marker_tokens, min(c.vocab_size for c in base.values()),
                                       allow_resize=config.model.resize_embeddings)
            tokenizer, vocab_size, new_rows = plan.tokenizer, plan.vocab_size, tuple(plan.new_rows)
        else:
            vocab_size, new_rows = _embedded_vocab_size(config, tokenizer), ()
        chat_format = ChatFormat.from_tokenizer(tokenizer)
        vocab = AgentVocab.from_tokenizer(tokenizer, env.spec.sop, stage_names=tuple(stage_names),
                                          chat_format=chat_format)
        layout = make_layout(vocab)
        marker_ids = (*vocab.strategy_ids, *vocab.stage_ids)
        configs = {agent: _agent_config(config, agent, base.get(agent), vocab_size, layout, marker_ids)
                   for agent in _AGENTS}
        return cls(env=env, tokenizer=tokenizer, chat_format=chat_format, layout=layout, vocab=vocab,
                   model_config=configs["cs"], expert_config=configs["expert"], new_marker_rows=new_rows)

    @abc.abstractmethod
    def episodes(self, key: jax.Array, n: int):
        """n training episodes: PRNG keys (pure-JAX worlds) or reset seeds (host worlds)."""

    @abc.abstractmethod
    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        """G rollouts per start state: each episode repeated G times (same customer, same world seed)."""

    @abc.abstractmethod
    def eval_episodes(self, seed: int, n: int, split: str = "test"):
        """n held-out customers of evaluation split `split` ("validation": tune methods on them; "test": report
        them), from `seed` (config keys eval.split, eval.seed, eval.episodes): the same for every method and
        checkpoint, and disjoint from the other split's and from every training customer."""

    @abc.abstractmethod
    def make_rollout(self, agents):
        """`rollout(params, episodes, agent_key) -> Trajectory` for model, scripted or text agents."""

    @abc.abstractmethod
    def demo_agents(self, noise: float, emit_decision: bool, kind: str = "random"):
        """The reference policy with a share `noise` of its turns replaced (the SFT demonstrator)."""

    @abc.abstractmethod
    def reference_agents(self):
        """The world's reference policy as agents (the nTSE baseline)."""

    def demo_rollout(self, config, emit_decision: bool):
        """The warm start's demonstrations as `(params, episodes, key) -> Trajectory`: `sft.source="rollout"` plays
        the demonstrator (`demo_agents`); "logged" renders the world's logged human dialogues."""
        if config.sft.source == "logged":
            return self._logged_rollout(emit_decision)
        return self.make_rollout(self.demo_agents(config.sft.noise, emit_decision=emit_decision,
                                                  kind=config.sft.noise_kind))

    def _logged_rollout(self, emit_decision: bool):
        raise ValueError(f"sft.source='logged': the {self.spec.name} world has no logged dialogues; use "
                         "sft.source='rollout' (its demonstrator)")


@dataclasses.dataclass
class JaxWorld(World):
    """A pure-JAX world: episodes are PRNG keys and the whole rollout is one jitted `lax.scan`."""

    kind: ClassVar[str] = "jax"

    @classmethod
    def build(cls, config, tokenizer) -> JaxWorld:
        env = registry.make_env(config.env.name, config=config, tokenizer=tokenizer)
        return cls._assemble(config, env, env.tokenizer, functools.partial(jax_env_layout, env), env.spec.sop.stages)

    def episodes(self, key: jax.Array, n: int):
        return jax.random.split(key, n)

    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        return jnp.repeat(self.episodes(key, groups), group_size, axis=0)

    def eval_episodes(self, seed: int, n: int, split: str = "test"):
        return jax.random.split(schedule.eval_customers_key(seed, split), n)

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

        def layout(vocab: AgentVocab) -> Layout:
            return Layout(context_len=lay.context_len, customer_len=lay.customer_len, header_len=vocab.header_len,
                          reply_len=lay.reply_len, max_turns=min(lay.max_turns, env.spec.max_turns))

        world = cls._assemble(config, env, tokenizer, layout, stages)
        if config.layout.sop_in_system:
            world.system_preamble = env.spec.sop.prompt(env.spec.strategy_descriptions)
        return world

    def episodes(self, key: jax.Array, n: int):
        # Training customers' seeds: all below customers.HELD_OUT_SEED0, where the held-out ones start.
        return np.asarray(jax.random.randint(key, (n,), 0, 2**31 - 1))

    def group_episodes(self, key: jax.Array, groups: int, group_size: int):
        return np.repeat(self.episodes(key, groups), group_size)

    def eval_episodes(self, seed: int, n: int, split: str = "test"):
        # Customers seed .. seed + n - 1 of the split: its items from the seed-th on, cycling past its size.
        return customers.held_out_seeds(split, seed, n)

    def make_rollout(self, agents):
        codec = self.codec()
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

    def _logged_rollout(self, emit_decision: bool):
        if not hasattr(self.env, "logged_demonstrations"):
            return super()._logged_rollout(emit_decision)
        codec = self.codec()

        def rollout(params, seeds, key):
            # The episodes' first seed picks the order of the logged dialogues (deterministic per run seed).
            demos = self.env.logged_demonstrations(len(seeds), int(seeds[0]))
            return logged_trajectory(demos, codec, self.spec.sop, emit_decision=emit_decision)

        return rollout


_WORLDS = {world.kind: world for world in (JaxWorld, HostWorld)}


_AGENTS = ("expert", "cs")


def pretrained_sources(config) -> dict[str, str]:
    """{"expert": folder or "", "cs": folder or ""}: the local Hugging Face Qwen3 folder each agent starts from
    (`model.init_from` for both, `model.expert_init_from` / `model.cs_init_from` per agent); "" is the preset's
    random initialisation."""
    m = config.model
    return {"expert": m.expert_init_from or m.init_from, "cs": m.cs_init_from or m.init_from}


def _embedded_vocab_size(config, tokenizer) -> int:
    vocab_size = -(-len(tokenizer) // 64) * 64  # pad the embedding to a multiple of 64 (shardable, aligned)
    # A real model's embedding size (e.g. Qwen3's 151,936): the rows past the tokenizer's are ids no input ever
    # holds, though the softmax still spreads probability over them, as over a real checkpoint's unused rows.
    m = config.model
    if m.vocab_size != -1:
        if m.vocab_size < len(tokenizer):
            raise ValueError(f"model.vocab_size={m.vocab_size} is smaller than the tokenizer's "
                             f"{len(tokenizer)} tokens; use -1 for the tokenizer's own size")
        vocab_size = m.vocab_size
    return vocab_size


def lora_agents(config) -> tuple[str, ...]:
    """The agents that train LoRA adapters only (`model.lora.agents`, when `model.lora.rank` > 0)."""
    lora = config.model.lora
    agents = tuple(a.strip() for a in lora.agents.split(",") if a.strip())
    if set(agents) - set(_AGENTS):
        raise ValueError(f"bad config: model.lora.agents={lora.agents!r} names agents other than {_AGENTS}")
    return agents if lora.rank > 0 else ()


def _agent_config(config, agent: str, pretrained: qwen3.Qwen3Config | None, vocab_size: int,
                  layout: Layout, marker_ids: tuple[int, ...]) -> qwen3.Qwen3Config:
    """One agent's architecture: a checkpoint's (its embedding grown to `vocab_size` if the markers need rows) or
    the preset's; the run's dtype policy, remat, attention, head chunking and LoRA adapters either way."""
    m = config.model
    run = dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, scan_unroll=m.scan_unroll,
               attention=m.attention, logits_chunk=m.logits_chunk)
    if agent in lora_agents(config):
        # The markers' embedding rows train with the adapters: a frozen embedding would keep every new marker at
        # the same (mean) row, and the Expert's strategy logits equal forever.
        run.update(lora_rank=m.lora.rank, lora_alpha=m.lora.alpha, trainable_rows=marker_ids,
                   lora_targets=tuple(t.strip() for t in m.lora.targets.split(",") if t.strip()))
    if pretrained is not None:
        return pretrained.replace(vocab_size=max(pretrained.vocab_size, vocab_size),
                                  max_position_embeddings=max(pretrained.max_position_embeddings, layout.length),
                                  **run)
    sizes = {k: m[k] for k in ("hidden_size", "num_layers", "intermediate_size") if m[k] != -1}
    return qwen3.get_config(m.preset, vocab_size=vocab_size, max_position_embeddings=max(layout.length, 64),
                            **run, **sizes)


def _pretrained_tokenizer(config):
    """The checkpoints' tokenizer, which both agents must share (the dialogue buffer is one token stream)."""
    folders = sorted({f for f in pretrained_sources(config).values() if f})
    if not folders:
        return None
    tokenizers = [hf_io.load_tokenizer(f) for f in folders]
    if len(tokenizers) == 2 and tokenizers[0].get_vocab() != tokenizers[1].get_vocab():
        raise hf_io.HFModelError(f"the Expert ({config.model.expert_init_from or config.model.init_from}) and the "
                                 f"CS ({config.model.cs_init_from or config.model.init_from}) have different "
                                 "tokenizers; both agents read one token stream, so pick checkpoints of one family")
    return tokenizers[0]


def build_world(config, workdir: str | pathlib.Path | None) -> World:
    """The tokenizer (with the marker tokens) is saved in `workdir/tokenizer` on the first run and reloaded on
    resume, so a resumed run uses exactly the ids its checkpoint was trained with. A run from Hugging Face
    checkpoints starts from their tokenizer and chat template; otherwise the world trains its embedded one."""
    tok_dir = pathlib.Path(workdir) / "tokenizer" if workdir else None
    saved = tok_dir is not None and (tok_dir / "tokenizer.json").exists()
    tokenizer = load_tokenizer(tok_dir) if saved else _pretrained_tokenizer(config)
    world = _WORLDS[registry.entry(config.env.name).kind].build(config, tokenizer)
    if tok_dir is not None and not saved:
        save_tokenizer(world.tokenizer, tok_dir)
    return world
