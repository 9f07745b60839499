"""MultiWOZ host environment: real goals, SOP + schema/DB preconditions, realisation check, exports, bad data."""
import copy
import json
import shutil
import zipfile

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.envs import customers, multiwoz
from gopo_jax.envs.base import ENGAGEMENT, HostEnv, MissingEnvData, write_demonstrations_jsonl


@pytest.fixture(scope="module")
def env(shared_data):
    return multiwoz.make_env(shared_data / "multiwoz")


def _test_customer(i: int) -> int:
    """The reset seed of test goal i (held-out TEST customer i)."""
    return int(customers.held_out_seeds("test", i, 1)[0])


def _run(env, seed, choose):
    obs = env.reset(seed)
    log = []
    while not obs.done:
        k, reply = choose(env, obs)
        obs, sig = env.step(k, reply)
        log.append((k, reply, sig, obs.customer))
    return log


def test_loads_the_1000_test_goals_and_conforms(env):
    assert env.num_goals == 1000
    assert isinstance(env, HostEnv)
    assert env.spec.strategies[:3] == ("greet", "request", "inform")
    assert env.spec.max_relevance == 2


def test_reference_completes_goals_with_full_inform_success(env):
    for seed in range(0, 1000, 50):
        log = _run(env, seed, lambda e, o: e.reference_turn())
        gains = [s.gain for _, _, s, _ in log]
        assert all(type(s.gain) is float and type(s.rel) is int and type(s.done) is bool for _, _, s, _ in log)
        assert all(s.realised == k and s.aligned == 1 and s.sop_valid == 1 and s.rel == 2 for k, _, s, _ in log)
        assert sum(gains) == pytest.approx(1.0)
        out = env.outcome()
        assert (out.outcome, out.fcr) == (1.0, 1.0) and 0 < out.satisfaction <= 1
        assert env.inform_success() == dict(inform=True, success=True)
        assert log[-1][0] == env.spec.sop.strategy_index("bye")


def test_scripted_reply_realises_every_strategy_in_every_state(env):
    for seed in (3, 101, 517):
        obs = env.reset(seed)
        while not obs.done:
            for k in range(env.spec.num_strategies):
                assert env.realise(env.scripted_reply(k)) == k, (seed, k, env.scripted_reply(k))
            obs, _ = env.step(*env.reference_turn())


def test_realisation_check_on_free_text(env):
    env.reset(0)
    k = env.spec.sop.strategy_index
    assert env.realise("I would recommend [value_name] in the [value_area].") == k("recommend")
    assert env.realise("Booking was successful, your reference is [value_reference].") == k("book")
    assert env.realise("Which part of town do you prefer?") == k("request")
    assert env.realise("Its phone number is [value_phone].") == k("inform")
    assert env.realise("lorem ipsum") == UNRECOGNISED


def test_sop_and_preconditions(env):
    obs = env.reset(_test_customer(0))  # mul0003: a guesthouse, then a restaurant, both booked
    k = env.spec.sop.strategy_index
    assert obs.stage == env.spec.sop.stage_index("opening")
    for name in ("book", "no_book", "offer_book", "bye", "reqmore", "no_offer"):
        assert not obs.allowed[k(name)], name  # nothing on offer, no booking details, not wrapping up
    assert obs.allowed[k("recommend")] and obs.allowed[k("request")]
    stage = obs.stage
    obs, sig = env.step(k("book"), env.scripted_reply(k("book")))
    assert (sig.sop_valid, sig.rel, sig.gain, sig.aligned) == (0, 0, 0.0, 1)
    assert sig.cont == ENGAGEMENT["violation"] and obs.stage == stage
    obs, sig = env.step(k("request"), "lorem ipsum")
    assert sig.realised == UNRECOGNISED and sig.sop_valid == 0 and sig.aligned == 0


def test_offer_before_all_constraints_is_rejected_then_accepted(env):
    env.reset(_test_customer(0))
    k = env.spec.sop.strategy_index
    obs, sig = env.step(k("recommend"), env.scripted_reply(k("recommend")))
    assert sig.sop_valid == 1 and sig.gain == 0.0 and "It needs to be" in obs.customer  # told the rest
    assert sig.cont == ENGAGEMENT["info"] and sig.rel == 1
    obs, sig = env.step(k("recommend"), env.scripted_reply(k("recommend")))
    assert sig.gain > 0 and obs.customer.startswith("That sounds good")


def test_fail_info_branch_needs_no_offer(env):
    seed = _test_customer(next(i for i, g in enumerate(env.data.goals) if g.domains[0].fail_info))
    log = _run(env, seed, lambda e, o: e.reference_turn())
    names = [env.spec.strategies[k] for k, _, _, _ in log]
    assert "no_offer" in names and env.outcome().outcome == 1.0


def test_deepcopy_shares_data_and_isolates_the_episode(env):
    obs = env.reset(7)
    twin = copy.deepcopy(env)
    assert twin.data is env.data
    twin.step(*twin.reference_turn())
    assert env._ep.turn == 0 and env._obs().customer == obs.customer
    a = [r for _, r, _, _ in _run(env, 7, lambda e, o: e.reference_turn())]
    b = [r for _, r, _, _ in _run(twin, 7, lambda e, o: e.reference_turn())]
    assert a == b


