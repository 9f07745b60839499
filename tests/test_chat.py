"""`python -m gopo_jax.chat`: scripted customer lines through the chat loop give a transcript with the SOP stage, the
allowed strategies, the Expert's distribution over them (summing to 1, the one `ModelAgents.act` decides from) and
its choice, a CS reply, and an end after the run's max turns; the stage follows the realised strategy.

The workdir is a tiny untrained run (its initial state checkpointed): chatting needs a run's files, not a good
model, so the replies are gibberish."""
import io
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopo_jax import chat as chat_lib
from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.export import load_run
from tests.helpers import checkpointed_run, tiny_run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
LINES = ["hi i need some help", "i am looking for a laptop", "i prefer red and my budget is 99"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return checkpointed_run(tiny_run_config(), tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def chat(workdir):
    return chat_lib.Chat(load_run(workdir))


def _talk(chat, lines):
    out = io.StringIO()
    turns = chat_lib.chat_loop(chat, lines, out, echo=True)
    return turns, out.getvalue()


def test_scripted_dialogue_shows_stage_allowed_distribution_choice_and_reply(chat):
    sop = chat.sop
    turns, transcript = _talk(chat, [*LINES, "", "never read"])
    assert len(turns) == len(LINES)
    first = turns[0]
    assert first.stage == sop.stages[sop.initial]
    assert first.allowed == tuple(k for k, ok in zip(sop.strategies, sop.allowed[sop.initial]) if ok)
    for t in turns:
        assert set(t.distribution) == set(t.allowed)
        assert sum(t.distribution.values()) == pytest.approx(1.0, abs=1e-5)
        assert t.strategy == max(t.distribution, key=t.distribution.get)  # greedy: the argmax
        assert t.reply
        assert t.next_stage == sop.stages[chat_lib.next_stage(
            sop, sop.stages.index(t.stage), sop.strategies.index(t.realised) if t.realised else None)]
    assert [t.stage for t in turns[1:]] == [t.next_stage for t in turns[:-1]]
    rows = transcript.splitlines()
    assert rows[0] == f"context: {chat.context_text}" and "welcome to" in rows[0]
    assert "the stage moves on the realised strategy (the world's realisation check on the reply ids)" in rows[1]
    assert f"customer: {LINES[0]}" in rows
    assert (f"agent turn 1/{chat.max_turns} · stage {first.stage} · allowed: {', '.join(first.allowed)}") in rows
    assert any(r.startswith("  expert: ") and r.endswith(f"-> chose {first.strategy}") for r in rows)
    assert f"  cs: {first.reply}" in rows
    assert rows[-1] == f"dialogue ended by the customer after {len(LINES)} agent turn(s)"
    assert "never read" not in transcript


def test_dialogue_ends_after_the_runs_max_turns(chat):
    turns, transcript = _talk(chat, ["hello"] * (chat.max_turns + 2))
    assert len(turns) == chat.max_turns == chat.world.layout.max_turns
    assert transcript.splitlines()[-1].startswith(f"the dialogue reached the run's limit of {chat.max_turns} agent "
                                                  "turns")


def test_distribution_is_the_one_act_decides_from(chat):
    dialogue = chat.start()
    inp = chat.turn_input(LINES[0], dialogue.stage)
    probs = np.asarray(chat._distribution(chat.run.params, dialogue.carry, inp)[0])
    _, act = chat._act(chat.run.params, dialogue.carry, inp, jax.random.key(0))
    chosen = int(act.strategy[0])
    assert chosen == int(np.argmax(probs))
    assert float(jnp.exp(act.strategy_logp[0])) == pytest.approx(float(probs[chosen]), abs=1e-6)
    assert probs[~chat.sop.allowed[dialogue.stage]].sum() == 0.0


def test_sampling_is_reproducible_for_a_seed(workdir):
    run = load_run(workdir)
    a = chat_lib.chat_loop(chat_lib.Chat(run, sample=True, seed=3), LINES, io.StringIO())
    b = chat_lib.chat_loop(chat_lib.Chat(run, sample=True, seed=3), LINES, io.StringIO())
    assert a == b and all(t.strategy in t.allowed for t in a)


def test_context_flag_replaces_the_worlds(workdir):
    chat = chat_lib.Chat(load_run(workdir), context="welcome to shopwise promo yes")
    assert chat.context_text == "welcome to shopwise promo yes"


def test_stage_moves_on_the_realised_strategy(chat):
    sop, world = chat.sop, chat.world
    reply = "hello and welcome to shopwise how can i help you today"
    ids, valid = chat.codec.reply_ids(reply)
    greet = sop.strategy_index("greet")
    assert chat_lib.realise(world, ids, valid, reply) == greet
    assert chat_lib.next_stage(sop, sop.initial, greet) == sop.transition[sop.initial, greet] != sop.initial
    recommend = sop.strategy_index("recommend")
    assert not sop.allowed[sop.initial, recommend]  # an SOP violation keeps the stage
    for kept in (recommend, UNRECOGNISED, None):
        assert chat_lib.next_stage(sop, sop.initial, kept) == sop.initial


def test_transcript_of_a_world_without_realisation_check():
    turn = chat_lib.AgentTurn(turn=2, stage="opening", allowed=("greet",), distribution={"greet": 1.0},
                              strategy="greet", reply="hi", realised=None, next_stage="discovery")
    assert chat_lib.format_turn(turn, max_turns=5, realisation=None, sampled=True) == [
        "agent turn 2/5 · stage opening · allowed: greet", "  expert: greet 1.000 -> sampled greet", "  cs: hi",
        "  chosen: greet -> stage discovery"]


def test_single_agent_run_chats_without_an_expert(tmp_path):
    config = tiny_run_config()
    with config.unlocked():
        config.method = "grpo"
    chat = chat_lib.Chat(load_run(checkpointed_run(config, tmp_path)))
    turns, transcript = _talk(chat, LINES[:1])
    assert turns[0].strategy is None and turns[0].distribution == {}
    assert "single-agent run (method grpo)" in transcript and "expert:" not in transcript


@pytest.mark.slow
def test_command_line_reads_piped_lines(workdir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COMPILATION_CACHE_DIR": os.environ["JAX_COMPILATION_CACHE_DIR"]}
    result = subprocess.run([sys.executable, "-m", "gopo_jax.chat", "--workdir", str(workdir), "--seed", "1"],
                            input="\n".join(LINES[:2]) + "\n", cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert f"customer: {LINES[1]}" in rows and rows[-1] == "dialogue ended by the customer after 2 agent turn(s)"
