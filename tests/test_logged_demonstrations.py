"""Logged demonstrations (SFT warm start from real logged dialogues): the shared replay (gopo_jax/envs/logged.py),
MultiWOZ's val dialogues and TmallBrand's ABCD conversations on the real data, their quality numbers, bad data."""
import copy
import gzip
import io
import json
import re
import shutil
import zipfile

import hypothesis
import hypothesis.strategies as st
import pytest

from gopo_jax.dialogue.sop import UNRECOGNISED, load_sop, sop_from_dict
from gopo_jax.envs import customers, logged, multiwoz, tmallbrand
from gopo_jax.envs.base import MissingEnvData

# ------------------------------------------------------------------------------------------- shared replay

TOY_SOP = sop_from_dict({"name": "toy", "strategies": ["hello", "ask", "bye"], "initial": "open", "stages": [
    {"name": "open", "allowed": ["hello"], "next": {"hello": "talk"}},
    {"name": "talk", "allowed": ["ask", "bye"], "next": {"bye": "done"}},
    {"name": "done", "allowed": [], "terminal": True}]})


def _toy_realise(reply: str) -> int:
    return {"hi": 0, "what?": 1, "ciao": 2}.get(reply, UNRECOGNISED)


def test_replay_advances_on_allowed_strategies_and_keeps_the_stage_on_a_violation():
    turns = [logged.LoggedTurn("c0", "hi", "hello"), logged.LoggedTurn("c1", "ciao", "hello"),  # hello in talk
             logged.LoggedTurn("c2", "what?", None), logged.LoggedTurn("c3", "ciao", "bye")]
    replayed = logged.replay(turns, TOY_SOP, _toy_realise)
    assert [r.stage for r in replayed] == [0, 1, 1, 1]
    assert [r.sop_valid for r in replayed] == [True, False, True, True]
    assert [r.strategy for r in replayed] == [0, 0, 1, 2]  # the label wins over R; R labels the unlabelled
    assert [r.realised for r in replayed] == [0, 2, 1, 2]


def test_demonstration_leaves_out_unrecognised_turns_but_not_their_customer_text():
    turns = [logged.LoggedTurn("c0", "hi", None), logged.LoggedTurn("c1", "mumble", None),
             logged.LoggedTurn("c2", "what?", "ask")]
    demo = logged.demonstration("ctx", logged.replay(turns, TOY_SOP, _toy_realise), TOY_SOP.strategies)
    assert demo.context == "ctx"
    assert [(t.customer, t.strategy, t.reply, t.stage) for t in demo.turns] == [
        ("c0", "hello", "hi", 0), ("c1 c2", "ask", "what?", 1)]


def test_report_counts_agreement_on_annotated_turns_only():
    turns = [logged.LoggedTurn("", "hi", "hello"), logged.LoggedTurn("", "ciao", "ask"),
             logged.LoggedTurn("", "what?", None), logged.LoggedTurn("", "mumble", None)]
    rep = logged.report(logged.replay(turns, TOY_SOP, _toy_realise), TOY_SOP.strategies, dialogues=1)
    assert (rep["turns"], rep["annotated"], rep["labelled_by_realisation"], rep["left_out"]) == (4, 2, 1, 1)
    assert rep["realisation_agreement"] == 0.5 and rep["realisation_unrecognised"] == 0.0
    assert rep["sop_valid"] == 1.0
    assert rep["per_strategy"] == {"hello": {"turns": 1, "realisation_agreement": 1.0},
                                   "ask": {"turns": 1, "realisation_agreement": 0.0}}


def test_episode_order_is_a_seeded_shuffle_that_cycles():
    order = logged.episode_order(5, 12, seed=3)
    assert order == logged.episode_order(5, 12, seed=3)
    assert sorted(order[:5]) == list(range(5)) and order[5:10] == order[:5] and order[10:] == order[:2]
    assert order[:5] != logged.episode_order(5, 5, seed=4)
    with pytest.raises(ValueError, match="no logged dialogues"):
        logged.episode_order(0, 1, seed=0)


# ----------------------------------------------------------------------------------------------- MultiWOZ


def test_act_types_map_by_the_realisation_check_priority():
    strategies = set(load_sop(multiwoz.SOP_PATH).strategies)
    assert set(multiwoz.STRATEGY_PRIORITY) == strategies == set(multiwoz.ACT_STRATEGY.values())
    assert len(multiwoz.STRATEGY_PRIORITY) == len(strategies)
    assert multiwoz.logged_strategy(["Inform", "reqmore"]) == "reqmore"
    assert multiwoz.logged_strategy(["reqmore", "Book"]) == "book"
    assert multiwoz.logged_strategy(["Inform", "Request"]) == "request"
    assert multiwoz.logged_strategy(["OfferBooked"]) == "book" and multiwoz.logged_strategy(["welcome"]) == "greet"
    assert multiwoz.logged_strategy([]) is None


