"""TmallBrand stand-in: brand-store after-sales customer service on ABCD's guidelines, workflows and ontology.

TmallBrand itself is not public; this world rebuilds its shape from ABCD (shared/data/abcd, see its README.md):
- Scenarios: the 55 ABCD subflows of ontology.json (`intents.subflows`, grouped by the 10 flows). A customer is a
  subflow and the customer values drawn from its reset seed; customer i of its split (gopo_jax/envs/customers.py:
  a training seed is its own index, held-out VALIDATION and TEST customers are counted per split) plays subflow
  `i % 55`. Training, validation and test customers draw their values from disjoint seeds (ABCD's guidelines have
  no held-out conversations, so the three sets are disjoint by seed, not by subflow: every subflow is trained on
  and evaluated). Customer values: name, membership level, product, shipping status and reason from the
  ontology's enumerable values; account id, order id, zip code, username, e-mail, address and refund amount
  generated in ABCD's formats. The customer's issue text is the guideline subflow title
  and flow description (guidelines.json, matched to the ontology subflows by position, checked for equal counts).
- SOP: kb.json's ordered required button sequence per subflow, built at load time into ONE AUTOMATON PER SUBFLOW
  (validated by gopo_jax.dialogue.sop.sop_from_dict): opening --greet--> step 1 (allows its button and ask_info)
  --button--> step 2 ... --last button--> wrapup (close, ask_info) --close--> closed. `env.spec` is the current
  scenario's automaton (every subflow shares the same strategy list, so indices and names never change).
  Preconditions from the ontology's button slots: a button is allowed only once the customer has told the agent
  the facts it needs (BUTTON_NEEDS, each checked against ontology.json `actions`); `HostObs.allowed` = the
  automaton mask AND these preconditions.
- Strategies (26): greet, ask_info, close and the 23 ABCD buttons of kb.json, with the eight FAQ topic toggles
  (search-boots, search-shirt, search-jeans, search-jacket, search-pricing, search-membership, search-timing,
  search-policy) folded into one `search-topic` (the topic is content the reply names), which keeps the set small
  without losing an SOP distinction (each subflow uses exactly one topic toggle).
- Replies realise buttons with ABCD's action-turn texts ("Account has been pulled up for ...", "Purchase
  validation in progress ...", "Searching the FAQ pages ..."); R matches those patterns (ordered rules), then
  ask_info (a question naming customer facts), greet, close.
- Customer simulator (deterministic given the seed): states its issue, answers ask_info with the facts asked for
  (those it has), acknowledges each completed action, rejects out-of-order or unfounded actions.
- τ-bench retail (shared/data/tau_bench_retail) is not used: its policy needs its own tool API and database
  state, which this world does not model.

Per-turn signals and outcome (ABCD has no engagement labels; the numbers are set, not fitted):
- g_t = 1/n for each required action completed in order (n = length of the subflow's kb.json sequence).
- c_t: 0.98 after a completed action, 0.95 after a turn where the customer told new facts, 0.85 after an idle
  valid turn, 0.6 after an SOP violation or unrecognised reply; the customer leaves after `patience` (3–5, from
  the seed) consecutive turns without progress or new facts.
- rel_t (R = 2): 0 for a realised SOP violation, 2 for the reference strategy, 1 for another allowed one.
- q_t: 0.
- outcome o = the whole required sequence completed in order; fcr = o and the subflow does not hand the case to
  another team (`notify-team` in its sequence); sat = completed fraction × Π c_t.
- T_max = 16 agent turns (the longest reference episode needs 12).

Logged demonstrations (`logged_demonstrations`: the SFT warm start from real agents; `logged_report` gives the
numbers below). ABCD's full corpus (abcd_v1.1.json.gz, 8,034 training conversations) is not in the shared folder:
its training split is used when it is placed there, otherwise the 3 logged training conversations of
abcd_sample.json (release format: `original` [speaker, text] messages, `delexed` targets naming the button of every
action message). One agent turn is an agent's run of consecutive messages (joined) or one action message; its
customer text is what the customer wrote since the previous turn.
- strategy: an action message's annotated button (search-<topic> -> search-topic); the conversation's first turn
  -> greet (ABCD agents open with one) and its last -> close (their sign-off); an agent turn the customer answers by
  stating one of its scenario facts (SCENARIO_FACTS: name, account id, username, e-mail, phone, membership level,
  order id, zip code, address) -> ask_info. ABCD annotates no act on agent utterances, so the other turns (answers,
  apologies, small talk: the world has no strategy for them) take R's reading, and are left out if R recognises
  nothing (their customer text goes to the next kept turn).
- stage: the automaton of the conversation's subflow (its ABCD intent label) replayed on the demonstrated
  strategies; stage indices are per subflow, as in the world.
- context: the business context `reset` shows (no customer facts told yet).
Numbers (abcd_sample.json, `logged_report()`): 33 turns in 3 conversations; 21 labelled by the rules above, 4 more
by R's reading, 8 left out. R agrees with 81% of the 21 (all 9 action turns, greet 3/3, close 2/3, ask_info 3/6).
80% of the 25 kept turns are SOP-valid: real agents leave out or reorder kb.json's required actions (the
return_size conversation escalates to the manager after pull-up-account and validate-purchase, where kb.json
continues with membership, enter-details and update-order) and ask "anything else?" before the end.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib
import re
import zlib
from typing import Any, Iterable

import numpy as np

from gopo_jax.dialogue.env_protocol import Demonstration, EnvSpec, EpisodeOutcome, HostObs, TurnSignals
from gopo_jax.dialogue.sop import SOP, UNRECOGNISED, SOPError, sop_from_dict
from gopo_jax.envs import customers, logged
from gopo_jax.envs.base import (DataSource, EnvDataError, HostEnv, MissingEnvData, host_turn_signals,
                                scripted_user_engagement)

MAX_TURNS = 16
MAX_RELEVANCE = 2
PATIENCE = (3, 4, 5)
FAQ_TOPICS = ("boots", "shirt", "jeans", "jacket", "pricing", "membership", "timing", "policy")

BUTTONS = ("pull-up-account", "verify-identity", "validate-purchase", "enter-details", "make-password",
           "send-link", "record-reason", "ask-the-oracle", "update-account", "offer-refund", "promo-code",
           "membership", "shipping-status", "update-order", "make-purchase", "notify-team", "subscription-status",
           "search-faq", "search-topic", "select-faq", "try-again", "log-out-in", "instructions")
STRATEGIES = ("greet", "ask_info", "close") + BUTTONS

# Customer facts a button needs before it can be clicked (each must be one of the button's slots in ontology.json).
BUTTON_NEEDS = {
    "pull-up-account": ("customer_name",),
    "verify-identity": ("customer_name", "account_id", "order_id", "zip_code"),
    "validate-purchase": ("username", "email", "order_id"),
    "record-reason": ("reason_slotval",),
    "enter-details": ("full_address",),
    "membership": ("membership_level",),
    "shipping-status": ("shipping_option",),
    "make-purchase": ("product",),
    "offer-refund": ("amount",),
}
FACT_WORDS = {
    "customer_name": "full name", "account_id": "account id", "order_id": "order id", "zip_code": "zip code",
    "username": "username", "email": "email address", "full_address": "full address",
    "membership_level": "membership level", "shipping_option": "shipping status", "product": "product",
    "amount": "amount", "reason_slotval": "reason",
}
# ABCD action-turn texts (the system messages a button click leaves in the conversation), realised by R below.
ACTION_TEXTS = {
    "pull-up-account": "Account has been pulled up for {customer_name}.",
    "verify-identity": "Identity verification in progress ...",
    "validate-purchase": "Purchase validation in progress ...",
    "enter-details": "Details of {full_address} have been entered.",
    "make-password": "A new password has been generated.",
    "send-link": "A link has been sent to the customer's email.",
    "record-reason": "The reason has been recorded: {reason_slotval}.",
    "ask-the-oracle": "Querying the system for an answer ...",
    "update-account": "The account has been updated.",
    "offer-refund": "A refund of ${amount} has been offered.",
    "promo-code": "A promo code has been created.",
    "membership": "Membership level of {membership_level} has been noted.",
    "shipping-status": "Shipping status of {shipping_option} has been noted.",
    "update-order": "The order has been updated.",
    "make-purchase": "A purchase of {product} has been made.",
    "notify-team": "The {team} has been notified.",
    "subscription-status": "Querying the system for subscription status ...",
    "search-faq": "Searching the FAQ pages ...",
    "search-topic": "System Action: search {topic}",
    "select-faq": "FAQ answer related to {topic} was selected.",
    "try-again": "Agent instructed the customer to try again.",
    "log-out-in": "Agent instructed the customer to log out and log back in.",
    "instructions": "Agent sent the customer step-by-step instructions.",
}
_ACT_RULES = tuple((b, re.compile(p)) for b, p in (
    ("pull-up-account", r"account has been pulled up"),
    ("verify-identity", r"identity verification in progress"),
    ("validate-purchase", r"purchase validation in progress"),
    ("enter-details", r"details of .* have been entered"),
    ("make-password", r"new password has been generated"),
    ("send-link", r"link has been sent"),
    ("record-reason", r"reason has been recorded"),
    ("subscription-status", r"querying the system for subscription status"),
    ("ask-the-oracle", r"querying the system for an answer"),
    ("update-account", r"account has been updated"),
    ("offer-refund", r"refund of .* has been offered"),
    ("promo-code", r"promo code has been created"),
    ("membership", r"membership level of .* has been noted"),
    ("shipping-status", r"shipping status of .* has been noted"),
    ("update-order", r"order has been updated"),
    ("make-purchase", r"purchase of .* has been made"),
    ("notify-team", r"has been notified"),
    ("search-faq", r"searching the faq pages"),
    ("search-topic", r"system action: search \w+"),
    ("select-faq", r"faq answer related to .* was selected"),
    ("try-again", r"instructed the customer to try again"),
    ("log-out-in", r"log out and log back in"),
    ("instructions", r"step-by-step instructions"),
    ("close", r"\b(anything else|have a (great|nice|good) day|goodbye)\b"),
    ("greet", r"\bhow (can|may) i (help|assist)\b"),
))
_ASK = re.compile(r"\?|\b(could you|can you|may i have|please (tell|give|provide))\b")
_TEAM = {"manager", "website team", "purchasing department"}

STRATEGY_DESCRIPTIONS = (
    "greet: greet the customer and ask how to help",
    "ask_info: ask the customer for the facts the next action needs",
    "close: wrap up and close the conversation",
) + tuple(f"{b}: click the [{b}] button (ABCD agent action)" for b in BUTTONS)


class TmallBrandError(EnvDataError):
    """Malformed ABCD data; the message names the file/record and the fix."""


SOURCE = DataSource(world="TmallBrand", folder="abcd", error=TmallBrandError,
                    files="ABCD's guidelines.json, kb.json and ontology.json")


@dataclasses.dataclass(frozen=True)
class Scenario:
    flow: str
    subflow: str
    actions: tuple  # strategy names of the required sequence (FAQ topic toggles as search-topic)
    topic: str  # FAQ topic for search-topic/select-faq ("" if none)
    issue: str  # how the customer states the problem


@dataclasses.dataclass(frozen=True)
class ABCDData:
    data_dir: pathlib.Path
    scenarios: tuple  # Scenario, in ontology order
    sops: dict  # subflow -> SOP
    values: dict  # ontology enumerable values
    texts: tuple  # guideline texts and sample utterances (tokenizer corpus)


def _strategy_of(button: str) -> tuple[str, str]:
    """kb.json button -> (strategy, FAQ topic)."""
    if button.startswith("search-") and button != "search-faq":
        return "search-topic", button[len("search-"):]
    return button, ""


def subflow_sop(subflow: str, actions: tuple, *, source: str = "kb.json") -> SOP:
    """The automaton of one subflow: opening, one stage per required action, wrapup, closed."""
    steps = [f"step{j + 1}:{a}" for j, a in enumerate(actions)]
    stages = [{"name": "opening", "allowed": ["greet"], "next": {"greet": steps[0]}}]
    for j, a in enumerate(actions):
        nxt = steps[j + 1] if j + 1 < len(actions) else "wrapup"
        stages.append({"name": steps[j], "allowed": [a, "ask_info"], "next": {a: nxt}})
    stages.append({"name": "wrapup", "allowed": ["close", "ask_info"], "next": {"close": "closed"}})
    stages.append({"name": "closed", "allowed": [], "terminal": True})
    return sop_from_dict({"name": f"tmallbrand/{subflow}", "strategies": list(STRATEGIES), "initial": "opening",
                          "stages": stages}, source=f"{source}[{subflow!r}]")


def _names(value: Any) -> bool:
    """`value` is a list of strings."""
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _ontology(onto: Any, path: pathlib.Path) -> tuple[list, dict, dict, dict]:
    """(flows, subflows by flow, slots by button, enumerable values) of ontology.json, checked for the shapes read."""
    intents = onto.get("intents") if isinstance(onto, dict) else None
    actions = onto.get("actions") if isinstance(onto, dict) else None
    values = onto.get("values") if isinstance(onto, dict) else None
    if not (isinstance(intents, dict) and _names(intents.get("flows")) and isinstance(intents.get("subflows"), dict)
            and isinstance(actions, dict) and all(isinstance(group, dict) for group in actions.values())
            and isinstance(values, dict) and isinstance(values.get("enumerable"), dict)):
        raise TmallBrandError(f"{path}: needs intents.flows (a list of names), intents.subflows, actions (groups of "
                              "button: slots) and values.enumerable (the ABCD ontology format)")
    action_slots = {b: s for group in actions.values() for b, s in group.items()}
    bad = next((b for b, slots in action_slots.items() if not _names(slots)), None)
    if bad is not None:
        raise TmallBrandError(f"{path}: action {bad!r} needs a list of slot names, got {action_slots[bad]!r:.60}")
    return intents["flows"], intents["subflows"], action_slots, values["enumerable"]


def _check_guideline(flow: dict, where: str) -> None:
    """The guideline texts read for the tokenizer corpus: each subflow an object whose 'actions' are objects with
    'text' and a 'subtext' list, and whose 'instructions' are a list."""
    for title, sub in flow["subflows"].items():
        if not isinstance(sub, dict) or not isinstance(sub.get("actions", []), list) or not isinstance(
                sub.get("instructions", []), list) or not all(
                isinstance(a, dict) and isinstance(a.get("subtext", []), list) for a in sub.get("actions", [])):
            raise TmallBrandError(f"{where}, subflow {title!r}: expected an object with an 'actions' list of "
                                  "{text, subtext: [...]} objects and an 'instructions' list")


def load_data(data_dir: str | pathlib.Path | None = None) -> ABCDData:
    """Reads and cross-checks kb.json, ontology.json and guidelines.json; one TmallBrandError per problem."""
    data_dir = SOURCE.resolve(data_dir)
    kb_path, onto_path, guide_path = data_dir / "kb.json", data_dir / "ontology.json", data_dir / "guidelines.json"
    kb, onto, guide = (SOURCE.read_json(p) for p in (kb_path, onto_path, guide_path))
    flows, subflows, action_slots, values = _ontology(onto, onto_path)
    for b, needs in BUTTON_NEEDS.items():
        unknown = [n for n in needs if n not in action_slots.get(b, ())]
        if unknown:
            raise TmallBrandError(f"{onto_path}: action {b!r} has no slot(s) {unknown}; the ontology does not match "
                                  "this world's button preconditions (BUTTON_NEEDS)")
    for key in ("customer_name", "membership_level", "product", "shipping_option", "reason_slotval",
                "company_team"):
        if not isinstance(values.get(key), list) or not values[key]:
            raise TmallBrandError(f"{onto_path}: values.enumerable[{key!r}] must be a non-empty list")
    if not isinstance(kb, dict) or not kb:
        raise TmallBrandError(f"{kb_path}: expected an object {{subflow: [button, ...]}}")
    bad = next((sub for sub, buttons in kb.items() if not _names(buttons)), None)
    if bad is not None:
        raise TmallBrandError(f"{kb_path}: subflow {bad!r} needs a list of button names, got {kb[bad]!r:.60}")
    if not isinstance(guide, dict):
        raise TmallBrandError(f"{guide_path}: expected an object {{flow title: {{description, subflows}}}}")
    guide_by_flow = {t.lower().replace("-", "_").replace(" ", "_"): v for t, v in guide.items()}
    scenarios, sops, texts = [], {}, []
    for flow in flows:
        if not _names(subflows.get(flow)):
            raise TmallBrandError(f"{onto_path}: flow {flow!r} has no subflow list in intents.subflows")
        g = guide_by_flow.get(flow)
        if not isinstance(g, dict) or not isinstance(g.get("subflows"), dict):
            raise TmallBrandError(f"{guide_path}: no guideline flow for {flow!r} (titles are matched by lower-case "
                                  "words, e.g. 'Product Defect' for product_defect)")
        _check_guideline(g, f"{guide_path}: flow {flow!r}")
        titles = list(g["subflows"])
        if len(titles) != len(subflows[flow]):
            raise TmallBrandError(f"{guide_path}: flow {flow!r} lists {len(titles)} subflows but {onto_path.name} "
                                  f"lists {len(subflows[flow])}; the files are from different ABCD versions")
        for title, sub in zip(titles, subflows[flow]):
            buttons = kb.get(sub)
            if not isinstance(buttons, list) or not buttons:
                raise TmallBrandError(f"{kb_path}: subflow {sub!r} (ontology flow {flow!r}) needs a non-empty "
                                      "list of buttons")
            unknown = [b for b in buttons if b not in action_slots]
            if unknown:
                raise TmallBrandError(f"{kb_path}: subflow {sub!r} uses buttons {unknown} that ontology.json does "
                                      "not define")
            mapped = [_strategy_of(b) for b in buttons]
            actions = tuple(m[0] for m in mapped)
            bad = [a for a in actions if a not in STRATEGIES]
            if bad:
                raise TmallBrandError(f"{kb_path}: subflow {sub!r}: buttons {bad} have no strategy in this world")
            topic = next((m[1] for m in mapped if m[1]), "")
            issue = f"I need help with {title.lower()} ({g.get('description', flow.replace('_', ' '))})."
            scenarios.append(Scenario(flow, sub, actions, topic, issue))
            try:
                sops[sub] = subflow_sop(sub, actions, source=str(kb_path))
            except SOPError as e:
                raise TmallBrandError(str(e)) from None
            for a in g["subflows"][title].get("actions", []):
                texts.append(str(a.get("text", "")))
                texts.extend(str(s) for s in a.get("subtext", []))
            texts.extend(str(s) for s in g["subflows"][title].get("instructions", []))
    extra = sorted(set(kb) - {s.subflow for s in scenarios})
    if extra:
        raise TmallBrandError(f"{kb_path}: subflows {extra} are not in {onto_path.name}; the files disagree")
    sample = data_dir / "abcd_sample.json"
    if sample.exists():
        convos = SOURCE.read_json(sample)
        if not isinstance(convos, list):
            raise TmallBrandError(f"{sample}: expected a list of conversations")
        for i, c in enumerate(convos):
            try:
                texts.extend(str(t[1]) for t in c["original"])
            except (KeyError, TypeError, IndexError):
                raise TmallBrandError(f"{sample}: conversation #{i} has no 'original' [speaker, text] list") from None
    return ABCDData(data_dir, tuple(scenarios), sops, values, tuple(t for t in texts if t))


# ----------------------------------------------------------------------------------- logged demonstrations

FULL_CORPUS, SAMPLE = "abcd_v1.1.json.gz", "abcd_sample.json"
LOGGED_SPLIT = "train"  # of the full corpus; the sample's conversations are training conversations too
# ABCD scenario facts (scenario.personal / scenario.order keys): a customer who states one answers an agent's ask_info.
SCENARIO_FACTS = ("customer_name", "account_id", "username", "email", "phone", "member_level", "order_id",
                  "zip_code", "street_address", "full_address")
_SPEAKERS = ("agent", "customer", "action")


@dataclasses.dataclass(frozen=True)
class LoggedConversation:
    convo_id: str
    subflow: str  # ABCD's intent label: the kb.json subflow whose SOP the conversation replays
    turns: tuple  # logged.LoggedTurn


def business_context(told: dict) -> str:
    """What the agents are told: the service, and the customer facts told so far (`reset`: none)."""
    facts = ", ".join(f"{f}={v}" for f, v in sorted(told.items())) or "nothing yet"
    return ("Brand store after-sales service (ABCD guidelines): follow the required actions of the customer's "
            f"issue in order. Customer facts known: {facts}.")


def _messages(record: Any, where: str) -> list[tuple[str, str, Any]]:
    """(speaker, text, annotated button) per message: `original` for the text, `delexed` targets for the button."""
    if not isinstance(record, dict) or not isinstance(record.get("original"), list) or not isinstance(
            record.get("delexed"), list):
        raise TmallBrandError(f"{where}: expected an object with 'original' [speaker, text] and 'delexed' turn lists "
                              "(the ABCD release format)")
    original, delexed = record["original"], record["delexed"]
    if len(original) != len(delexed):
        raise TmallBrandError(f"{where}: 'original' has {len(original)} messages but 'delexed' {len(delexed)}; the "
                              "record is truncated: re-fetch the file")
    messages = []
    for i, (message, turn) in enumerate(zip(original, delexed)):
        if not (isinstance(message, list) and len(message) == 2 and message[0] in _SPEAKERS
                and isinstance(message[1], str)):
            raise TmallBrandError(f"{where}: original[{i}] = {message!r:.80} is not [speaker, text] with a speaker in "
                                  f"{_SPEAKERS}")
        targets = turn.get("targets") if isinstance(turn, dict) else None
        if not (isinstance(targets, list) and len(targets) >= 3 and isinstance(targets[0], str)):
            raise TmallBrandError(f"{where}: delexed[{i}] needs 'targets' [intent, next step, button, ...]")
        messages.append((message[0], message[1].strip(), targets[2]))
    return messages


def _agent_turns(messages: list[tuple[str, str, Any]]) -> tuple[list[tuple[str, str, Any, str]], str]:
    """([(kind, reply, button, customer text before)], customer text after the last turn). An agent's consecutive
    messages are one turn (its reply); every action message is a turn of its own."""
    turns, pending = [], []
    for speaker, text, button in messages:
        if speaker == "customer":
            pending.append(text)
        elif speaker == "agent" and turns and turns[-1][0] == "agent" and not pending:
            kind, reply, _, before = turns[-1]
            turns[-1] = (kind, f"{reply} {text}", None, before)
        else:
            turns.append((speaker, text, button, " ".join(pending)))
            pending = []
    return turns, " ".join(pending)


def _logged_conversation(record: Any, where: str, sops: dict) -> LoggedConversation:
    """One ABCD conversation as logged turns labelled by the module doc's rules."""
    messages = _messages(record, where)
    if not messages:
        raise TmallBrandError(f"{where}: the conversation has no messages; the record is truncated: re-fetch the file")
    subflow = record["delexed"][0]["targets"][0]
    if subflow not in sops:
        raise TmallBrandError(f"{where}: intent {subflow!r} is not a kb.json subflow; the conversation and kb.json "
                              "are from different ABCD versions")
    scenario = record.get("scenario") if isinstance(record.get("scenario"), dict) else {}
    known = {k: v for part in ("personal", "order") if isinstance(scenario.get(part), dict)
             for k, v in scenario[part].items()}
    facts = [str(known[k]).lower() for k in SCENARIO_FACTS if str(known.get(k, "")).strip()]
    turns, after_last = _agent_turns(messages)
    out = []
    for j, (kind, reply, button, before) in enumerate(turns):
        after = turns[j + 1][3] if j + 1 < len(turns) else after_last
        if kind == "action":
            strategy = _strategy_of(str(button))[0]
            if strategy not in STRATEGIES:
                raise TmallBrandError(f"{where}: action {reply!r:.60} is annotated with button {button!r}, which has "
                                      "no strategy in this world")
            label = strategy
        elif j == 0:
            label = "greet"
        elif j == len(turns) - 1:
            label = "close"
        elif any(f in after.lower() for f in facts):
            label = "ask_info"
        else:
            label = None
        out.append(logged.LoggedTurn(customer=before, reply=reply, label=label))
    return LoggedConversation(str(record.get("convo_id", "")), subflow, tuple(out))


