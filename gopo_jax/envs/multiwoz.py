"""MultiWOZ as a host environment: real test/val goals, the real databases, an agenda-based user simulator.

What comes from where (all files under the shared `multiwoz` folder, see its README.md):
- Goals: the `goal` field of the ConvLab-format test and val dialogues `mwz21_convlab3/{test,val}.json.zip`, one
  per dialogue id (sorted). Customers (gopo_jax/envs/customers.py) keep MultiWOZ's official split: TEST customers
  are the 1,000 test goals, VALIDATION customers the val goals at odd positions (sorted by id), and, as no
  training dialogues are on disk, TRAINING customers the val goals at even positions (500 of the 999). Customer
  i of a split plays its goal `i % size` (a training seed is its own index) with patience from `i // size`. Per
  domain: `info` (constraints), `reqt`
  (attributes to obtain), `book` (booking, minus the pre_invalid/invalid flags), and the goal's own failure
  branches: `fail_info` (first-tried constraints, used only when the database has no venue for them) and
  `fail_book` (first-tried booking values, which the world refuses). Domain order = order of first mention in
  the logged user turns. Taxi goals without departure/destination take them from the logged final belief state.
- Strategies (sops/multiwoz.json) = MultiWOZ system dialogue-act types: greet, request, inform, recommend, select,
  no_offer, offer_book, book, no_book, reqmore, bye (`welcome`/`OfferBooked` fold into greet/book).
- SOP = the automaton of sops/multiwoz.json (opening → serving ⇄ wrapup → closed: `bye` only after `reqmore`)
  AND the schema/database preconditions listed in its "preconditions" entry: offers only when the database has
  venues for the informed constraints, `no_offer` only when it has none, `book` only once every `book*` slot the
  schema (schema.json) lists for the service has been informed (taxi: departure, destination and leave/arrive
  time). `HostObs.allowed` and `v_t` are the automaton mask AND these preconditions, so a host-side rollout sees
  them as one hard mask; `spec.sop` holds the automaton alone. The stage advances on the realised act.
- Database: `db/*.json` through `gopo_jax.metrics.multiwoz_eval.VenueDatabase` (the scorer's own matching rules,
  so an offer the env counts as correct is one the Inform metric counts as correct); hospital/police by hand.
- Replies are delexicalised with `[value_x]` placeholders (`[value_name]`, `[value_id]`, `[value_phone]`,
  `[value_reference]`, ...). The realisation check R parses the act type with ordered phrase rules and the
  content (requested slots, placeholders) with keyword tables; the world fills an offer with the first database
  venue for the informed constraints.
- User simulator (deterministic; the seed picks the goal and the phrasing): opens with up to two constraints,
  answers requested slots (`dontcare` for slots outside its goal), rejects an offer made before it has told all
  its constraints (and tells the rest), then asks for its `reqt`, books when offered, switches to the real
  values after `no_offer`/`no_book`, and waits for `reqmore` before the next domain.

Per-turn signals and outcome (no engagement or satisfaction labels exist in MultiWOZ; these are set, not fitted):
- g_t: goal units completed this turn / all units. Units per domain: the venue accepted (every venue domain and
  hospital/police), one per `reqt` attribute given, the booking (when the goal books; taxi: always). Σ g = 1 iff
  the goal is completed.
- c_t: 0.98 after a turn with goal progress, 0.95 after one that moved the dialogue state (user informed
  something, venue offered), 0.85 after an idle valid turn, 0.6 after an SOP violation or unrecognised reply.
  The user abandons after `patience` consecutive turns without any change (patience 4–6, from the seed).
- rel_t (R = 2): 0 if the realised act violates the SOP, 2 if the chosen strategy is the reference policy's in
  this state, 1 if it is otherwise allowed, 0 if not allowed.
- q_t: 0 (no per-turn quality signal in this world).
- outcome o: every goal unit completed; fcr = o (MultiWOZ has no hand-off); sat = completed fraction × the
  engagement survival Π c_t at the end.
- T_max = 20 agent turns (the longest logged test dialogue has 18 system turns).
The reference policy is a rule-based system policy (below, `reference_turn`); Inform/Success of an episode come
from the metrics module's scorer (`inform_success`), and `evaluator_turns` exports the episode in the standard
evaluator input format `{"response", "state", "active_domains"}`.

Logged demonstrations (`logged_demonstrations`: the SFT warm start from real human system turns; `logged_report`
gives the numbers below, over all 999 val dialogues). The demonstrations are the val dialogues whose goals are
TRAINING customers (`LOGGED_SPLIT`, even positions; never a validation or test goal). Every logged system turn is
one agent turn:
- customer: the user utterance before it (a turn left out hands its user utterance on to the next kept turn).
- reply: the logged system utterance with every annotated value span (`span_info`) replaced by the world's
  `[value_x]` placeholder (`SPAN_PLACEHOLDER`: Choice -> count, Ref -> reference, Id -> id, Ticket -> price,
  Fee -> entrancefee, train Time -> duration, ...), the language the world's replies, R and the user simulator
  speak; ConvLab's tokenised spacing ("needs . Would") is undone. A span with an empty or out-of-range word range
  (2 annotation slips in val) or overlapping an earlier one stays lexical, as do values the annotation has no span
  for.
- strategy: the world's strategy for the turn's dialogue-act types (`ACT_STRATEGY`); a turn with several types
  takes the one R would realise from a reply that carries them all (`STRATEGY_PRIORITY`: R's rule order, then its
  request and inform fallbacks). A turn without a dialogue act takes R's reading, and is left out if R recognises
  nothing either.
- stage: the SOP automaton's stage before the turn when it replays the demonstration's strategies from the start
  (a strategy the stage does not allow keeps the stage, as in the world). The schema/database preconditions are not
  replayed: they depend on the simulated user's state, which a logged dialogue does not have.
- context: the business context `reset` shows the training customer of the same val goal.
Numbers (`logged_report()`): 7,365 system turns; 7,286 carry a dialogue act, 39 more take R's reading, 40 are left
out. R agrees with the annotated strategy on 63.8% of the 7,286 and recognises nothing in 11.1%; per strategy:
book 0.97, request 0.77, inform 0.68, bye 0.64, reqmore 0.60, offer_book 0.58, recommend 0.38, no_offer 0.36,
no_book 0.22, select 0.11, greet 0.00 (ConvLab's `welcome` is mostly "you're welcome", and real greetings come with
a question, which R reads as request). 88.0% of the kept turns are SOP-valid: most violations are `bye` without a
`reqmore` turn before it (real agents ask "anything else?" inside a book turn, or not at all) and `welcome` turns,
which the world reads as greetings outside the opening.
"""
from __future__ import annotations

import copy
import dataclasses
import pathlib
import re
from typing import Any, Iterable

import numpy as np