def test_delexicalise_speaks_the_worlds_placeholders():
    text = "TR1234 leaves at 10:15 , takes 79 minutes and costs 10.10 pounds . Ref is ABC ."
    spans = [["Train-Inform", "Id", "TR1234", 0, 0], ["Train-Inform", "Leave", "10:15", 3, 3],
             ["Train-Inform", "Time", "79 minutes", 6, 7], ["Train-Inform", "Ticket", "10.10 pounds", 10, 11],
             ["Train-Inform", "Ticket", "10.10", 10, 10],  # overlaps the span before: stays as it is
             ["Booking-Book", "Ref", "ABC", 16, 15]]  # an empty word range (an annotation slip): stays lexical
    out = multiwoz.detokenise(multiwoz.delexicalise(text, spans, "here"))
    assert out == ("[value_id] leaves at [value_leave], takes [value_duration] and costs [value_price]. "
                   "Ref is ABC.")
    assert multiwoz.detokenise("I do n't know , sorry .") == "I don't know, sorry."
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"here: span slot 'Colour' has no placeholder"):
        multiwoz.delexicalise("a red one", [["Hotel-Inform", "Colour", "red", 1, 1]], "here")


@pytest.fixture(scope="module")
def mwz(shared_data):
    return multiwoz.make_env(shared_data / "multiwoz")


def _training_contexts(mwz) -> dict:
    """Val goal index -> the context `reset` shows the training customer who plays it."""
    world, goals = copy.deepcopy(mwz), mwz.customer_goals(customers.TRAIN)[1]
    return {goal: world.reset(index).context for index, goal in enumerate(goals)}


def test_multiwoz_report_on_the_val_dialogues(mwz):
    rep = mwz.logged_report()
    print(json.dumps(rep, indent=1))  # the numbers quoted in the module doc (pytest -s shows them)
    assert (rep["dialogues"], rep["turns"], rep["annotated"]) == (999, 7365, 7286)
    assert (rep["labelled_by_realisation"], rep["left_out"]) == (39, 40)
    assert rep["realisation_agreement"] == pytest.approx(0.638, abs=0.005)
    assert rep["sop_valid"] == pytest.approx(0.880, abs=0.005)
    assert rep["per_strategy"]["book"]["realisation_agreement"] > 0.9
    assert sum(v["turns"] for v in rep["per_strategy"].values()) == rep["annotated"]


def test_multiwoz_demonstrations_are_val_dialogues_in_the_worlds_language(mwz):
    demos = mwz.logged_demonstrations(40, seed=7)
    assert [d.to_json() for d in demos] == [d.to_json() for d in mwz.logged_demonstrations(40, seed=7)]
    assert [d.to_json() for d in demos] != [d.to_json() for d in mwz.logged_demonstrations(40, seed=8)]
    dialogues, contexts = mwz._logged_dialogues(), set(_training_contexts(mwz).values())
    test_ids = {g.dialogue_id for g in mwz.data.goals}
    assert not test_ids & {d.dialogue_id for d in dialogues}
    sop = mwz.spec.sop
    for demo in demos:
        assert demo.context in contexts and demo.context.startswith("Cambridge TownInfo centre")
        for t in demo.turns:
            assert t.strategy in sop.strategies and 0 <= t.stage < sop.num_stages and t.reply
            assert not re.search(r" [.,?!]( |$)", t.reply), t.reply  # ConvLab's tokenised spacing is undone
    replies = " ".join(t.reply for d in demos for t in d.turns)
    assert {"[value_name]", "[value_count]", "[value_area]"} <= set(re.findall(r"\[value_\w+\]", replies))
    assert demos[0].turns[0].stage == sop.initial


def test_multiwoz_demonstration_replays_its_dialogue(mwz):
    d = mwz._logged_dialogues()[0]  # val goal 0: a training customer's
    context = _training_contexts(mwz)[d.goal]
    demo = logged.demonstration(context, mwz.replay_logged(d), mwz.spec.strategies)
    assert [t.reply for t in demo.turns] == [t.reply for t in d.turns if t.label is not None
                                             or mwz.realise(t.reply) != UNRECOGNISED]
    assert demo.turns[0].customer == d.turns[0].customer


def test_multiwoz_demonstrations_cycle_past_the_training_customers_dialogues(mwz):
    demos = mwz.logged_demonstrations(501, seed=0)  # the 500 val dialogues of training customers' goals
    assert len(demos) == 501 and demos[500].to_json() == demos[0].to_json()
    assert len({json.dumps(d.to_json()) for d in demos[:500]}) > 495  # a few val dialogues are near-duplicates