def test_random_allowed_policy_is_always_sop_valid(env):
    rng = np.random.default_rng(0)

    def pick(e, obs):
        k = int(rng.choice(np.flatnonzero(obs.allowed)))
        return k, e.scripted_reply(k)

    for seed in range(5):
        log = _run(env, seed, pick)
        assert all(s.sop_valid == 1 for _, _, s, _ in log)
        assert len(log) <= env.spec.max_turns


def test_evaluator_export_format(env):
    _run(env, _test_customer(12), lambda e, o: e.reference_turn())
    dialogue_id, turns = env.evaluator_turns()
    assert dialogue_id == env.data.goals[12].dialogue_id
    assert all(set(t) == {"response", "state", "active_domains"} for t in turns)
    assert any("[value_" in t["response"] for t in turns)
    json.dumps({dialogue_id: turns})


def test_demonstrations_and_corpus(env, tmp_path):
    demos = env.demonstrations(2, seed=5)
    assert len(demos) == 2 and all(d.turns for d in demos)
    assert demos[0].turns[-1].strategy == "bye"
    assert write_demonstrations_jsonl(demos, tmp_path / "d.jsonl") == 2
    first = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[0])
    assert set(first["turns"][0]) == {"customer", "strategy", "reply", "stage"}
    texts = list(env.corpus())
    assert len(texts) > 10000 and all(isinstance(t, str) for t in texts)


# ------------------------------------------------------------------------------------------------- bad data


def _data_copy(shared_data, tmp_path, dialogues=None, schema=None):
    """A data folder with real db/ and mwzeval/ (linked, not copied) and a crafted test split / schema."""
    src = shared_data / "multiwoz"
    root = tmp_path / "mwz"
    (root / "mwz21_convlab3").mkdir(parents=True)
    for name in ("db", "mwzeval"):
        (root / name).symlink_to(src / name)
    if schema is None:
        shutil.copy(src / "schema.json", root / "schema.json")
    else:
        (root / "schema.json").write_text(schema)
    if dialogues is not None:
        with zipfile.ZipFile(root / "mwz21_convlab3" / "test.json.zip", "w") as z:
            z.writestr("test.json", dialogues)
    return root


def _real_record(shared_data):
    with zipfile.ZipFile(shared_data / "multiwoz" / "mwz21_convlab3" / "test.json.zip") as z:
        data = json.loads(z.read("test.json"))
    return data["SNG0073.json"] if "SNG0073.json" in data else data["SNG0073"]


def test_missing_data_dir_says_where_the_data_comes_from(tmp_path):
    with pytest.raises(MissingEnvData, match=r"README.md.*--config.env.data_dir"):
        multiwoz.load_data(tmp_path / "nowhere")


def test_unknown_split(shared_data):
    with pytest.raises(multiwoz.MultiWOZEnvError, match="unknown MultiWOZ split 'train'"):
        multiwoz.load_data(shared_data / "multiwoz", "train")


def test_truncated_archive_is_named(shared_data, tmp_path):
    root = _data_copy(shared_data, tmp_path)
    (root / "mwz21_convlab3" / "test.json.zip").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"test.json.zip: not a readable zip"):
        multiwoz.load_data(root)


def test_malformed_dialogue_json_is_named(shared_data, tmp_path):
    root = _data_copy(shared_data, tmp_path, dialogues='{"SNG1": {"goal": ')
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"test.json.zip: the dialogue JSON inside is malformed"):
        multiwoz.load_data(root)


def test_bad_record_names_the_dialogue(shared_data, tmp_path):
    record = _real_record(shared_data)
    bad = dict(record, log=record["log"][:-1])  # odd number of turns: truncated
    root = _data_copy(shared_data, tmp_path, dialogues=json.dumps({"SNG0073": record, "SNG9999": bad}))
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"dialogue 'SNG9999'.*truncated"):
        multiwoz.load_data(root)


def test_goal_inconsistent_with_database(shared_data, tmp_path):
    record = _real_record(shared_data)
    goal = dict(record["goal"], restaurant={"info": {"food": "martian", "area": "centre"}, "reqt": [],
                                            "fail_info": {}})
    root = _data_copy(shared_data, tmp_path, dialogues=json.dumps({"SNG0073": dict(record, goal=goal)}))
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"SNG0073.*no database venue matches the restaurant goal"):
        multiwoz.load_data(root)


def test_bad_schema_is_named(shared_data, tmp_path):
    root = _data_copy(shared_data, tmp_path, dialogues="{}", schema='[{"service_name": "restaurant"}]')
    with pytest.raises(multiwoz.MultiWOZEnvError, match=r"schema.json: service #0 needs"):
        multiwoz.load_data(root)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                     max_leaves=12)


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(record=_json, goal=st.dictionaries(st.sampled_from(multiwoz.DOMAINS + ("message",)), _json,
                                                    max_size=3))
def test_arbitrary_records_raise_one_clear_error(env, record, goal):
    for candidate in (record, {"goal": goal, "log": [{"text": "hi"}, {"text": "hello"}]}):
        try:
            multiwoz._parse_goal("X1", candidate, "test.json.zip", env.data.database)
        except multiwoz.MultiWOZEnvError as e:
            assert "test.json.zip: dialogue 'X1'" in str(e)
