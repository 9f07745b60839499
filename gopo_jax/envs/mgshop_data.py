"""MG-ShopDial as data: reading and validating MGShopDial.json into conversations of agent turns, the strategy
label of a logged wizard utterance, the split by conversation, and the SOP derived from the logged wizard turns.

The rules (which intents are strategies, how ties break, how the SOP is derived) are stated in the docstring of
gopo_jax/envs/mgshop.py, the environment built on this data.
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Sequence

import numpy as np

from gopo_jax.dialogue.sop import SOP, sop_from_dict
from gopo_jax.envs import customers
from gopo_jax.envs.base import SHARED_DATA, DataSource, EnvDataError

DATA_FOLDER = "mgshopdial"
DATA_FILE = "MGShopDial.json"
SOP_PATH = pathlib.Path(__file__).resolve().parent / "sops" / "mgshop.json"

INTENTS = ("answer", "clarify", "explain", "interaction", "o_question", "pf", "greeting", "recommend", "disclose",
           "elicit", "other", "nf")
STRATEGIES = ("greeting", "elicit", "clarify", "recommend", "answer", "explain", "interaction", "pf")
STRATEGY_DESCRIPTIONS = (
    "greeting: greet the customer, or say goodbye once a recommendation has been made",
    "elicit: ask about the customer's need or preferences",
    "clarify: ask or confirm what exactly the customer means",
    "recommend: recommend one or more products",
    "answer: answer the customer's question",
    "explain: describe or explain a product or an option",
    "interaction: manage the conversation (please wait, adding to basket, ...)",
    "pf: positive feedback, affirm the customer's choice",
)
_LABEL_PRIORITY = ("recommend", "answer", "elicit", "clarify", "explain", "greeting", "pf", "interaction")
_FALLBACK = {"o_question": "elicit", "disclose": "explain", "nf": "answer"}
# Priority among all 12 intents for the "top client intent" of a customer text (ties in votes).
_CLIENT_PRIORITY = ("nf", "pf", "o_question", "clarify", "elicit", "disclose", "answer", "recommend", "explain",
                    "greeting", "interaction", "other")
QUESTION_INTENTS = frozenset({"o_question", "clarify", "elicit"})
CHECKLIST = ("greetings", "need", "clarify", "preferences", "first-recommend", "qa", "search", "second-recommend",
             "end")
STAGES = ("opening", "discovery", "recommendation", "closing")
# Stage order of the wizard checklist; derive_sop keeps the transitions whose strategy the data allows.
_SKELETON = {
    "opening": {**{k: "discovery" for k in STRATEGIES if k != "recommend"}, "recommend": "recommendation"},
    "discovery": {"recommend": "recommendation"},
    "recommendation": {"greeting": "closing"},
    "closing": {},
}
_SPLIT_EVERY = 2  # every 2nd conversation of a category (sorted by id) is held out (see customer_indices)


class MgshopDataError(EnvDataError):
    """Malformed, truncated or inconsistent MG-ShopDial input; the message names the file and the record."""


SOURCE = DataSource(world="MG-ShopDial", folder=DATA_FOLDER, error=MgshopDataError,
                    files=f"{DATA_FILE} (64 conversations from github.com/iai-group/MG-ShopDial)")


@dataclasses.dataclass(frozen=True)
class Turn:
    """One logged wizard utterance (= one agent turn) with the Client text around it."""

    text: str
    label: int | None  # strategy index from the annotation, None if unlabelled
    customer_before: str  # Client text since the previous wizard utterance ('' if none)
    intents_before: dict  # intent -> votes summed over that Client text
    response: str  # Client text after this utterance, up to the next wizard utterance
    response_intents: dict
    final: bool  # the response is the end of the conversation


@dataclasses.dataclass(frozen=True)
class Conversation:
    id: str
    category: str
    scenario: str  # category + metadata id: conversations with the same client instructions
    type: str
    constraint: str
    desc: str
    turns: tuple[Turn, ...]


def strategy_label(intents: Sequence[Sequence[Any]]) -> int | None:
    """The strategy index of a wizard utterance from its [intent, votes] annotation (rules in the module doc)."""
    votes = {name: float(n) for name, n in intents}
    for pool in (STRATEGIES, tuple(_FALLBACK)):
        present = {k: v for k, v in votes.items() if k in pool}
        if present:
            best = max(present.values())
            order = _LABEL_PRIORITY if pool is STRATEGIES else tuple(_FALLBACK)
            name = next(k for k in order if present.get(k) == best)
            return STRATEGIES.index(_FALLBACK.get(name, name))
    return None


def top_client_intent(intents: dict) -> str:
    """The most-voted intent of a Client text ('none' for an empty or unannotated one)."""
    if not intents:
        return "none"
    best = max(intents.values())
    return next(k for k in _CLIENT_PRIORITY if intents.get(k) == best)


def _merge_intents(utterances: list[dict]) -> dict:
    out: dict[str, float] = {}
    for u in utterances:
        for name, n in u["intents"]:
            out[name] = out.get(name, 0.0) + float(n)
    return out


def _positive(votes: Any) -> bool:
    """A positive finite number (the votes are summed as floats: an integer beyond float range is not one)."""
    if isinstance(votes, bool) or not isinstance(votes, (int, float)):
        return False
    try:
        return 0 < float(votes) < math.inf
    except OverflowError:
        return False


def _validate_record(conv: Any, i: int, fail) -> None:
    if not isinstance(conv, dict):
        raise fail(f"conversation #{i} is a {type(conv).__name__}, expected an object")
    cid = conv.get("id", f"#{i}")
    for key in ("id", "metadata", "utterances"):
        if key not in conv:
            raise fail(f"conversation #{i} (id {cid!r}) lacks key {key!r}")
    if not isinstance(conv["id"], str) or conv["id"].count(":") < 1:
        raise fail(f"conversation #{i}: id {conv['id']!r} is not of the form 'Category:...'")
    meta = conv["metadata"]
    if not isinstance(meta, dict):
        raise fail(f"conversation {cid!r}: metadata is not an object")
    for key in ("type", "constraint", "desc", "id"):
        if not isinstance(meta.get(key), str):
            raise fail(f"conversation {cid!r}: metadata.{key} missing or not a string")
    utts = conv["utterances"]
    if not isinstance(utts, list) or not utts:
        raise fail(f"conversation {cid!r}: 'utterances' must be a non-empty list")
    for j, u in enumerate(utts):
        where = f"conversation {cid!r}, utterance #{j}"
        if not isinstance(u, dict):
            raise fail(f"{where} is not an object")
        if u.get("participant") not in ("Wizard", "Client"):
            raise fail(f"{where}: participant {u.get('participant')!r} is not 'Wizard' or 'Client'")
        if not isinstance(u.get("utterance"), str):
            raise fail(f"{where}: 'utterance' missing or not a string")
        ints = u.get("intents")
        if not isinstance(ints, list):
            raise fail(f"{where}: 'intents' missing or not a list")
        for pair in ints:
            if not isinstance(pair, list) or len(pair) != 2 or pair[0] not in INTENTS or not _positive(pair[1]):
                raise fail(f"{where}: intent entry {pair!r} is not [one of {list(INTENTS)}, positive votes]")
    if not any(u["participant"] == "Wizard" for u in utts):
        raise fail(f"conversation {cid!r} has no Wizard utterance (nothing for the agent to do)")


def _conversation(conv: dict) -> Conversation:
    utts = conv["utterances"]
    turns = []
    pending: list[dict] = []  # Client utterances since the last wizard utterance
    wizard_positions = [j for j, u in enumerate(utts) if u["participant"] == "Wizard"]
    for n, j in enumerate(wizard_positions):
        end = wizard_positions[n + 1] if n + 1 < len(wizard_positions) else len(utts)
        before_start = wizard_positions[n - 1] + 1 if n else 0
        pending = [u for u in utts[before_start:j] if u["participant"] == "Client"]
        after = [u for u in utts[j + 1:end] if u["participant"] == "Client"]
        u = utts[j]
        turns.append(Turn(
            text=u["utterance"].strip(), label=strategy_label(u["intents"]),
            customer_before=" ".join(x["utterance"].strip() for x in pending).strip(),
            intents_before=_merge_intents(pending),
            response=" ".join(x["utterance"].strip() for x in after).strip(),
            response_intents=_merge_intents(after), final=n + 1 == len(wizard_positions)))
    meta = conv["metadata"]
    category = conv["id"].split(":")[0]
    return Conversation(id=conv["id"], category=category, scenario=f"{category}:{meta['id']}", type=meta["type"],
                        constraint=meta["constraint"], desc=meta["desc"], turns=tuple(turns))


def load_conversations(path: str | pathlib.Path) -> list[Conversation]:
    """Reads and validates MGShopDial.json; any problem is one MgshopDataError naming the file and the record."""
    path = pathlib.Path(path)

    def fail(msg: str) -> MgshopDataError:
        return MgshopDataError(f"{path}: {msg}")

    data = SOURCE.read_json(path)
    if not isinstance(data, list) or not data:
        raise fail("expected a non-empty JSON list of conversations")
    seen = set()
    for i, conv in enumerate(data):
        _validate_record(conv, i, fail)
        if conv["id"] in seen:
            raise fail(f"conversation #{i}: duplicate id {conv['id']!r}")
        seen.add(conv["id"])
    return [_conversation(c) for c in data]


def resolve_data_path(data_dir: str | pathlib.Path | None) -> pathlib.Path:
    """The MGShopDial.json to read: `data_dir` may be the folder or the file itself (None: the shared folder)."""
    folder = pathlib.Path(data_dir) if data_dir else SHARED_DATA / DATA_FOLDER
    path = folder / DATA_FILE if folder.is_dir() or folder.suffix != ".json" else folder
    if not path.exists():
        raise SOURCE.missing(path)
    return path


def split_indices(conversations: Sequence[Conversation], split: str) -> list[int]:
    """Conversation indices of a split, by conversation and stratified by category (see the module doc)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"Mgshop split must be 'train', 'test' or 'all', got {split!r}")
    if split == "all":
        return list(range(len(conversations)))
    held_out = set()
    for cat in sorted({c.category for c in conversations}):
        ids = sorted((c.id, i) for i, c in enumerate(conversations) if c.category == cat)
        held_out.update(i for r, (_, i) in enumerate(ids) if r % _SPLIT_EVERY == _SPLIT_EVERY - 1)
    return [i for i in range(len(conversations)) if (i in held_out) == (split == "test")]


