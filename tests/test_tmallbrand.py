"""TmallBrand stand-in on ABCD: per-subflow SOPs from kb.json, preconditions, realisation, exports, bad data."""
import copy
import json
import shutil

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.envs import tmallbrand
from gopo_jax.envs.base import ENGAGEMENT, HostEnv, MissingEnvData, write_demonstrations_jsonl


@pytest.fixture(scope="module")
def env(shared_data):
    return tmallbrand.make_env(shared_data / "abcd")


def _run(env, seed, choose):
    obs = env.reset(seed)
    log = []
    while not obs.done:
        k, reply = choose(env, obs)
        obs, sig = env.step(k, reply)
        log.append((k, reply, sig))
    return log


def test_scenarios_and_sops_follow_kb(env, shared_data):
    kb = json.loads((shared_data / "abcd" / "kb.json").read_text())
    assert isinstance(env, HostEnv)
    assert len(env.data.scenarios) == 55 and len(tmallbrand.STRATEGIES) == 26
    sop = env.data.sops["refund_initiate"]
    assert sop.stages == ("opening", "step1:pull-up-account", "step2:validate-purchase", "step3:record-reason",
                          "step4:enter-details", "step5:offer-refund", "wrapup", "closed")
    for scenario in env.data.scenarios:
        buttons = [b if b == "search-faq" or not b.startswith("search-") else "search-topic"
                   for b in kb[scenario.subflow]]
        assert list(scenario.actions) == buttons
    assert env.data.scenarios[[s.subflow for s in env.data.scenarios].index("timing")].topic == "timing"


def test_reference_resolves_every_scenario_in_order(env):
    for seed in range(55):
        log = _run(env, seed, lambda e, o: e.reference_turn())
        assert all(s.sop_valid == 1 and s.aligned == 1 and s.rel == 2 for _, _, s in log)
        assert sum(s.gain for _, _, s in log) == pytest.approx(1.0)
        done = [tmallbrand.STRATEGIES[k] for k, _, s in log if s.gain > 0]
        assert done == list(env._ep.scenario.actions)
        out = env.outcome()
        assert out.outcome == 1.0
        assert out.fcr == (0.0 if "notify-team" in env._ep.scenario.actions else 1.0)


def test_scripted_reply_realises_every_strategy(env):
    for seed in (0, 20, 41):
        obs = env.reset(seed)
        while not obs.done:
            for k in range(len(tmallbrand.STRATEGIES)):
                assert env.realise(env.scripted_reply(k)) == k, (k, env.scripted_reply(k))
            obs, _ = env.step(*env.reference_turn())
    assert env.realise("The manager has been notified.") == tmallbrand.STRATEGIES.index("notify-team")
    assert env.realise("ok") == UNRECOGNISED


def test_button_needs_facts_and_order(env):
    k = tmallbrand.STRATEGIES.index
    seed = [s.subflow for s in env.data.scenarios].index("refund_initiate")
    obs = env.reset(seed)
    assert obs.allowed.tolist() == [i == k("greet") for i in range(len(tmallbrand.STRATEGIES))]
    obs, _ = env.step(k("greet"), env.scripted_reply(k("greet")))
    assert not obs.allowed[k("pull-up-account")] and obs.allowed[k("ask_info")]  # the name is not known yet
    stage = obs.stage
    obs, sig = env.step(k("pull-up-account"), "Account has been pulled up for someone.")
    assert (sig.sop_valid, sig.gain, sig.rel) == (0, 0.0, 0) and obs.stage == stage
    obs, sig = env.step(k("ask_info"), env.scripted_reply(k("ask_info")))
    assert sig.cont == ENGAGEMENT["info"] and env._ep.facts["customer_name"] in obs.customer
    assert obs.allowed[k("pull-up-account")]
    obs, sig = env.step(k("offer-refund"), env.scripted_reply(k("offer-refund")))  # out of order
    assert sig.sop_valid == 0
    obs, sig = env.step(k("pull-up-account"), env.scripted_reply(k("pull-up-account")))
    assert sig.gain == pytest.approx(1 / 5) and sig.sop_valid == 1


def test_idle_customer_leaves(env):
    k = tmallbrand.STRATEGIES.index("ask_info")
    obs = env.reset(0)
    env.step(tmallbrand.STRATEGIES.index("greet"), env.scripted_reply(0))
    turns = 0
    while not obs.done:
        obs, sig = env.step(k, "Could you tell me your favourite colour?")
        turns += 1
    assert turns == env._ep.patience and env.outcome().outcome == 0.0