def _val_folder(tmp_path, dialogues: dict):
    root = tmp_path / "multiwoz"
    (root / "mwz21_convlab3").mkdir(parents=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("val.json", json.dumps(dialogues))
    (root / "mwz21_convlab3" / "val.json.zip").write_bytes(buf.getvalue())
    return root


def _dialogue(system_act: dict, spans: list | None = None) -> dict:
    return {"goal": {}, "log": [{"text": "I need a hotel .", "dialog_act": {}},
                                {"text": "There are 3 hotels .", "dialog_act": system_act,
                                 "span_info": spans if spans is not None else []}]}


def test_multiwoz_logged_loader_reads_a_minimal_val_file(tmp_path):
    root = _val_folder(tmp_path, {"PMUL1.json": _dialogue({"Hotel-Inform": [["Choice", "3"]]},
                                                         [["Hotel-Inform", "Choice", "3", 2, 2]])})
    (d,) = multiwoz.load_logged_dialogues(root)
    assert d.dialogue_id == "pmul1" and d.goal == 0
    assert d.turns == (logged.LoggedTurn("I need a hotel.", "There are [value_count] hotels.", "inform"),)


@pytest.mark.parametrize("record, message", [
    (_dialogue({"Hotel-Gossip": [["none", "none"]]}), r"act 'Hotel-Gossip' has a type .*ACT_STRATEGY"),
    (_dialogue(["Hotel-Inform"]), r"'dialog_act' must be an object"),
    (_dialogue({"Hotel-Inform": []}, [["Hotel-Inform", "Choice", "3", "two", 2]]), r"is not \[act, slot, value"),
    ({"goal": {}, "log": [{"text": "hello"}]}, r"'log' must alternate user/system turns"),
    ([1, 2], r"expected an object with a 'goal' object and a 'log' list"),
])
def test_multiwoz_malformed_val_dialogues_name_the_file_and_dialogue(tmp_path, record, message):
    root = _val_folder(tmp_path, {"PMUL1.json": record})
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"val.json.zip: dialogue 'PMUL1.json'.*" + message):
        multiwoz.load_logged_dialogues(root)


def test_multiwoz_missing_val_file_says_where_the_data_comes_from(tmp_path):
    (tmp_path / "multiwoz").mkdir()
    with pytest.raises(MissingEnvData, match=r"val.json.zip: not found.*README.md.*--config.env.data_dir"):
        multiwoz.load_logged_dialogues(tmp_path / "multiwoz")


# --------------------------------------------------------------------------------------------- TmallBrand


@pytest.fixture(scope="module")
def tmall(shared_data):
    return tmallbrand.make_env(shared_data / "abcd")


def test_tmallbrand_report_on_the_abcd_sample(tmall):
    rep = tmall.logged_report()
    print(json.dumps(rep, indent=1))  # the numbers quoted in the module doc (pytest -s shows them)
    assert (rep["dialogues"], rep["turns"], rep["annotated"]) == (3, 33, 21)
    assert (rep["labelled_by_realisation"], rep["left_out"]) == (4, 8)
    assert rep["realisation_agreement"] == pytest.approx(17 / 21)
    assert rep["sop_valid"] == pytest.approx(20 / 25)
    buttons = [k for k in rep["per_strategy"] if k in tmallbrand.BUTTONS]
    assert len(buttons) == 7 and all(rep["per_strategy"][b]["realisation_agreement"] == 1.0 for b in buttons)


def test_tmallbrand_demonstrations_follow_the_logged_conversations(tmall):
    demos = tmall.logged_demonstrations(5, seed=1)
    assert [d.to_json() for d in demos] == [d.to_json() for d in tmall.logged_demonstrations(5, seed=1)]
    assert demos[3].to_json() == demos[0].to_json() and demos[4].to_json() == demos[1].to_json()  # 3 cycle
    assert all(d.context == tmall.reset(0).context for d in demos)
    conversations = {c.convo_id: c for c in tmall._logged_conversations()}
    assert set(conversations) == {"3592", "9489", "3695"}
    for demo in demos:
        assert demo.turns[0].strategy == "greet" and demo.turns[-1].strategy == "close"
    c = conversations["3592"]
    demo = logged.demonstration("", tmall.replay_logged(c), tmallbrand.STRATEGIES)
    assert [t.strategy for t in demo.turns][:6] == ["greet", "ask_info", "ask_info", "pull-up-account", "ask_info",
                                                    "validate-purchase"]
    assert demo.turns[0].reply == "Hi! How can I help you?"  # an agent's consecutive messages are one turn
    assert demo.turns[5].customer == "Username: cminh730 cminh730@email.com Order ID: 3348917502"
    sop = tmall.data.sops[c.subflow]
    assert [t.stage for t in demo.turns][:6] == [0, 1, 1, 1, 2, 2] and sop.stages[2] == "step2:validate-purchase"


