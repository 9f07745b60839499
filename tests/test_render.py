"""Tests for gopo_jax/dialogue/render.py on a hand-built batch of two dialogues: the transcript text and the G-Eval
judge samples (decoded slots, role tags, strategy names and descriptions, turn counts, padded turns left out)."""
import numpy as np
import pytest

from gopo_jax.dialogue.layout import Layout, Trajectory
from gopo_jax.dialogue.render import judge_samples, render_dialogue
from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.models import tokenizer as tl
from gopo_jax.models.chat_format import ChatFormat

STRATEGIES = ("greet", "recommend", "close")
LAYOUT = Layout(context_len=24, customer_len=24, header_len=2, reply_len=32, max_turns=3)
CONTEXT = ["you sell laptops", "a shoe shop"]
# (customer, chosen strategy, realised strategy, reply) per turn; None = a turn that did not happen.
TURNS = [
    [("i need a laptop", 0, 0, "hello and welcome"), ("something red", 1, UNRECOGNISED, "i recommend the velora"),
     None],
    [("hi", 2, 2, "goodbye"), ("wait", -1, 1, "try these shoes"), ("ok", 0, 0, "thanks")],
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = CONTEXT + [t[0] + " " + t[3] for d in TURNS for t in d if t]
    return tl.train_tokenizer(corpus * 10, vocab_size=300, special_tokens=[tl.strategy_token(s) for s in STRATEGIES])


def _fill(tokens, valid, start, width, ids):
    assert len(ids) <= width, "slot too small for the test text"
    tokens[start:start + len(ids)] = ids
    valid[start:start + len(ids)] = True


def build(tokenizer) -> Trajectory:
    """The two dialogues laid out as the rollout would: role tokens, text and <|eot|> in each slot, pads after."""
    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    b, t_max = len(TURNS), LAYOUT.max_turns
    pad = tokenizer.pad_token_id
    tokens, valid = np.full((b, LAYOUT.length), pad, np.int32), np.zeros((b, LAYOUT.length), bool)
    strategy, realised = np.zeros((b, t_max), np.int32), np.zeros((b, t_max), np.int32)
    turn_mask = np.zeros((b, t_max), bool)
    for i, turns in enumerate(TURNS):
        _fill(tokens[i], valid[i], 0, LAYOUT.context_len, enc(tl.CONTEXT + " " + CONTEXT[i]))
        for t, turn in enumerate(turns):
            customer, k, kr, reply = turn or ("not a turn", 0, 0, "never shown")  # padded turns hold stale text
            _fill(tokens[i], valid[i], LAYOUT.turn_start(t), LAYOUT.customer_len,
                  enc(f"{tl.CUSTOMER} {customer}{tl.EOT}"))
            _fill(tokens[i], valid[i], LAYOUT.header_start(t), LAYOUT.header_len, enc(tl.AGENT))
            if k >= 0:
                _fill(tokens[i], valid[i], LAYOUT.decision_pos(t), 1, enc(tl.strategy_token(STRATEGIES[k])))
            _fill(tokens[i], valid[i], LAYOUT.reply_start(t), LAYOUT.reply_len, enc(f" {reply}{tl.EOT}"))
            strategy[i, t], realised[i, t], turn_mask[i, t] = k, kr, turn is not None

    def per_turn(*rows):
        return np.array(rows, np.float32)

    zeros_l = np.zeros((b, LAYOUT.length))
    return Trajectory(
        tokens=tokens, valid=valid, ea_mask=zeros_l.astype(bool), cs_mask=zeros_l.astype(bool), cs_logprob=zeros_l,
        strategy=strategy, allowed=np.ones((b, t_max, len(STRATEGIES)), bool), ea_logprob=np.zeros((b, t_max)),
        realised=realised, aligned=np.zeros((b, t_max)), sop_valid=np.ones((b, t_max)),
        gain=per_turn([0.5, 0.0, 9.0], [0.25, 0.0, 1.0]), cont=per_turn([1.0, 0.5, 9.0], [1.0, 1.0, 0.0]),
        rel=per_turn([1, 0, 9], [0, 1, 1]), rel_realised=per_turn([1, 0, 9], [0, 1, 1]),
        quality=per_turn([0.75, 0.25, 9.0], [0.5, 0.5, 1.0]),
        turn_mask=turn_mask, outcome=np.array([1.0, 0.0]), satisfaction=np.array([0.8, 0.125]),
        fcr=np.array([0.0, 1.0]))


def test_trajectory_is_well_formed(tokenizer):
    traj = build(tokenizer)
    traj.check(LAYOUT, len(STRATEGIES))
    np.testing.assert_array_equal(traj.num_turns, [2, 3])


def test_render_dialogue_exact_text(tokenizer):
    text = render_dialogue(build(tokenizer), 0, tokenizer=tokenizer, chat_format=ChatFormat.from_tokenizer(tokenizer), layout=LAYOUT, strategies=STRATEGIES)
    assert text.splitlines() == [
        "context: you sell laptops",
        "  customer: i need a laptop",
        "  agent [greet -> greet] hello and welcome   (g=0.50 c=1.00 rel=1 q=0.75)",
        "  customer: something red",
        "  agent [recommend -> unrecognised] i recommend the velora   (g=0.00 c=0.50 rel=0 q=0.25)",
        "  outcome=1 satisfaction=0.80 fcr=0",
    ]


def test_render_dialogue_marks_turns_without_an_expert_choice(tokenizer):
    text = render_dialogue(build(tokenizer), 1, tokenizer=tokenizer, chat_format=ChatFormat.from_tokenizer(tokenizer), layout=LAYOUT, strategies=STRATEGIES)
    lines = text.splitlines()
    assert sum(line.startswith("  customer: ") for line in lines) == 3
    assert "  agent [close -> close] goodbye   (g=0.25 c=1.00 rel=0 q=0.50)" in lines
    assert "  agent [- -> recommend] try these shoes   (g=0.00 c=1.00 rel=1 q=0.50)" in lines
    assert lines[-1] == "  outcome=0 satisfaction=0.12 fcr=1"
    assert "<|" not in text and "<s:" not in text  # role and strategy tokens are not shown as text


def test_judge_samples_fields_and_history(tokenizer):
    samples = judge_samples(build(tokenizer), [1, 0], tokenizer=tokenizer, chat_format=ChatFormat.from_tokenizer(tokenizer), layout=LAYOUT, strategies=STRATEGIES,
                            descriptions=("open politely", "suggest a product"))
    assert [(s["episode"], s["turn"]) for s in samples] == [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1)]
    assert all(set(s) == {"episode", "turn", "context", "response", "strategy"} for s in samples)
    assert [s["response"] for s in samples] == ["goodbye", "try these shoes", "thanks", "hello and welcome",
                                                "i recommend the velora"]
    # A described strategy reads "name: description"; one without a description repeats its name; none is "".
    assert [s["strategy"] for s in samples] == ["close: close", "", "greet: open politely", "greet: open politely",
                                                "recommend: suggest a product"]
    assert samples[4]["context"] == ("Business context: you sell laptops\nCustomer: i need a laptop\n"
                                     "Agent: hello and welcome\nCustomer: something red")
    assert samples[2]["context"].splitlines() == [
        "Business context: a shoe shop", "Customer: hi", "Agent: goodbye", "Customer: wait", "Agent: try these shoes",
        "Customer: ok"]
    assert all("never shown" not in s["context"] + s["response"] for s in samples)