def test_deepcopy_and_determinism(env):
    env.reset(9)
    twin = copy.deepcopy(env)
    assert twin.data is env.data
    twin.step(*twin.reference_turn())
    assert env._ep.turn == 0
    a = [r for _, r, _ in _run(env, 9, lambda e, o: e.reference_turn())]
    b = [r for _, r, _ in _run(twin, 9, lambda e, o: e.reference_turn())]
    assert a == b


def test_random_allowed_policy_is_sop_valid(env):
    rng = np.random.default_rng(1)

    def pick(e, obs):
        k = int(rng.choice(np.flatnonzero(obs.allowed)))
        return k, e.scripted_reply(k)

    for seed in range(10):
        assert all(s.sop_valid == 1 for _, _, s in _run(env, seed, pick))


def test_demonstrations_and_corpus(env, tmp_path):
    demos = env.demonstrations(3, seed=0)
    assert write_demonstrations_jsonl(demos, tmp_path / "d.jsonl") == 3
    assert demos[0].turns[0].strategy == "greet" and demos[0].turns[-1].strategy == "close"
    texts = list(env.corpus())
    assert any("[Pull up Account]" in t for t in texts) and all(isinstance(t, str) for t in texts)


# ------------------------------------------------------------------------------------------------- bad data


def _data_copy(shared_data, tmp_path, **overrides):
    root = tmp_path / "abcd"
    root.mkdir()
    for name in ("kb.json", "ontology.json", "guidelines.json"):
        if name in overrides:
            (root / name).write_text(overrides[name])
        else:
            shutil.copy(shared_data / "abcd" / name, root / name)
    return root


def test_missing_data_dir_says_where_the_data_comes_from(tmp_path):
    with pytest.raises(MissingEnvData, match=r"README.md.*--config.env.data_dir"):
        tmallbrand.load_data(tmp_path / "nowhere")


def test_truncated_kb(shared_data, tmp_path):
    root = _data_copy(shared_data, tmp_path, **{"kb.json": '{"recover_username": ["pull-up'})
    with pytest.raises(tmallbrand.TmallBrandError, match=r"kb.json: not valid JSON"):
        tmallbrand.load_data(root)


def test_unknown_button_names_the_subflow(shared_data, tmp_path):
    kb = json.loads((shared_data / "abcd" / "kb.json").read_text())
    kb["reset_2fa"] = ["pull-up-account", "launch-rocket"]
    root = _data_copy(shared_data, tmp_path, **{"kb.json": json.dumps(kb)})
    with pytest.raises(tmallbrand.TmallBrandError, match=r"subflow 'reset_2fa' uses buttons \['launch-rocket'\]"):
        tmallbrand.load_data(root)


def test_guidelines_disagreeing_with_ontology(shared_data, tmp_path):
    guide = json.loads((shared_data / "abcd" / "guidelines.json").read_text())
    guide["Account Access"]["subflows"].pop("Reset Two-Factor Auth")
    root = _data_copy(shared_data, tmp_path, **{"guidelines.json": json.dumps(guide)})
    with pytest.raises(tmallbrand.TmallBrandError, match=r"flow 'account_access' lists 2 subflows but ontology"):
        tmallbrand.load_data(root)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(sub=st.sampled_from(["recover_username", "boots", "manage_cancel"]),
                  buttons=st.one_of(st.none(), st.text(max_size=6), st.lists(
                      st.sampled_from(["pull-up-account", "search-boots", "verify-identity", "nonsense", ""]),
                      max_size=4)))
def test_arbitrary_kb_entries_load_or_raise_one_clear_error(shared_data, tmp_path_factory, sub, buttons):
    kb = json.loads((shared_data / "abcd" / "kb.json").read_text())
    kb[sub] = buttons
    root = _data_copy(shared_data, tmp_path_factory.mktemp("h"), **{"kb.json": json.dumps(kb)})
    try:
        data = tmallbrand.load_data(root)
    except tmallbrand.TmallBrandError as e:
        assert "kb.json" in str(e) and repr(sub) in str(e)
    else:
        assert data.sops[sub].num_stages == len(buttons) + 3