from gopo_jax.dialogue.env_protocol import Demonstration, EnvSpec, EpisodeOutcome, HostObs, TurnSignals
from gopo_jax.dialogue.sop import SOP, UNRECOGNISED, load_sop
from gopo_jax.envs import customers, logged
from gopo_jax.envs.base import DataSource, EnvDataError, HostEnv, host_turn_signals, scripted_user_engagement
from gopo_jax.metrics import multiwoz_eval

SOP_PATH = pathlib.Path(__file__).parent / "sops" / "multiwoz.json"
SPLIT_FILES = {"test": "test.json.zip", "val": "val.json.zip"}
DOMAINS = ("restaurant", "hotel", "attraction", "train", "taxi", "hospital", "police")
VENUE_DOMAINS = ("restaurant", "hotel", "attraction", "train")
BOOKABLE = ("restaurant", "hotel", "train", "taxi")
MAX_TURNS = 20
MAX_RELEVANCE = 2
PATIENCE = (4, 5, 6)

STRATEGY_DESCRIPTIONS = (
    "greet: welcome the user and ask how to help",
    "request: ask the user for constraint or booking slots",
    "inform: give venue attributes (or offer a venue by name)",
    "recommend: recommend one database venue",
    "select: ask the user to choose between two venues",
    "no_offer: say no venue matches the constraints",
    "offer_book: offer to book the venue and ask for the booking details",
    "book: make the booking and give the reference number",
    "no_book: say the requested booking is not available",
    "reqmore: ask whether the user needs anything else",
    "bye: close the dialogue",
)

# Slots the system can ask for, by the words that ask for them (first match wins per slot).
_REQUEST_WORDS = {
    "food": r"\b(food|cuisine)\b", "area": r"\b(area|part of town)\b", "pricerange": r"\bprice ?range\b",
    "type": r"\btype\b", "stars": r"\bstars?\b", "parking": r"\bparking\b", "internet": r"\b(internet|wifi)\b",
    "name": r"\bname\b", "departure": r"\b(departure|departing|depart|leaving from)\b",
    "destination": r"\b(destination|going to|heading to)\b", "day": r"\bday\b", "leaveAt": r"\bleave\b",
    "arriveBy": r"\barriv\w*\b", "department": r"\bdepartment\b", "people": r"\b(people|party)\b",
    "time": r"\bwhat time\b", "stay": r"\b(nights?|stay)\b",
}
_REQUEST_PHRASES = {
    "food": "what kind of food would you like", "area": "which area would you like",
    "pricerange": "what price range do you have in mind", "type": "what type of place are you looking for",
    "stars": "how many stars should it have", "parking": "do you need parking", "internet": "do you need internet",
    "name": "do you have a name in mind", "departure": "where will you be departing from",
    "destination": "what is your destination", "day": "what day would you like",
    "leaveAt": "when would you like to leave", "arriveBy": "when do you want to arrive",
    "department": "which department are you looking for", "people": "for how many people",
    "time": "what time would you like the booking", "stay": "how many nights will you stay",
}
# The order a rule-based desk asks in, per domain (constraints the database can filter on).
_ASK_ORDER = {
    "restaurant": ("food", "area", "pricerange"), "hotel": ("area", "pricerange", "type", "stars", "parking",
                                                            "internet"),
    "attraction": ("type", "area"), "train": ("departure", "destination", "day", "leaveAt"),
    "taxi": ("departure", "destination", "leaveAt"), "hospital": ("department",), "police": (),
}
_BOOK_WORDS = {"bookday": "day", "bookpeople": "people", "booktime": "time", "bookstay": "stay"}
# reqt attribute (ConvLab goal name) -> placeholder the reply must carry to give it.
_REQT_PLACEHOLDER = {
    "phone": "phone", "address": "address", "postcode": "postcode", "price": "price", "entrance fee": "entrancefee",
    "duration": "duration", "trainID": "id", "leaveAt": "leave", "arriveBy": "arrive", "area": "area",
    "food": "food", "pricerange": "pricerange", "type": "type", "stars": "stars", "internet": "internet",
    "parking": "parking", "car type": "car", "department": "department",
}
_PLACEHOLDER_REQT = {v: k for k, v in _REQT_PLACEHOLDER.items()}
_NOUN = {"restaurant": "a restaurant", "hotel": "a place to stay", "attraction": "an attraction",
         "train": "a train", "taxi": "a taxi", "hospital": "a hospital", "police": "the police station"}

# Realisation check: ordered (act, pattern) rules on the lower-cased reply; the first match wins.
_ACT_RULES = (
    ("no_book", r"\b(unable to book|could not book|couldn't book|booking (was )?unsuccessful|booking failed)\b"),
    ("book", r"\[value_reference\]|\bi have booked\b|\bi've booked\b|\bbooking (was|is) (successful|complete)"),
    ("no_offer", r"\b(there (is|are) no|no \w+ (match|matches|matching)|could not find|couldn't find|cannot find)\b"),
    ("offer_book", r"\b(would you like (me )?to (book|reserve)|shall i (book|reserve)|should i (book|reserve)"
                   r"|want me to (book|reserve))\b"),
    ("select", r"\b(would you prefer|do you have a preference between|which (one )?would you prefer)\b"),
    ("recommend", r"\b(i (would |'d )?(recommend|suggest)|how about|you might (like|enjoy))\b"),
    ("reqmore", r"\b(anything else|something else|any other (questions|help|requests?))\b"),
    ("bye", r"\b(goodbye|good bye|bye)\b|\bhave a (great|nice|good|wonderful) (day|time|trip|stay|evening)\b"),
    ("greet", r"\bhow (can|may) i (help|assist)\b"),
)
_PLACEHOLDER_RE = re.compile(r"\[value_(\w+)\]")


class MultiWOZEnvError(EnvDataError):
    """Malformed MultiWOZ environment data; the message names the file/record and the fix."""


SOURCE = DataSource(world="MultiWOZ", folder="multiwoz", error=MultiWOZEnvError,
                    files="mwz21_convlab3/{test,val}.json.zip, db/, schema.json and mwzeval/")


# ------------------------------------------------------------------------------------------------ data loading


@dataclasses.dataclass(frozen=True)
class DomainGoal:
    domain: str
    info: dict  # final constraints (ConvLab slot names: food, pricerange, leaveAt, ...)
    fail_info: dict  # first-tried constraints that no venue meets ({} if none)
    reqt: tuple  # attributes to obtain (ConvLab names)
    book: dict  # booking values ({} = no booking wanted)
    fail_book: dict  # first-tried booking values that the world refuses


@dataclasses.dataclass(frozen=True)
class Goal:
    dialogue_id: str  # lower-cased, as the evaluator keys it
    domains: tuple  # DomainGoal in the order the user pursues them


@dataclasses.dataclass(frozen=True)
class MultiWOZData:
    data_dir: pathlib.Path
    split: str
    goals: tuple  # Goal, sorted by dialogue id
    book_slots: dict  # domain -> required booking slots (people/day/time/stay) from schema.json
    database: Any  # multiwoz_eval.VenueDatabase
    hospital: tuple  # hospital_db rows
    police: tuple  # police_db rows
    texts: tuple  # logged utterances (for the tokenizer corpus)