def customer_indices(conversations: Sequence[Conversation]) -> dict[str, list[int]]:
    """The world's customers as conversation indices: "train" (the training split) and the held-out ("test") split
    divided into "validation" and "test" halves: within each category its held-out conversations sorted by id
    alternate validation, test (17 and 14 of the 31 held-out ones, every category in both)."""
    held_out = split_indices(conversations, "test")
    out = {customers.TRAIN: split_indices(conversations, "train"), **{s: [] for s in customers.EVAL_SPLITS}}
    for cat in sorted({conversations[i].category for i in held_out}):
        halves = customers.halves([i for i in held_out if conversations[i].category == cat],
                                  key=lambda i: conversations[i].id)
        for split, half in zip(customers.EVAL_SPLITS, halves):
            out[split] += half
    return {split: sorted(indices) for split, indices in out.items()}



def _skeleton_sop() -> SOP:
    return sop_from_dict({"name": "mgshop-skeleton", "strategies": list(STRATEGIES), "initial": "opening",
                          "stages": [{"name": s, "allowed": list(STRATEGIES) if s != "closing" else [],
                                      "next": _SKELETON[s], "terminal": s == "closing"} for s in STAGES]})


def logged_stages(sop: SOP, conv: Conversation, labels: Sequence[int | None]) -> list[int]:
    """The SOP stage before each logged wizard turn when the automaton is driven by the logged strategies."""
    stage, out = sop.initial, []
    for k in labels:
        out.append(stage)
        if k is not None and sop.allowed[stage, k]:
            stage = int(sop.transition[stage, k])
    return out


