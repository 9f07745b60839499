"""The prompted-large-model baseline (GOPO.md §4): a chat model behind an OpenAI-compatible endpoint acts as the CS
of a host world on the same held-out customers as the trained agents, scored by the same metrics.

`config.method == "prompted"` routes `gopo_jax.launch.train` here, so the comparison driver runs it like any
other method (`experiments/compare.py`, e.g. a variant "method=prompted,baselines.prompted.model=..."). Nothing is
trained: the world is built (its tokenizer is saved in the workdir like a run's), the reference policy and the
prompted agent each serve `eval.episodes` customers, and `summary.json` has a run's shape with a `prompted` block.
The prompted agent's reply passes through the same reply slot as the trained CS (`layout.reply_len` tokens of the
world's tokenizer), so both are held to the same length; a longer answer is cut, and the world sees the cut text.
The prompted episodes are played concurrently, `baselines.prompted.max_concurrency` of them at a time (each its own
rollout; a dialogue's turns stay in order), and put back together in episode order.
"""
from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.clients.openai_chat import PromptedAgent
from gopo_jax.endpoint import ChatClient, map_concurrently
from gopo_jax.dialogue.host_rollout import TextAgents
from gopo_jax.metrics.episode import EpisodeMetricSettings, host_episode_metrics
from gopo_jax.train.metrics_log import save_config, write_summary
from gopo_jax.train.report import summary_block, write_judge_samples
from gopo_jax.train.world import build_world

DEFAULT_MAX_CONCURRENCY = 8  # episodes in flight when the config predates baselines.prompted.max_concurrency


def prompted_agents(settings, *, temperature: float | None = None) -> TextAgents:
    """One `PromptedAgent` per episode, prompted with that episode's SOP and strategy descriptions."""
    if not settings.base_url or not settings.model:
        raise ValueError("method=prompted needs baselines.prompted.base_url (e.g. http://127.0.0.1:8000) and "
                         "baselines.prompted.model (the served model's name)")
    client = ChatClient(settings.base_url, settings.model, api_key_env=settings.api_key_env,
                        timeout=settings.timeout, max_retries=settings.max_retries,
                        config_keys="baselines.prompted.base_url / baselines.prompted.model")

    def make_agent(env):
        return PromptedAgent(client, env.spec.sop, env.spec.strategy_descriptions,
                             temperature=settings.temperature if temperature is None else temperature,
                             max_tokens=settings.max_tokens)

    return TextAgents(make_agent)


def rollout_concurrently(rollout, episodes, key: jax.Array, max_concurrency: int):
    """`rollout(params, episodes, key)` of a host world, one episode per call with at most `max_concurrency` in
    flight: the Trajectory of all episodes, in the order of `episodes` whatever order they finish in."""
    parts = map_concurrently(lambda episode: rollout({}, np.asarray([episode]), key), list(episodes),
                             max_concurrency)
    return jax.tree.map(lambda *fields: jnp.concatenate(fields), *parts)


def evaluate_prompted(config, workdir: str | pathlib.Path) -> dict:
    """Serves the held-out customers with the prompted model; writes and returns the run-format summary."""
    start = time.time()
    settings = config.baselines.prompted
    max_concurrency = int(settings.get("max_concurrency", DEFAULT_MAX_CONCURRENCY))
    if max_concurrency < 1:
        raise ValueError(f"baselines.prompted.max_concurrency must be at least 1 (episodes in flight), got "
                         f"{max_concurrency}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    world = build_world(config, workdir)
    if world.kind != "host":
        raise ValueError(f"method=prompted needs a text (host) world: env.name={config.env.name!r} speaks token ids "
                         "only; use mg_shopdial, multiwoz or tmallbrand")
    save_config(workdir, config)
    episodes = world.eval_episodes(config.eval.seed, config.eval.episodes, config.eval.get("split", "test"))
    key = jax.random.key(config.seed)  # seeds the host loop's own draws; text agents and the reference use none
    metric_settings = EpisodeMetricSettings.from_config(config, spec_max_relevance=world.spec.max_relevance,
                                                   t_max=world.spec.max_turns)

    def metrics(traj):
        return host_episode_metrics(traj, metric_settings)

    reference = metrics(world.make_rollout(world.reference_agents())({}, episodes, key))
    traj = rollout_concurrently(world.make_rollout(prompted_agents(settings)), episodes, key, max_concurrency)
    prompted = metrics(traj)
    write_judge_samples(workdir, world, traj, config.eval.judge_dialogues)
    summary = {"env": world.spec.name, "method": "prompted", "eval_episodes": int(config.eval.episodes),
               "endpoint": {"base_url": settings.base_url, "model": settings.model},
               # The prompted model names its strategy every turn (STRATEGY: ...): it chooses, as an Expert does.
               "reference": summary_block(reference, reference, use_expert=True),
               "prompted": summary_block(prompted, reference, use_expert=True),
               "wall_seconds": time.time() - start}
    write_summary(workdir, summary)
    return summary