def _read_dialogues(path: pathlib.Path) -> dict:
    if not path.exists():
        raise SOURCE.missing(path)
    return multiwoz_eval.read_zipped_dialogues(path, MultiWOZEnvError)


def _checked_log(record: dict, where: str) -> list:
    """The dialogue's 'log': user/system turns alternating from the user's, each with a 'text' string."""
    log = record.get("log")
    if not isinstance(log, list):
        raise MultiWOZEnvError(f"{where}: expected an object with a 'goal' object and a 'log' list")
    if not log or len(log) % 2 or not all(isinstance(t, dict) and isinstance(t.get("text"), str) for t in log):
        raise MultiWOZEnvError(f"{where}: 'log' must alternate user/system turns, each with a 'text' string "
                               f"(got {len(log)} turns); the file is truncated or not the ConvLab format")
    return log


def _str_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise MultiWOZEnvError(f"{where}: expected an object of string slot values, got {value!r:.80}")
    return dict(value)


def _object(value: Any) -> dict:
    """`value` if it is a JSON object, else {} (optional parts of a logged turn that may be missing or null)."""
    return value if isinstance(value, dict) else {}


def _domain_order(log: list, domains: list) -> list:
    seen = []
    for turn in log[0::2]:
        acts = turn.get("dialog_act")
        for act in acts if isinstance(acts, dict) else {}:
            d = act.split("-")[0].lower()
            if d in domains and d not in seen:
                seen.append(d)
    return seen + [d for d in domains if d not in seen]


def _parse_goal(dialogue_id: str, record: Any, source: str, database: Any) -> Goal:
    where = f"{source}: dialogue {dialogue_id!r}"
    if not isinstance(record, dict) or not isinstance(record.get("goal"), dict):
        raise MultiWOZEnvError(f"{where}: expected an object with a 'goal' object and a 'log' list")
    log = _checked_log(record, where)
    raw = record["goal"]
    present = []
    for d in DOMAINS:
        spec = raw.get(d)
        if spec in (None, {}):
            continue
        if not isinstance(spec, dict):
            raise MultiWOZEnvError(f"{where}: goal[{d!r}] must be an object, got {spec!r:.60}")
        present.append(d)
    if not present:
        raise MultiWOZEnvError(f"{where}: the goal names none of the domains {DOMAINS}")
    goals = []
    for d in _domain_order(log, present):
        spec = raw[d]
        info = _str_dict(spec.get("info", {}), f"{where}: goal[{d!r}]['info']")
        fail_info = _str_dict(spec.get("fail_info", {}), f"{where}: goal[{d!r}]['fail_info']")
        reqt = spec.get("reqt", [])
        if not isinstance(reqt, list) or not all(isinstance(r, str) for r in reqt):
            raise MultiWOZEnvError(f"{where}: goal[{d!r}]['reqt'] must be a list of attribute names")
        unknown = [r for r in reqt if r not in _REQT_PLACEHOLDER]
        if unknown:
            raise MultiWOZEnvError(f"{where}: goal[{d!r}]['reqt'] has unknown attributes {unknown}; known: "
                                   f"{sorted(_REQT_PLACEHOLDER)}")
        book_raw = spec.get("book", {})
        if not isinstance(book_raw, dict):
            raise MultiWOZEnvError(f"{where}: goal[{d!r}]['book'] must be an object")
        book = _str_dict({k: v for k, v in book_raw.items() if k not in ("pre_invalid", "invalid")},
                         f"{where}: goal[{d!r}]['book']")
        fail_book = _str_dict(spec.get("fail_book", {}), f"{where}: goal[{d!r}]['fail_book']")
        if d == "taxi":
            semi = _object(_object(_object(log[-1].get("metadata")).get("taxi")).get("semi"))
            for slot in ("departure", "destination"):
                value = semi.get(slot)
                if slot not in info and isinstance(value, str) and value not in ("", "not mentioned"):
                    info[slot] = value
            if not {"departure", "destination"} <= set(info):
                raise MultiWOZEnvError(f"{where}: taxi goal without departure/destination and none in the logged "
                                       "belief state; the record is incomplete")
        # fail_info is a real branch only when the database has nothing for it.
        if fail_info and (d not in VENUE_DOMAINS or _venues(database, d, {**info, **fail_info})):
            fail_info = {}
        if d in VENUE_DOMAINS and not _venues(database, d, info):
            raise MultiWOZEnvError(f"{where}: no database venue matches the {d} goal {info}; the goal and db/ "
                                   "are inconsistent (mixed MultiWOZ versions?)")
        goals.append(DomainGoal(d, info, fail_info, tuple(reqt), book, {k: v for k, v in fail_book.items()
                                                                         if k in book}))
    return Goal(dialogue_id.split(".")[0].lower(), tuple(goals))


def _venues(database: Any, domain: str, constraints: dict) -> list:
    state = multiwoz_eval.normalise_state({domain: constraints})[domain]
    return database.query(domain, state)


def _book_slots(schema: Any, path: pathlib.Path) -> dict:
    if not isinstance(schema, list):
        raise MultiWOZEnvError(f"{path}: expected a list of services")
    out = {}
    for i, service in enumerate(schema):
        if not isinstance(service, dict) or "service_name" not in service or not isinstance(service.get("slots"),
                                                                                               list):
            raise MultiWOZEnvError(f"{path}: service #{i} needs 'service_name' and a 'slots' list")
        name = service["service_name"]
        if not isinstance(name, str):
            raise MultiWOZEnvError(f"{path}: service #{i}: 'service_name' must be a string, got {name!r:.60}")
        names = [s.get("name") if isinstance(s, dict) else None for s in service["slots"]]
        if not all(isinstance(n, str) and "-" in n for n in names):
            raise MultiWOZEnvError(f"{path}: service {name!r} has a slot without a 'domain-slot' name")
        slots = [n.split("-", 1)[1] for n in names]
        out[name] = tuple(_BOOK_WORDS[s] for s in slots if s in _BOOK_WORDS)
    for d in ("restaurant", "hotel", "train"):
        if not out.get(d):
            raise MultiWOZEnvError(f"{path}: service {d!r} has no book* slots; not the MultiWOZ 2.2 schema")
    return out