def _abcd_folder(shared_data, tmp_path, *, sample=None, full=None):
    root = tmp_path / "abcd"
    root.mkdir()
    for name in ("kb.json", "ontology.json", "guidelines.json"):
        shutil.copy(shared_data / "abcd" / name, root / name)
    if sample is not None:
        (root / tmallbrand.SAMPLE).write_text(json.dumps(sample))
    if full is not None:
        (root / tmallbrand.FULL_CORPUS).write_bytes(full)
    return root


@pytest.fixture(scope="module")
def abcd_sample(shared_data):
    return json.loads((shared_data / "abcd" / "abcd_sample.json").read_text())


def test_tmallbrand_uses_the_full_corpus_training_split_when_present(shared_data, tmp_path, tmall, abcd_sample):
    corpus = {"train": abcd_sample[1:], "dev": abcd_sample[:1], "test": []}
    root = _abcd_folder(shared_data, tmp_path, sample=abcd_sample[:1],
                        full=gzip.compress(json.dumps(corpus).encode()))
    convs = tmallbrand.load_logged_conversations(root, tmall.data.sops)
    assert [c.convo_id for c in convs] == ["9489", "3695"]


def test_tmallbrand_without_logged_conversations_says_where_they_come_from(shared_data, tmp_path, tmall):
    root = _abcd_folder(shared_data, tmp_path)
    with pytest.raises(MissingEnvData, match=r"abcd_sample.json: not found \(nor abcd_v1.1.json.gz\).*README"):
        tmallbrand.load_logged_conversations(root, tmall.data.sops)


def test_tmallbrand_corrupt_full_corpus(shared_data, tmp_path, tmall):
    root = _abcd_folder(shared_data, tmp_path, full=b"not gzip")
    with pytest.raises(tmallbrand.TmallBrandError, match=r"abcd_v1.1.json.gz: not a readable gzipped JSON"):
        tmallbrand.load_logged_conversations(root, tmall.data.sops)


def _mutated(conversation, **changes):
    record = json.loads(json.dumps(conversation))
    record.update(changes)
    return record


@pytest.mark.parametrize("change, message", [
    (lambda c: _mutated(c, delexed=c["delexed"][:-1]), r"'original' has 29 messages but 'delexed' 28"),
    (lambda c: _mutated(c, original=[["wizard", "hi"]] + c["original"][1:]), r"original\[0\] .* is not \[speaker"),
    (lambda c: _mutated(c, delexed=[{**t, "targets": ["bogus_flow", None, None, [], 0]} for t in c["delexed"]]),
     r"intent 'bogus_flow' is not a kb.json subflow"),
    (lambda c: _mutated(c, delexed=[{**t, "targets": [t["targets"][0], "take_action", "fly", [], 0]}
                                    for t in c["delexed"]]), r"action .* is annotated with button 'fly', which has no"),
    (lambda c: _mutated(c, original=[], delexed=[]), r"the conversation has no messages"),
    (lambda c: "not a conversation", r"expected an object with 'original'"),
])
def test_tmallbrand_malformed_conversations_name_the_file_and_record(shared_data, tmp_path, tmall, abcd_sample,
                                                                    change, message):
    root = _abcd_folder(shared_data, tmp_path, sample=[abcd_sample[1], change(abcd_sample[0])])
    with pytest.raises(tmallbrand.TmallBrandError, match=r"abcd_sample.json: conversation #1: " + message):
        tmallbrand.load_logged_conversations(root, tmall.data.sops)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(messages=st.lists(st.tuples(st.sampled_from(["agent", "customer", "action", "bot"]),
                                              st.text(max_size=12),
                                              st.sampled_from([None, "pull-up-account", "search-boots", "fly"])),
                                    max_size=8))
def test_arbitrary_conversations_load_or_raise_one_clear_error(tmall, abcd_sample, messages):
    record = {"convo_id": "x", "scenario": abcd_sample[0]["scenario"],
              "original": [[s, t] for s, t, _ in messages],
              "delexed": [{"speaker": s, "targets": ["return_size", None, b, [], -1]} for s, _, b in messages]}
    try:
        conv = tmallbrand._logged_conversation(record, "here", tmall.data.sops)
    except tmallbrand.TmallBrandError as e:
        assert str(e).startswith("here: ")
    else:
        replayed = tmall.replay_logged(conv)
        assert len(replayed) <= len(messages)
        assert all(0 <= r.stage < tmall.data.sops["return_size"].num_stages for r in replayed)