def _read_full_corpus(path: pathlib.Path) -> list:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            corpus = json.load(f)
    # zlib.error: a corrupt deflate stream; ValueError beyond JSONDecodeError: bad UTF-8, integers past Python's
    # digit limit; RecursionError: nesting past the interpreter's limit.
    except (OSError, EOFError, zlib.error, ValueError, RecursionError) as e:
        raise TmallBrandError(f"{path}: not a readable gzipped JSON file ({e}); re-fetch it (the git blob id in "
                              f"{path.parent / 'README.md'} verifies a copy)") from None
    if not isinstance(corpus, dict) or not isinstance(corpus.get(LOGGED_SPLIT), list):
        raise TmallBrandError(f"{path}: expected an object {{train, dev, test}} of conversation lists")
    return corpus[LOGGED_SPLIT]


def load_logged_conversations(data_dir: str | pathlib.Path | None, sops: dict) -> tuple:
    """ABCD's logged conversations: the full corpus's training split if FULL_CORPUS is in the folder, else SAMPLE."""
    data_dir = SOURCE.resolve(data_dir)
    full, sample = data_dir / FULL_CORPUS, data_dir / SAMPLE
    if full.exists():
        path, records = full, _read_full_corpus(full)
    elif sample.exists():
        path, records = sample, SOURCE.read_json(sample)
    else:
        raise MissingEnvData(f"{sample}: not found (nor {FULL_CORPUS}). TmallBrand's logged demonstrations read "
                             f"ABCD's logged conversations: {SAMPLE} of shared/data/abcd (see its README.md), or the "
                             f"full corpus {FULL_CORPUS} placed next to it; set env.data_dir to that folder")
    if not isinstance(records, list) or not records:
        raise TmallBrandError(f"{path}: expected a non-empty list of conversations")
    return tuple(_logged_conversation(r, f"{path}: conversation #{i}", sops) for i, r in enumerate(records))