def load_data(data_dir: str | pathlib.Path | None = None, split: str = "test") -> MultiWOZData:
    """Reads and validates goals, schema and databases; every problem is one MultiWOZEnvError naming the file."""
    data_dir = SOURCE.resolve(data_dir)
    if split not in SPLIT_FILES:
        raise MultiWOZEnvError(f"unknown MultiWOZ split {split!r}; use one of {sorted(SPLIT_FILES)} (the training "
                               "dialogues are not in the shared data)")
    book_slots = _book_slots(SOURCE.read_json(data_dir / "schema.json"), data_dir / "schema.json")
    for name in ("restaurant", "hotel", "train", "hospital", "police"):
        if not (data_dir / "db" / f"{name}_db.json").exists():
            raise SOURCE.missing(data_dir / "db" / f"{name}_db.json")
    try:
        database = multiwoz_eval.VenueDatabase(data_dir)
    except multiwoz_eval.MultiWOZDataError as e:
        raise MultiWOZEnvError(str(e)) from None
    hospital = SOURCE.read_json(data_dir / "db" / "hospital_db.json")
    police = SOURCE.read_json(data_dir / "db" / "police_db.json")
    for path, rows in ((data_dir / "db" / "hospital_db.json", hospital), (data_dir / "db" / "police_db.json", police)):
        if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
            raise MultiWOZEnvError(f"{path}: expected a non-empty list of venue objects")
    path = data_dir / "mwz21_convlab3" / SPLIT_FILES[split]
    raw = _read_dialogues(path)
    goals = tuple(_parse_goal(k, raw[k], str(path), database) for k in sorted(raw))
    texts = tuple(t["text"].strip() for k in sorted(raw) for t in raw[k]["log"])
    return MultiWOZData(data_dir, split, goals, book_slots, database, tuple(hospital), tuple(police), texts)


# ----------------------------------------------------------------------------------- logged demonstrations

LOGGED_SPLIT = "val"  # never the test dialogues: their goals are what the world is scored on
TEST_SPLIT = "test"
# ConvLab system dialogue-act type -> the world's strategy.
ACT_STRATEGY = {
    "welcome": "greet", "greet": "greet", "Request": "request", "Inform": "inform", "Recommend": "recommend",
    "Select": "select", "NoOffer": "no_offer", "OfferBook": "offer_book", "Book": "book", "OfferBooked": "book",
    "NoBook": "no_book", "reqmore": "reqmore", "bye": "bye",
}
# The strategy a turn with several act types demonstrates: the one R realises from a reply carrying them all.
STRATEGY_PRIORITY = tuple(act for act, _ in _ACT_RULES) + ("request", "inform")
# ConvLab span slot -> the world's placeholder (the names `_REQT_PLACEHOLDER` and the evaluator know).
SPAN_PLACEHOLDER = {
    "Name": "name", "Choice": "count", "Area": "area", "Ref": "reference", "Type": "type", "Addr": "address",
    "Phone": "phone", "Price": "pricerange", "Leave": "leave", "Id": "id", "Arrive": "arrive",
    "Post": "postcode", "Food": "food", "Ticket": "price", "Fee": "entrancefee", "Dest": "destination",
    "Depart": "departure", "Day": "day", "Stars": "stars", "Car": "car", "Time": "time", "People": "people",
    "Stay": "stay", "Open": "openhours",
}
# Where a slot means something else in one domain: a train's Time is its duration, an attraction's Price its fee.
_DOMAIN_SPAN_PLACEHOLDER = {("Train", "Time"): "duration", ("Attraction", "Price"): "entrancefee"}


@dataclasses.dataclass(frozen=True)
class LoggedDialogue:
    dialogue_id: str
    goal: int  # index of its goal in the val split's sorted goals (`MultiWOZEnv.customer_goals`)
    turns: tuple  # logged.LoggedTurn