def derive_sop(conversations: Sequence[Conversation], *, min_count: int = 3, min_share: float = 0.02) -> dict:
    """The SOP in JSON form: the checklist-ordered skeleton with allowed masks from observed wizard strategies."""
    skeleton = _skeleton_sop()
    counts = np.zeros((len(STAGES), len(STRATEGIES)), np.int64)
    for conv in conversations:
        labels = [t.label for t in conv.turns]
        for s, k in zip(logged_stages(skeleton, conv, labels), labels):
            if k is not None and not skeleton.terminal[s]:
                counts[s, k] += 1
    stages = []
    for s, name in enumerate(STAGES):
        total = max(int(counts[s].sum()), 1)
        keep = [STRATEGIES[k] for k in range(len(STRATEGIES))
                if counts[s, k] >= min_count and counts[s, k] / total >= min_share]
        if name == "closing":
            keep = []
        stages.append({"name": name, "allowed": keep,
                       "next": {k: v for k, v in _SKELETON[name].items() if k in keep},
                       "terminal": name == "closing", "observed_counts": counts[s].tolist()})
    return {"name": "mg_shopdial", "strategies": list(STRATEGIES), "initial": "opening", "stages": stages,
            "derived_from": f"MG-ShopDial training conversations (split by conversation), min_count={min_count}, "
                            f"min_share={min_share}; observed_counts are per strategy in this order"}