@dataclasses.dataclass
class _Episode:
    scenario: Scenario
    facts: dict  # everything the customer knows
    patience: int
    stage: int = 0
    progress: int = 0  # required actions completed
    told: set = dataclasses.field(default_factory=set)  # facts the agent has been told
    turn: int = 0
    idle: int = 0
    survival: float = 1.0
    done: bool = False
    customer: str = ""


class TmallBrandEnv(HostEnv):
    """One after-sales episode at a time; see the module docstring for the world's rules."""

    def __init__(self, data: ABCDData, *, max_turns: int = MAX_TURNS):
        self.data = data
        self.max_turns = max_turns
        self.spec = self._spec(data.scenarios[0].subflow)
        self._k = {name: i for i, name in enumerate(STRATEGIES)}
        self._ep: _Episode | None = None

    def _spec(self, subflow: str) -> EnvSpec:
        return EnvSpec(name="tmallbrand", sop=self.data.sops[subflow], max_turns=self.max_turns,
                       max_relevance=MAX_RELEVANCE, strategy_descriptions=STRATEGY_DESCRIPTIONS)

    @property
    def sop(self) -> SOP:
        return self.spec.sop

    def stage_names(self) -> tuple[str, ...]:
        """Stage indices are per subflow (one automaton each), so agents get positional stage tokens `<stage:#i>`
        covering the longest subflow."""
        return tuple(f"#{i}" for i in range(max(sop.num_stages for sop in self.data.sops.values())))

    def _facts(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        v = self.data.values
        name = str(rng.choice(v["customer_name"]))
        user = name.split()[0][0].lower() + name.split()[-1].lower() + str(rng.integers(100, 1000))
        street = f"{rng.integers(1000, 9999)} {rng.choice(['lincoln ave', 'main st', 'brushy dr', '1st ave'])}"
        zip_code = f"{rng.integers(10000, 99999)}"
        return dict(
            customer_name=name, account_id="".join(rng.choice(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), 10)),
            order_id=str(rng.integers(1_000_000_000, 9_999_999_999)), zip_code=zip_code, username=user,
            email=f"{user}@email.com", full_address=f"{street} san mateo, ca {zip_code}",
            membership_level=str(rng.choice(v["membership_level"])), product=str(rng.choice(v["product"])),
            shipping_option=str(rng.choice(v["shipping_option"])), amount=str(int(rng.integers(20, 200))),
            reason_slotval=str(rng.choice(v["reason_slotval"])), team=str(rng.choice(v["company_team"])),
        )

    def reset(self, seed: int) -> HostObs:
        _, index = customers.customer(seed)
        scenario = self.data.scenarios[index % len(self.data.scenarios)]
        self.spec = self._spec(scenario.subflow)
        self._ep = _Episode(scenario=scenario, facts=self._facts(seed), stage=self.spec.sop.initial,
                            patience=PATIENCE[(index // len(self.data.scenarios)) % len(PATIENCE)])
        self._ep.customer = "Hi! " + scenario.issue
        return self._obs()

    def _next_action(self) -> str | None:
        ep = self._ep
        return ep.scenario.actions[ep.progress] if ep.progress < len(ep.scenario.actions) else None

    def _missing_facts(self, action: str | None) -> list[str]:
        return [f for f in BUTTON_NEEDS.get(action or "", ()) if f not in self._ep.told]

    def _allowed(self) -> np.ndarray:
        allowed = self.spec.sop.allowed[self._ep.stage].copy()
        for b, k in self._k.items():
            if b in BUTTON_NEEDS and self._missing_facts(b):
                allowed[k] = False
        return allowed

    def _context(self) -> str:
        ep = self._ep
        return business_context({f: ep.facts[f] for f in ep.told})

    def _obs(self) -> HostObs:
        ep = self._ep
        return HostObs(context=self._context(), customer=ep.customer, stage=int(ep.stage), allowed=self._allowed(),
                       done=ep.done)

    # ------------------------------------------------------------------------------------------ realisation

    def realise(self, reply: str) -> int:
        text = reply.lower()
        for act, pattern in _ACT_RULES:
            if pattern.search(text):
                return self._k[act]
        if _ASK.search(text):
            return self._k["ask_info"]
        return UNRECOGNISED

    @staticmethod
    def _asked_facts(text: str) -> list[str]:
        return [f for f, words in FACT_WORDS.items() if words in text]

    # ------------------------------------------------------------------------------------------------ step

    def step(self, strategy: int, reply: str) -> tuple[HostObs, TurnSignals]:
        ep = self._episode()
        if ep.done:
            raise RuntimeError("TmallBrandEnv.step: the episode is over; call reset(seed)")
        allowed = self._allowed()
        reference = self._reference_strategy()
        realised = self.realise(reply)
        valid = realised != UNRECOGNISED and bool(allowed[realised])
        gain, new_facts = 0.0, False
        n = len(ep.scenario.actions)
        if not valid:
            utterance = "Sorry, that is not what I need. " + ep.scenario.issue
        else:
            act = STRATEGIES[realised]
            ep.stage = int(self.spec.sop.transition[ep.stage, realised])
            if act == "greet":
                utterance = "Hi. " + ep.scenario.issue
                new_facts = True  # the customer has now told its issue to a listening agent
            elif act == "ask_info":
                asked = [f for f in self._asked_facts(reply.lower()) if f in ep.facts]
                new = [f for f in asked if f not in ep.told]
                ep.told.update(asked)
                new_facts = bool(new)
                utterance = (" ".join(f"My {FACT_WORDS[f]} is {ep.facts[f]}." for f in asked)
                             if asked else "What do you need from me?")
            elif act == "close":
                ep.done = True
                utterance = "Thanks, bye!"
            else:
                ep.progress += 1
                gain = 1.0 / n
                utterance = "Great, that solves it, thank you!" if ep.progress == n else "Okay, thanks."
        cont = scripted_user_engagement(valid=valid, progress=gain > 0, changed=new_facts)
        ep.survival *= cont
        ep.idle = 0 if (gain > 0 or new_facts) else ep.idle + 1
        ep.turn += 1
        if not ep.done and ep.idle >= ep.patience:
            ep.done = True
            utterance = "This is taking too long. Goodbye."
        if ep.turn >= self.max_turns or bool(self.spec.sop.terminal[ep.stage]):
            ep.done = True
        ep.customer = utterance
        signals = host_turn_signals(strategy=strategy, realised=realised, reference=reference, allowed=allowed,
                                    valid=valid, gain=gain, cont=cont, done=ep.done)
        return self._obs(), signals

    def outcome(self) -> EpisodeOutcome:
        ep = self._episode()
        n = len(ep.scenario.actions)
        o = float(ep.progress == n)
        handoff = "notify-team" in ep.scenario.actions
        return EpisodeOutcome(outcome=o, satisfaction=float(ep.progress / n * ep.survival),
                              fcr=float(o and not handoff))

    # ------------------------------------------------------------------------------------- reference policy

    def _reference_strategy(self) -> int:
        ep = self._ep
        stage = self.spec.sop.stages[ep.stage]
        if stage == "opening":
            return self._k["greet"]
        action = self._next_action()
        if action is None:
            return self._k["close"]
        return self._k["ask_info"] if self._missing_facts(action) else self._k[action]

    def reference_turn(self) -> tuple[int, str]:
        self._episode()
        k = self._reference_strategy()
        return k, self.scripted_reply(k)

    def scripted_reply(self, strategy: int) -> str:
        ep = self._episode()
        act = STRATEGIES[strategy]
        if act == "greet":
            return "Hi, thanks for contacting the brand store. How can I help you today?"
        if act == "ask_info":
            missing = self._missing_facts(self._next_action())
            if not missing:
                return "Could you tell me a bit more about the issue?"
            return "Could you please give me your " + " and ".join(FACT_WORDS[f] for f in missing) + "?"
        if act == "close":
            return "Is there anything else I can help with? Have a great day!"
        topic = ep.scenario.topic or "policy"
        return ACTION_TEXTS[act].format(topic=topic, **ep.facts)

    # -------------------------------------------------------------------------------------------- exports

    def corpus(self) -> Iterable[str]:
        """Guideline texts, the ABCD sample conversations, strategy descriptions and reference dialogues."""
        yield from self.data.texts
        yield from STRATEGY_DESCRIPTIONS
        for demo in self.demonstrations(len(self.data.scenarios), 0):
            for t in demo.turns:
                yield t.customer
                yield t.reply

    # --------------------------------------------------------------------------------- logged demonstrations

    def _logged_conversations(self) -> tuple:
        """ABCD's logged conversations (read once per folder)."""
        key = str(self.data.data_dir)
        if key not in _LOGGED_CACHE:
            _LOGGED_CACHE[key] = load_logged_conversations(self.data.data_dir, self.data.sops)
        return _LOGGED_CACHE[key]

    def replay_logged(self, conversation: LoggedConversation) -> list[logged.ReplayedTurn]:
        """The conversation's turns with their demonstrated strategy, R's reading and the stage of its subflow's
        automaton (stage indices are per subflow, like the world's)."""
        return logged.replay(conversation.turns, self.data.sops[conversation.subflow], self.realise)

    def logged_demonstrations(self, num_episodes: int, seed: int) -> list[Demonstration]:
        """SFT demonstrations from ABCD's logged conversations (module doc), in a seed-shuffled order, cycling when
        more are asked for than exist."""
        conversations = self._logged_conversations()
        return [logged.demonstration(business_context({}), self.replay_logged(conversations[i]), STRATEGIES)
                for i in logged.episode_order(len(conversations), num_episodes, seed)]

    def logged_report(self) -> dict:
        """How ABCD's logged turns fit this world (the numbers in the module doc; see logged.report)."""
        conversations = self._logged_conversations()
        replayed = [r for c in conversations for r in self.replay_logged(c)]
        return logged.report(replayed, STRATEGIES, dialogues=len(conversations))


_DATA_CACHE: dict = {}
_LOGGED_CACHE: dict = {}


def make_env(data_dir: str | pathlib.Path | None = None, split: str = "all", *,
             max_turns: int = MAX_TURNS) -> TmallBrandEnv:
    """The TmallBrand stand-in over all 55 ABCD subflows (`split` is accepted for a uniform registry call; ABCD's
    guidelines have no splits)."""
    if split != "all":
        raise TmallBrandError(f"tmallbrand: unknown split {split!r}; the ABCD guidelines have one set of 55 "
                              "scenarios, use split='all'")
    key = str(data_dir)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(data_dir)
    return TmallBrandEnv(_DATA_CACHE[key], max_turns=max_turns)