def detokenise(text: str) -> str:
    """ConvLab text is tokenised ("needs . Would", "do n't"); the world's replies and users speak plain text."""
    text = re.sub(r"\s+([.,!?;:%)])", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _act_types(acts: Any, where: str) -> list[str]:
    if not isinstance(acts, dict):
        raise MultiWOZEnvError(f"{where}: 'dialog_act' must be an object {{'Domain-Type': [[slot, value], ...]}}")
    types = []
    for name in acts:
        act_type = name.split("-", 1)[-1]
        if act_type not in ACT_STRATEGY:
            raise MultiWOZEnvError(f"{where}: dialogue act {name!r} has a type this world has no strategy for; "
                                   f"known: {sorted(ACT_STRATEGY)} (a new type needs an entry in ACT_STRATEGY)")
        types.append(act_type)
    return types


def logged_strategy(act_types: list[str]) -> str | None:
    """The strategy a system turn with these ConvLab act types demonstrates (STRATEGY_PRIORITY), None if none."""
    strategies = {ACT_STRATEGY[t] for t in act_types}
    return next((k for k in STRATEGY_PRIORITY if k in strategies), None)


def delexicalise(text: str, spans: Any, where: str) -> str:
    """`text` with each annotated value span replaced by the world's `[value_x]` placeholder (module doc)."""
    if not isinstance(spans, list):
        raise MultiWOZEnvError(f"{where}: 'span_info' must be a list of [act, slot, value, start, end]")
    for span in spans:
        if not (isinstance(span, list) and len(span) == 5 and isinstance(span[0], str) and isinstance(span[1], str)
                and isinstance(span[3], int) and isinstance(span[4], int)):
            raise MultiWOZEnvError(f"{where}: span {span!r:.80} is not [act, slot, value, start word, end word]")
        if span[1] not in SPAN_PLACEHOLDER:
            raise MultiWOZEnvError(f"{where}: span slot {span[1]!r} has no placeholder; known: "
                                   f"{sorted(SPAN_PLACEHOLDER)} (a new slot needs an entry in SPAN_PLACEHOLDER)")
    words = text.split(" ")
    out, position = [], 0
    for act, slot, value, start, end in sorted(spans, key=lambda s: s[3]):
        if start < position or start > end or end >= len(words) or str(value).lower() == "dontcare":
            continue
        name = _DOMAIN_SPAN_PLACEHOLDER.get((act.split("-")[0], slot), SPAN_PLACEHOLDER[slot])
        out.extend(words[position:start])
        out.append(f"[value_{name}]")
        position = end + 1
    out.extend(words[position:])
    return " ".join(out)


def _logged_turns(record: Any, where: str) -> tuple:
    """The system turns of one ConvLab dialogue as logged.LoggedTurns."""
    if not isinstance(record, dict):
        raise MultiWOZEnvError(f"{where}: expected an object with a 'goal' object and a 'log' list")
    log, turns = _checked_log(record, where), []
    for i in range(1, len(log), 2):
        at = f"{where}, log[{i}]"
        label = logged_strategy(_act_types(log[i].get("dialog_act", {}), at))
        reply = detokenise(delexicalise(log[i]["text"], log[i].get("span_info", []), at))
        turns.append(logged.LoggedTurn(customer=detokenise(log[i - 1]["text"]), reply=reply, label=label))
    return tuple(turns)


def load_logged_dialogues(data_dir: str | pathlib.Path | None = None) -> tuple:
    """The LOGGED_SPLIT dialogues as LoggedDialogues, in the order of that split's goals (sorted ids)."""
    data_dir = SOURCE.resolve(data_dir)
    path = data_dir / "mwz21_convlab3" / SPLIT_FILES[LOGGED_SPLIT]
    raw = _read_dialogues(path)
    dialogues = []
    for i, key in enumerate(sorted(raw)):
        turns = _logged_turns(raw[key], f"{path}: dialogue {key!r}")
        dialogues.append(LoggedDialogue(key.split(".")[0].lower(), i, turns))
    return tuple(dialogues)


# -------------------------------------------------------------------------------------------- the environment


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _phrase(domain: str, slot: str, value: str) -> str:
    if value == "dontcare":
        return f"any {slot}"
    return {
        "food": f"that serves {value} food", "area": f"in the {value}", "pricerange": f"in the {value} price range",
        "name": f"called {value}", "type": f"of type {value}", "stars": f"with {value} stars",
        "parking": "with free parking" if value == "yes" else "without parking",
        "internet": "with free wifi" if value == "yes" else "without wifi", "departure": f"from {value}",
        "destination": f"to {value}", "day": f"on {value}", "leaveAt": f"leaving after {value}",
        "arriveBy": f"arriving by {value}", "department": f"with the {value} department",
        "people": f"for {value} people", "time": f"at {value}", "stay": f"for {value} nights",
    }.get(slot, f"with {slot} {value}")


@dataclasses.dataclass
class _Episode:
    goal: Goal
    source: MultiWOZData  # the split the goal comes from (its evaluator goals score the episode)
    seed: int
    patience: int
    d: int = 0  # index of the domain the user pursues
    stage: int = 0
    turn: int = 0
    idle: int = 0
    survival: float = 1.0
    violations: int = 0
    done: bool = False
    abandoned: bool = False
    waiting: bool = False  # current domain complete; the user waits for reqmore
    finished: bool = False  # the user said it needs nothing else
    informed: dict = dataclasses.field(default_factory=dict)  # domain -> {slot: value} told to the system
    dontcare: dict = dataclasses.field(default_factory=dict)  # domain -> slots answered "no preference"
    fail_mode: dict = dataclasses.field(default_factory=dict)  # domain -> still on fail_info
    book_fail: dict = dataclasses.field(default_factory=dict)  # domain -> still on fail_book
    offered: dict = dataclasses.field(default_factory=dict)  # domain -> venue id on offer
    accepted: dict = dataclasses.field(default_factory=dict)  # domain -> bool
    booked_info: dict = dataclasses.field(default_factory=dict)  # domain -> booking slots told
    declined: dict = dataclasses.field(default_factory=dict)  # domain -> user declined a booking offer
    units: set = dataclasses.field(default_factory=set)  # completed goal units (domain, unit)
    customer: str = ""
    records: list = dataclasses.field(default_factory=list)  # evaluator turns
    booked_turns: list = dataclasses.field(default_factory=list)  # per turn: domains booked on that turn


class MultiWOZEnv(HostEnv):
    """One MultiWOZ episode at a time; see the module docstring for the world's rules. `data` is the test split
    (the TEST customers and the databases); the val split (training and validation customers) is read on first
    use."""

    def __init__(self, data: MultiWOZData, sop: SOP, *, max_turns: int = MAX_TURNS):
        if data.split != TEST_SPLIT:
            raise MultiWOZEnvError(f"the MultiWOZ world is built on the {TEST_SPLIT!r} split (its TEST customers), "
                                   f"got {data.split!r}")
        self.data = data
        self.spec = EnvSpec(name="multiwoz", sop=sop, max_turns=max_turns, max_relevance=MAX_RELEVANCE,
                            strategy_descriptions=STRATEGY_DESCRIPTIONS)
        self._k = {name: i for i, name in enumerate(sop.strategies)}
        self._ep: _Episode | None = None

    @property
    def num_goals(self) -> int:
        """The test goals (TEST customers)."""
        return len(self.data.goals)

    def customer_goals(self, split: str) -> tuple[MultiWOZData, list[int]]:
        """(the official split's data, the indices of its goals) of the customers of `split` (module doc)."""
        if split == TEST_SPLIT:
            return self.data, list(range(len(self.data.goals)))
        val = _cached_data(self.data.data_dir, LOGGED_SPLIT)
        training, validation = customers.halves(range(len(val.goals)), key=lambda i: val.goals[i].dialogue_id)
        return val, (training if split == customers.TRAIN else validation)

    # ---------------------------------------------------------------------------------------------- episode

    def reset(self, seed: int) -> HostObs:
        split, index = customers.customer(seed)
        data, goals = self.customer_goals(split)
        goal = data.goals[goals[index % len(goals)]]
        ep = _Episode(goal=goal, source=data, seed=seed,
                      patience=PATIENCE[(index // len(goals)) % len(PATIENCE)], stage=self.spec.sop.initial)
        for g in goal.domains:
            ep.informed[g.domain], ep.dontcare[g.domain] = {}, set()
            ep.fail_mode[g.domain], ep.book_fail[g.domain] = bool(g.fail_info), bool(g.fail_book)
            ep.booked_info[g.domain] = {}
        self._ep = ep
        ep.customer = self._open_domain()
        return self._obs()

    @property
    def _goal(self) -> DomainGoal:
        ep = self._ep
        return ep.goal.domains[min(ep.d, len(ep.goal.domains) - 1)]

    def _active(self, g: DomainGoal) -> dict:
        return {**g.info, **g.fail_info} if self._ep.fail_mode[g.domain] else dict(g.info)

    def _active_book(self, g: DomainGoal) -> dict:
        return {**g.book, **g.fail_book} if self._ep.book_fail[g.domain] else dict(g.book)

    def _matches(self, g: DomainGoal) -> list:
        told = {k: v for k, v in self._ep.informed[g.domain].items()}
        if g.domain in VENUE_DOMAINS:
            return _venues(self.data.database, g.domain, told)
        if g.domain == "hospital":
            dept = told.get("department", "").lower()
            return [str(r.get("id", i)) for i, r in enumerate(self.data.hospital)
                    if not dept or str(r.get("department", "")).lower() == dept]
        if g.domain == "police":
            return [str(r.get("id", i)) for i, r in enumerate(self.data.police)]
        return []

    def _units_of(self, g: DomainGoal) -> list:
        units = [] if g.domain == "taxi" else [(g.domain, "venue")]
        units += [(g.domain, "reqt:" + r) for r in g.reqt]
        if g.book or g.domain == "taxi":
            units.append((g.domain, "book"))
        return units

    def _all_units(self) -> list:
        return [u for g in self._ep.goal.domains for u in self._units_of(g)]

    def _domain_complete(self, g: DomainGoal) -> bool:
        return all(u in self._ep.units for u in self._units_of(g))

    def _required_book_known(self, g: DomainGoal) -> bool:
        told = self._ep.booked_info[g.domain]
        if g.domain == "taxi":
            inf = self._ep.informed["taxi"]
            return {"departure", "destination"} <= set(inf) and bool({"leaveAt", "arriveBy"} & set(inf))
        needed = self.data.book_slots.get(g.domain, ())
        return bool(needed) and all(s in told for s in needed)

    # ----------------------------------------------------------------------------------------- preconditions

    def _preconditions(self) -> np.ndarray:
        """Schema/database rules per strategy in the current state (the data part of this world's SOP)."""
        ep, g = self._ep, self._goal
        n = len(self._matches(g)) if g.domain != "taxi" else 0
        told = bool(ep.informed[g.domain])
        on_offer = ep.offered.get(g.domain) is not None
        booked = (g.domain, "book") in ep.units
        bookable = g.domain in BOOKABLE and not booked and (on_offer or g.domain == "taxi")
        book_ready = bookable and self._required_book_known(g)
        book_fails = ep.book_fail[g.domain] and ep.booked_info[g.domain] == self._active_book(g)
        pre = dict(
            greet=True, request=True, reqmore=True, bye=True,
            inform=(n > 0 or on_offer) if g.domain != "taxi" else booked,
            recommend=n > 0, select=n > 1, no_offer=g.domain != "taxi" and told and n == 0,
            offer_book=bookable and g.domain != "taxi", book=book_ready and not book_fails,
            no_book=book_ready and book_fails,
        )
        return np.array([pre[k] for k in self.spec.strategies], bool)

    def _allowed(self) -> np.ndarray:
        return self.spec.sop.allowed[self._ep.stage] & self._preconditions()

    def _context(self) -> str:
        ep, g = self._ep, self._goal
        if g.domain == "taxi":
            db = "taxi: booked" if (g.domain, "book") in ep.units else "taxi: not booked"
        else:
            db = f"{g.domain}: {len(self._matches(g))} matching venues"
        return ("Cambridge TownInfo centre: help the user find and book restaurants, hotels, attractions, trains "
                "and taxis. Reply with [value_x] placeholders (e.g. [value_name], [value_phone]). "
                f"Database: {db}.")

    def _obs(self) -> HostObs:
        ep = self._ep
        return HostObs(context=self._context(), customer=ep.customer, stage=int(ep.stage), allowed=self._allowed(),
                       done=ep.done)

    # ------------------------------------------------------------------------------------- realisation check

    def realise(self, reply: str) -> int:
        text = reply.lower()
        for act, pattern in _ACT_RULES:
            if re.search(pattern, text):
                return self._k[act]
        if "?" in text and (self._requested_slots(text) or "preference" in text):
            return self._k["request"]
        if _PLACEHOLDER_RE.search(text):
            return self._k["inform"]
        return UNRECOGNISED

    @staticmethod
    def _requested_slots(text: str) -> list[str]:
        return [slot for slot, pattern in _REQUEST_WORDS.items() if re.search(pattern, text)]

    # ---------------------------------------------------------------------------------------- user simulator

    def _open_domain(self) -> str:
        ep, g = self._ep, self._goal
        active = self._active(g)
        first = [s for s in _ASK_ORDER[g.domain] + tuple(active) if s in active]
        first = list(dict.fromkeys(first))[:3 if g.domain in ("train", "taxi") else 2]
        ep.informed[g.domain].update({s: active[s] for s in first})
        also = "I also need" if ep.d > 0 else "I am looking for"
        phrases = [_phrase(g.domain, s, active[s]) for s in first]
        return f"{also} {_NOUN[g.domain]}" + (" " + " ".join(phrases) if phrases else "") + "."

    def _need(self) -> str:
        """What the user says when it has nothing specific to answer: its current open need."""
        ep, g = self._ep, self._goal
        if ep.finished:
            return "That is all I need, thank you."
        if ep.waiting:
            return f"Thank you, that is all I need for the {g.domain}."
        if g.domain != "taxi" and not ep.accepted.get(g.domain):
            rest = {s: v for s, v in self._active(g).items() if s not in ep.informed[g.domain]}
            if rest:
                s, v = next(iter(rest.items()))
                ep.informed[g.domain][s] = v
                return f"I would like it {_phrase(g.domain, s, v)}."
            return f"Can you find me {_NOUN[g.domain]}?"
        pending = [r for r in g.reqt if (g.domain, "reqt:" + r) not in ep.units]
        if g.domain == "taxi" and (g.domain, "book") not in ep.units:
            return "Can you book the taxi for me?"
        if pending:
            return f"Could you tell me the {_join(pending)}?"
        if g.book and (g.domain, "book") not in ep.units:
            return "I would like to make a booking."
        return "Thank you."

    def _answer(self, slots: list[str]) -> tuple[str, bool]:
        ep, g = self._ep, self._goal
        active, book = self._active(g), self._active_book(g)
        said, changed = [], False
        for slot in slots:
            if slot == "day" and g.domain != "train":
                slot_kind = "book"
            elif slot in ("people", "time", "stay"):
                slot_kind = "book"
            else:
                slot_kind = "info"
            if slot_kind == "book":
                if slot in book and ep.booked_info[g.domain].get(slot) != book[slot]:
                    ep.booked_info[g.domain][slot] = book[slot]
                    said.append(_phrase(g.domain, slot, book[slot]))
                    changed = True
                continue
            if slot in ("leaveAt", "arriveBy") and slot not in active:
                slot = "arriveBy" if slot == "leaveAt" else "leaveAt"
            if slot in active:
                if ep.informed[g.domain].get(slot) != active[slot]:
                    ep.informed[g.domain][slot] = active[slot]
                    changed = True
                said.append(_phrase(g.domain, slot, active[slot]))
            elif slot not in ep.dontcare[g.domain] and slot in _ASK_ORDER[g.domain] + ("name",):
                ep.dontcare[g.domain].add(slot)
                said.append(f"I don't mind about the {slot}")
                changed = True
        if not said:
            return self._need(), False
        return f"I would like it {_join(said)}." if not said[0].startswith("I ") else _join(said) + ".", changed

    def _give_attributes(self, names: set) -> list:
        ep, g = self._ep, self._goal
        gained = []
        for p in names:
            r = _PLACEHOLDER_REQT.get(p)
            unit = (g.domain, "reqt:" + str(r))
            if r in g.reqt and unit not in ep.units:
                ep.units.add(unit)
                gained.append(unit)
        return gained

    def _react(self, act: str, text: str) -> tuple[str, list, bool]:
        """The user's reaction to a valid realised act: (utterance, goal units gained, dialogue state changed)."""
        ep, g = self._ep, self._goal
        holders = set(_PLACEHOLDER_RE.findall(text))
        if act == "greet":
            return self._need(), [], False
        if act == "request":
            utterance, changed = self._answer(self._requested_slots(text))
            return utterance, [], changed
        if act in ("inform", "recommend", "select") and (holders & {"name", "id"}):
            matches = self._matches(g)
            if not matches:  # inform is also allowed to talk about the venue already on offer
                return self._need(), [], False
            ep.offered[g.domain] = matches[0]
            rest = {s: v for s, v in self._active(g).items() if s not in ep.informed[g.domain]}
            if rest:
                ep.informed[g.domain].update(rest)
                said = [_phrase(g.domain, s, v) for s, v in rest.items()]
                return f"It needs to be {_join(said)}.", [], True
            gained = []
            if not ep.accepted.get(g.domain):
                ep.accepted[g.domain] = True
                ep.units.add((g.domain, "venue"))
                gained.append((g.domain, "venue"))
            gained += self._give_attributes(holders)
            return "That sounds good. " + self._need(), gained, True
        if act == "inform":
            if g.domain == "taxi" or ep.accepted.get(g.domain):
                gained = self._give_attributes(holders)
                return self._need(), gained, bool(gained)
            return self._need(), [], False
        if act == "no_offer":
            if ep.fail_mode[g.domain]:
                ep.fail_mode[g.domain] = False
                changed = {s: v for s, v in g.info.items() if ep.informed[g.domain].get(s) != v}
                ep.informed[g.domain] = {s: v for s, v in ep.informed[g.domain].items() if s in g.info}
                ep.informed[g.domain].update(changed)
                said = [_phrase(g.domain, s, v) for s, v in changed.items()] or ["with my other preferences"]
                return f"How about one {_join(said)} instead?", [], True
            return self._need(), [], False
        if act == "offer_book":
            if g.book:
                book = self._active_book(g)
                ep.booked_info[g.domain].update(book)
                said = [_phrase(g.domain, s, v) for s, v in book.items()]
                return f"Yes, please book it {_join(said)}.", [], True
            ep.declined[g.domain] = True
            return "No, I don't need a booking. " + self._need(), [], False
        if act == "book":
            ep.units.add((g.domain, "book"))
            gained = [(g.domain, "book")] + (self._give_attributes(holders) if g.domain == "taxi" else [])
            return "Great, thanks. " + self._need(), gained, True
        if act == "no_book":
            ep.book_fail[g.domain] = False
            changed = {s: v for s, v in g.book.items() if ep.booked_info[g.domain].get(s) != v}
            ep.booked_info[g.domain].update(changed)
            said = [_phrase(g.domain, s, v) for s, v in changed.items()]
            return f"How about {_join(said)} instead?", [], True
        if act == "reqmore":
            if ep.waiting and ep.d + 1 < len(ep.goal.domains):
                ep.waiting = False
                ep.d += 1
                return self._open_domain(), [], True
            if ep.waiting:
                ep.waiting, ep.finished = False, True
                return "No, that is all I need. Thank you!", [], True
            return self._need(), [], False
        if act == "bye":
            ep.done = True
            return "Goodbye.", [], False
        return self._need(), [], False

    # ------------------------------------------------------------------------------------------------- step

    def step(self, strategy: int, reply: str) -> tuple[HostObs, TurnSignals]:
        ep = self._episode()
        if ep.done:
            raise RuntimeError("MultiWOZEnv.step: the episode is over; call reset(seed)")
        allowed = self._allowed()
        reference = self._reference_strategy()
        g = self._goal
        state_before = {d: dict(v) for d, v in ep.informed.items()}
        realised = self.realise(reply)
        valid = realised != UNRECOGNISED and bool(allowed[realised])
        booked_before = (g.domain, "book") in ep.units
        if valid:
            act = self.spec.strategies[realised]
            ep.stage = int(self.spec.sop.transition[ep.stage, realised])
            utterance, gained, changed = self._react(act, reply.lower())
        else:
            ep.violations += 1
            utterance, gained, changed = "Sorry, I don't follow. " + self._need(), [], False
        now = self._goal  # reqmore may have moved the user on to its next domain
        if valid and not ep.waiting and not ep.finished and self._domain_complete(now) and not ep.done:
            ep.waiting = True
            utterance = utterance.replace(" Thank you.", "") + f" Thank you, that is all I need for the {now.domain}."
        # The evaluator record: response, the belief state the system holds, the domain of this turn.
        state = {}
        for d, slots in ep.informed.items():
            s = {k: v for k, v in slots.items()}
            s.update({f"book{k}": v for k, v in ep.booked_info[d].items()})
            if s:
                state[d] = s
        ep.records.append({"response": reply, "state": state, "active_domains": [g.domain]})
        ep.booked_turns.append([g.domain] if (not booked_before and (g.domain, "book") in ep.units
                                              and g.domain != "taxi") else [])
        total = len(self._all_units())
        gain = len(gained) / total
        changed = changed or bool(gained) or state_before != ep.informed
        cont = scripted_user_engagement(valid=valid, progress=bool(gained), changed=changed)
        ep.survival *= cont
        ep.idle = 0 if changed else ep.idle + 1
        ep.turn += 1
        if not ep.done and ep.idle >= ep.patience and not ep.finished:
            ep.done, ep.abandoned = True, True
            utterance = "This is not helping. Goodbye."
        if ep.turn >= self.spec.max_turns or bool(self.spec.sop.terminal[ep.stage]):
            ep.done = True
        ep.customer = utterance
        signals = host_turn_signals(strategy=strategy, realised=realised, reference=reference, allowed=allowed,
                                    valid=valid, gain=gain, cont=cont, done=ep.done)
        return self._obs(), signals

    def outcome(self) -> EpisodeOutcome:
        ep = self._episode()
        units = self._all_units()
        frac = sum(u in ep.units for u in units) / len(units)
        o = float(frac == 1.0)
        return EpisodeOutcome(outcome=o, satisfaction=float(frac * ep.survival), fcr=o)

    # ------------------------------------------------------------------------------------- reference policy

    def _reference_strategy(self) -> int:
        """The rule-based system policy (it sees the dialogue state and the database, never the user's goal)."""
        ep, g = self._ep, self._goal
        k = self._k
        if ep.finished:
            return k["bye"] if self.spec.sop.allowed[ep.stage, k["bye"]] else k["reqmore"]
        if ep.waiting:
            return k["reqmore"]
        pre = self._preconditions()
        if g.domain == "taxi":
            if (g.domain, "book") not in ep.units:
                if self._required_book_known(g):
                    return k["book"]
                return k["request"]
            return k["inform"]
        if ep.accepted.get(g.domain):
            pending = [r for r in g.reqt if (g.domain, "reqt:" + r) not in ep.units]
            if pending:
                return k["inform"]
            if pre[k["book"]]:
                return k["book"]
            if pre[k["no_book"]]:
                return k["no_book"]
            if g.domain in BOOKABLE and not ep.declined.get(g.domain) and (g.domain, "book") not in ep.units:
                if ep.booked_info[g.domain]:
                    return k["request"]
                return k["offer_book"]
            return k["inform"] if pending else k["reqmore"]
        n = len(self._matches(g))
        if n == 0:
            return k["no_offer"] if pre[k["no_offer"]] else k["request"]
        if n > 1 and self._unasked(g):
            return k["request"]
        return k["recommend"]

    def _unasked(self, g: DomainGoal) -> list[str]:
        ep = self._ep
        known = set(ep.informed[g.domain]) | ep.dontcare[g.domain]
        if {"leaveAt", "arriveBy"} & known:
            known |= {"leaveAt", "arriveBy"}
        return [s for s in _ASK_ORDER[g.domain] if s not in known]

    def reference_turn(self) -> tuple[int, str]:
        self._episode()
        k = self._reference_strategy()
        return k, self.scripted_reply(k)

    # ---------------------------------------------------------------------------------------------- replies

    def scripted_reply(self, strategy: int) -> str:
        """A delexicalised template reply realising `strategy` with the best content for the current state."""
        ep = self._episode()
        g = self._goal
        act = self.spec.strategies[strategy]
        venue = "[value_id]" if g.domain == "train" else "[value_name]"
        pending = [r for r in g.reqt if (g.domain, "reqt:" + r) not in ep.units]
        if act == "greet":
            return "Hello, welcome to the Cambridge TownInfo centre. How can I help you?"
        if act == "request":
            if ep.accepted.get(g.domain) or g.domain == "taxi" and not self._unasked(g):
                slots = [s for s in self.data.book_slots.get(g.domain, ()) if s not in ep.booked_info[g.domain]]
                if g.domain == "taxi":
                    slots = []
            else:
                slots = self._unasked(g)[:2]
            if not slots:
                return "Do you have any other preference?"
            text = " and ".join(_REQUEST_PHRASES[s] for s in slots) + "?"
            return text[0].upper() + text[1:]
        if act == "inform":
            if g.domain == "taxi":
                return "Your taxi is a [value_car] and its contact number is [value_phone]."
            if ep.accepted.get(g.domain) and pending:
                parts = [f"the {r} is [value_{_REQT_PLACEHOLDER[r]}]" for r in pending]
                return f"Sure, {_join(parts)}."
            if ep.offered.get(g.domain) is None or not ep.accepted.get(g.domain):
                return f"There are [value_count] options. {venue} is one of them."
            return f"{venue} is a great choice."
        if act == "recommend":
            return f"I would recommend {venue}."
        if act == "select":
            return f"Would you prefer {venue} or {venue}?"
        if act == "no_offer":
            return f"I'm sorry, there is no {g.domain} matching your request."
        if act == "offer_book":
            asks = [_REQUEST_PHRASES[s] for s in self.data.book_slots.get(g.domain, ())]
            return "Would you like me to book it?" + (" Please tell me " + _join(asks) + "." if asks else "")
        if act == "book":
            if g.domain == "taxi":
                return "I have booked a taxi. It is a [value_car] and the contact number is [value_phone]."
            return "I have booked it. Your reference number is [value_reference]."
        if act == "no_book":
            return "I'm sorry, I was unable to book that. Could you try another day or time?"
        if act == "reqmore":
            return "Is there anything else I can help you with?"
        if act == "bye":
            return "Thank you for using our service. Goodbye!"
        raise ValueError(f"MultiWOZEnv.scripted_reply: unknown strategy index {strategy}")

    # ------------------------------------------------------------------------------------------ exports

    def evaluator_turns(self) -> tuple[str, list[dict]]:
        """(dialogue id, this episode's turns in the standard evaluator input format)."""
        ep = self._episode()
        return ep.goal.dialogue_id, [dict(r) for r in ep.records]

    def inform_success(self) -> dict:
        """Inform / Success of this episode with the metrics module's scorer (booked domains from this episode)."""
        ep = self._episode()
        goals = _evaluator_goals(ep.source)
        responses = [multiwoz_eval.normalise_response(r["response"]) for r in ep.records]
        states = [multiwoz_eval.normalise_state(r["state"]) for r in ep.records]
        domains = [r["active_domains"] for r in ep.records]
        inform, success = multiwoz_eval.dialogue_inform_success(goals[ep.goal.dialogue_id], ep.booked_turns,
                                                                responses, states, domains, self.data.database)
        return dict(inform=bool(inform["total"]), success=bool(success.get("total", False)))

    def corpus(self) -> Iterable[str]:
        """The logged utterances of the split, the strategy descriptions and every reply template."""
        yield from self.data.texts
        yield from STRATEGY_DESCRIPTIONS
        yield from _REQUEST_PHRASES.values()
        for demo in self.demonstrations(20, 0):
            for t in demo.turns:
                yield t.reply

    # --------------------------------------------------------------------------------- logged demonstrations

    def _logged_dialogues(self) -> tuple:
        """The LOGGED_SPLIT dialogues (read once per folder)."""
        key = str(self.data.data_dir)
        if key not in _LOGGED_CACHE:
            _LOGGED_CACHE[key] = load_logged_dialogues(self.data.data_dir)
        return _LOGGED_CACHE[key]

    def replay_logged(self, dialogue: LoggedDialogue) -> list[logged.ReplayedTurn]:
        """The dialogue's turns with their demonstrated strategy, R's reading and the automaton's stage."""
        return logged.replay(dialogue.turns, self.spec.sop, self.realise)

    def logged_demonstrations(self, num_episodes: int, seed: int) -> list[Demonstration]:
        """SFT demonstrations from the logged human system turns of the val dialogues (module doc), in a
        seed-shuffled order, cycling when more are asked for than exist."""
        # Only the dialogues of training customers' goals, each with the context `reset` shows that customer.
        customer_of_goal = {goal: index for index, goal in enumerate(self.customer_goals(customers.TRAIN)[1])}
        dialogues = [d for d in self._logged_dialogues() if d.goal in customer_of_goal]
        world = copy.deepcopy(self)
        return [logged.demonstration(world.reset(customer_of_goal[dialogues[i].goal]).context,
                                     self.replay_logged(dialogues[i]), self.spec.strategies)
                for i in logged.episode_order(len(dialogues), num_episodes, seed)]

    def logged_report(self) -> dict:
        """How the logged val turns fit this world (the numbers in the module doc; see logged.report)."""
        dialogues = self._logged_dialogues()
        replayed = [r for d in dialogues for r in self.replay_logged(d)]
        return logged.report(replayed, self.spec.strategies, dialogues=len(dialogues))


_GOALS_CACHE: dict = {}


def _evaluator_goals(data: MultiWOZData) -> dict:
    key = (str(data.data_dir), data.split)
    if key not in _GOALS_CACHE:
        _GOALS_CACHE[key] = multiwoz_eval.load_goals(data.data_dir, data.split)
    return _GOALS_CACHE[key]


_DATA_CACHE: dict = {}
_LOGGED_CACHE: dict = {}


def _cached_data(data_dir: str | pathlib.Path | None, split: str) -> MultiWOZData:
    """The world's data, loaded once per folder and split."""
    key = (str(data_dir), split)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_data(data_dir, split)
    return _DATA_CACHE[key]


def make_env(data_dir: str | pathlib.Path | None = None, *, max_turns: int = MAX_TURNS,
             sop_path: str | pathlib.Path = SOP_PATH) -> MultiWOZEnv:
    """The MultiWOZ host environment: training, validation and test customers from the real goals (module doc)."""
    return MultiWOZEnv(_cached_data(data_dir, TEST_SPLIT), load_sop(sop_path), max_turns=max_turns)
