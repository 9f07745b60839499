"""MultiWOZ Inform / Success / BLEU / Combined with the standardised definitions of Nekvinda & Dušek (2021).

Input is the standard evaluator format `{dialogue_id: [{"response": str, "state"?: {...}, "active_domains"?: [...]},
...]}` with one entry per system turn and delexicalised responses (`[restaurant_name]`, `[value_phone]`, ...).

What the scorer does (a re-implementation written for this project from the published definitions; the
evaluator's own code is not copied — see docs/metrics.md for every known difference):
- Responses are lower-cased, placeholders are mapped to the evaluator's slot tokens (NAME, PHONE, POST, ADDRESS,
  REFERENCE, TRAINID, ...; a plural suffix `-s`/`s`/`es` after the bracket is absorbed), `-s`/`-ly` split suffixes
  are removed and spacing around punctuation is normalised.
- Inform: per goal domain, the venues the system last offered (database look-up with the turn's dialogue state
  whenever a NAME / TRAINID token is produced while the domain is active; the offered set is replaced when it
  stops being a subset of the new look-up) must be a subset of the venues matching the goal's constraints.
  Domains whose goal names the venue, taxi/police/hospital, and train when no train was offered and the train id
  was not requested, count as matched. A dialogue is informed when every goal domain matches.
- Success: informed, and every requestable of every goal domain (PHONE, ADDRESS, POST, TRAINID, and REFERENCE
  when the goal books) was produced as a token while the domain was active; REFERENCE only counts on turns where
  the data say a booking happened (`mwzeval/booked_domains.json.gz`).
- Missing `state`: the ConvLab belief state annotated on the reference system turn is used (the canonical
  MultiWOZ 2.2 gold states are not on disk). Missing `active_domains`: estimated from state changes as in the
  standard evaluator (the domain whose state changed; ties keep the current one, else the one with most slots).
- BLEU: sacreBLEU corpus BLEU of the normalised responses against ONE reference set, the ConvLab-3 MultiWOZ
  test/val system turns delexicalised with their own `span_info` annotations (word spans → `[slot]`) and
  normalised the same way. This is NOT the canonical `mwz22` reference set (built from the absent 2.2
  `dialog_acts.json`), so BLEU is comparable across systems scored here, not to published BLEU.
- Combined = BLEU + 0.5 · (Inform + Success), rates in percent.

Goals are rebuilt from the ConvLab `goal` field of the real dialogues (the evaluator's goals.json is absent):
informable = `info` (leaveAt→leave, arriveBy→arrive), requestable = `reqt` ∩ {phone, address, postcode,
trainID} as tokens, plus REFERENCE when the goal has a `book` section; booking = `book` minus pre_invalid/invalid.

Command line: `python -m gopo_jax.metrics.multiwoz_eval --predictions FILE[.gz] --data DIR [--split test]`
prints a JSON report; `--human-references` scores the delexicalised human responses instead of a file.
"""

import argparse
import difflib
import functools
import gzip
import json
import pathlib
import re
import sys
import zipfile
from typing import Any

import sacrebleu

VENUE_DOMAINS = ("restaurant", "hotel", "attraction", "train")
NO_VENUE_DOMAINS = ("taxi", "police", "hospital")
GOAL_DOMAINS = VENUE_DOMAINS + NO_VENUE_DOMAINS
REQUESTABLE_TOKENS = ("PHONE", "ADDRESS", "POST", "REFERENCE", "TRAINID")
_GOAL_REQUESTABLE = {"phone": "PHONE", "address": "ADDRESS", "postcode": "POST", "trainid": "TRAINID"}
_DONT_CARE = {"dontcare", "dont care", "don't care", "do n't care", "do not care", "not mentioned", "", "none"}
_FUZZY_KEYS = {
    "restaurant": {"name", "food"},
    "hotel": {"name"},
    "attraction": {"name"},
    "train": {"departure", "destination"},
}
# Database columns the evaluator does not match on (free text, coordinates, nested prices).
_IGNORED_COLUMNS = {"location", "openhours", "introduction", "signature", "takesbookings"}
_SPLIT_FILES = {"test": "test.json.zip", "val": "val.json.zip", "validation": "val.json.zip", "dev": "val.json.zip"}

# Slot word (after dropping a domain/value prefix) → evaluator token.
_SLOT_TOKENS = {
    "address": "ADDRESS",
    "addr": "ADDRESS",
    "area": "AREA",
    "time": "TIME",
    "booktime": "TIME",
    "duration": "TIME",
    "arriveby": "TIME",
    "arrive": "TIME",
    "arrive by": "TIME",
    "leaveat": "TIME",
    "leave": "TIME",
    "leave at": "TIME",
    "day": "DAY",
    "bookday": "DAY",
    "destination": "PLACE",
    "departure": "PLACE",
    "place": "PLACE",
    "dest": "PLACE",
    "depart": "PLACE",
    "food": "FOOD",
    "name": "NAME",
    "phone": "PHONE",
    "postcode": "POST",
    "post": "POST",
    "price": "PRICE",
    "pricerange": "PRICE",
    "price range": "PRICE",
    "entrancefee": "PRICE",
    "entrance fee": "PRICE",
    "fee": "PRICE",
    "ticket": "PRICE",
    "reference": "REFERENCE",
    "ref": "REFERENCE",
    "stars": "COUNT",
    "bookstay": "COUNT",
    "stay": "COUNT",
    "bookpeople": "COUNT",
    "people": "COUNT",
    "choice": "COUNT",
    "count": "COUNT",
    "type": "TYPE",
    "car": "TYPE",
    "trainid": "TRAINID",
    "train_id": "TRAINID",
    "train": "TRAINID",
    "internet": "INTERNET",
    "parking": "PARKING",
    "department": "DEPARTMENT",
    "openhours": "OPEN",
    "open": "OPEN",
}
_SLOT_PREFIXES = (
    "value_",
    "restaurant_",
    "hotel_",
    "attraction_",
    "train_",
    "taxi_",
    "police_",
    "hospital_",
    "booking_",
)
_PLACEHOLDER = re.compile(r"\[([\w\s]+)\](?:-es|-s|es|s)?")


class MultiWOZDataError(ValueError):
    """Missing or malformed MultiWOZ data or predictions; the message names the file/dialogue and the fix."""


# ----------------------------------------------------------------------------------------------- normalisation


def _slot_token(placeholder: str) -> str:
    name = placeholder.strip().lower()
    prefix_domain = None
    for prefix in _SLOT_PREFIXES:
        if name.startswith(prefix):
            prefix_domain = prefix[:-1]
            name = name[len(prefix) :]
            break
    if name == "id":  # a bare id is a train id for trains and a venue id elsewhere
        return "TRAINID" if prefix_domain in ("train", "value", None) else "ID"
    return _SLOT_TOKENS.get(name, name.upper().replace(" ", ""))


def normalise_response(text: str) -> str:
    """Lower-case, placeholders → slot tokens, drop `-s`/`-ly` split suffixes, normalise spacing around punctuation."""
    text = _PLACEHOLDER.sub(lambda m: _slot_token(m.group(1)), text.lower())
    text = text.replace("-s", "").replace("-ly", "")
    text = re.sub(r"\s+([.,!?;:%)])", r"\1", text)  # "word ." → "word."
    text = re.sub(r"([($])\s+", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)  # tokenised contractions "do n't" → "don't"
    return re.sub(r"\s+", " ", text).strip()


def _canonical_time(value: str) -> str:
    """Free-form time → HH:MM where it can be read (e.g. "after 5:30 pm" → "17:30"), else the stripped input."""
    text = value.strip().lower()
    named = {"morning": "08:00", "noon": "12:00", "lunch": "12:00", "afternoon": "13:00", "evening": "18:00"}
    if text in named:
        return named[text]
    match = re.search(r"(\d{1,2})(?::|\.)?(\d{2})?\s*(a\.?m\.?|p\.?m\.?)?", text)
    if not match:
        return text
    hours, minutes, meridiem = int(match.group(1)), int(match.group(2) or 0), match.group(3) or ""
    if meridiem.startswith("p") and hours < 12:
        hours += 12
    if hours > 24 or minutes > 59:
        return text
    return f"{hours:02d}:{minutes:02d}"


def _canonical_value(slot: str, value: str) -> str:
    value = str(value).strip().lower()
    if slot in ("arrive", "leave", "time"):
        return _canonical_time(value)
    if slot in ("parking", "internet"):
        return "yes" if value == "free" else value
    if slot == "type":
        return {
            "guest house": "guesthouse",
            "night club": "nightclub",
            "swimming pool": "swimmingpool",
            "mutliple sports": "multiple sports",
        }.get(value, value)
    if slot in ("name", "departure", "destination"):
        return re.sub(r"\s+", " ", value.replace("&", " and ").replace(" '", "'")).strip()
    return value


def _canonical_slot(slot: str) -> str:
    slot = slot.lower().replace(" ", "")
    return {"arriveby": "arrive", "leaveat": "leave"}.get(slot, slot)


def normalise_state(state: dict) -> dict:
    """Dialogue state {domain: {slot: value}} with canonical slot names/values and don't-care values dropped."""
    out = {}
    for domain, slots in state.items():
        clean = {}
        for slot, value in slots.items():
            if isinstance(value, list):
                value = value[0] if value else ""
            if str(value).strip().lower() in _DONT_CARE:
                continue
            name = _canonical_slot(slot)
            clean[name] = _canonical_value(name, value)
        out[domain.lower()] = clean
    return out


def _minutes(time: str) -> int:
    # Unreadable times count as 00:00, as in the evaluator (an unreadable "arrive by" then matches no train).
    match = re.match(r"(\d\d):(\d\d)", time)
    return int(match.group(1)) * 60 + int(match.group(2)) if match else 0


@functools.lru_cache(maxsize=None)
def partial_ratio(a: str, b: str) -> int:
    """Best similarity (0–100) of the shorter string against equally long windows of the longer one (difflib)."""
    if not a or not b:
        return 0
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    best = 0.0
    for i, j, _ in difflib.SequenceMatcher(None, short, long).get_matching_blocks():
        start = max(0, j - i)
        ratio = difflib.SequenceMatcher(None, short, long[start : start + len(short)]).ratio()
        if ratio > 0.995:
            return 100
        best = max(best, ratio)
    return int(round(100 * best))


# --------------------------------------------------------------------------------------------------- database


class VenueDatabase:
    """The restaurant/hotel/attraction/train databases with the evaluator's matching rules.

    Exact match on most columns, fuzzy match (partial ratio ≥ 90) on names, food and train stations, trains
    arriving no later / leaving no earlier than asked, '?' entries match anything. Returns venue ids (train ids).
    """

    def __init__(self, data_dir: str | pathlib.Path):
        data_dir = pathlib.Path(data_dir)
        self.rows: dict[str, list[dict]] = {}
        for domain in VENUE_DOMAINS:
            # The evaluator's attraction DB fixes the "mutliple sports" typo of the upstream one.
            path = data_dir / ("mwzeval/database" if domain == "attraction" else "db") / f"{domain}_db.json"
            rows = _read_json(path)
            self.rows[domain] = [
                {
                    _canonical_slot(k): v
                    for k, v in row.items()
                    if k not in _IGNORED_COLUMNS and not isinstance(v, (dict, list))
                }
                for row in rows
            ]
        self._cache: dict = {}

    def query(self, domain: str, constraints: dict) -> list[str]:
        if domain not in VENUE_DOMAINS:
            return []
        key = (domain, tuple(sorted(constraints.items())))
        if key not in self._cache:
            self._cache[key] = self._query(domain, constraints)
        return self._cache[key]

    def _query(self, domain: str, constraints: dict) -> list[str]:
        columns = self.rows[domain][0].keys()
        wanted = {
            k: v
            for k, v in constraints.items()
            if k in columns and k not in ("id",) and str(v).lower() not in _DONT_CARE
        }
        fuzzy = _FUZZY_KEYS[domain]
        results = []
        for row in self.rows[domain]:
            for slot, value in wanted.items():
                have = row.get(slot, "?")
                if have == "?":
                    continue
                if slot == "arrive":
                    if _minutes(have) > _minutes(value):
                        break
                elif slot == "leave":
                    if _minutes(have) < _minutes(value):
                        break
                elif slot in fuzzy:
                    if partial_ratio(str(have).lower(), value) < 90:
                        break
                elif str(have).lower() != value:
                    break
            else:
                results.append(row["trainid"] if domain == "train" else str(row["id"]))
        return results


# ------------------------------------------------------------------------------------------------------ data


_DATA_HINT = "pass --data pointing at the shared multiwoz folder (it holds db/, mwzeval/ and mwz21_convlab3/)"


def _read_json(path: pathlib.Path, missing_hint: str = _DATA_HINT) -> Any:
    if not path.exists():
        raise MultiWOZDataError(f"{path}: file not found; {missing_hint}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as err:
        raise MultiWOZDataError(f"{path}: not readable JSON ({err}); re-fetch the file") from None


@functools.lru_cache(maxsize=4)
def _load_dialogues(data_dir: str, split: str) -> dict:
    if split not in _SPLIT_FILES:
        raise MultiWOZDataError(
            f"unknown MultiWOZ split {split!r}; use one of {sorted(_SPLIT_FILES)} (no training dialogues are on disk)"
        )
    path = pathlib.Path(data_dir) / "mwz21_convlab3" / _SPLIT_FILES[split]
    if not path.exists():
        raise MultiWOZDataError(f"{path}: file not found; pass --data pointing at the shared multiwoz folder")
    with zipfile.ZipFile(path) as archive:
        raw = json.loads(archive.read(archive.namelist()[0]))
    return {key.split(".")[0].lower(): value for key, value in raw.items()}


def load_goals(data_dir, split: str = "test") -> dict:
    """Evaluator-format goals `{dialogue_id: {domain: {informable, requestable, booking}}}` rebuilt from ConvLab goals."""
    goals = {}
    for dialogue_id, dialogue in _load_dialogues(str(data_dir), split).items():
        goal = {}
        for domain in GOAL_DOMAINS:
            spec = dialogue["goal"].get(domain) or {}
            if not spec:
                continue
            informable = {_canonical_slot(k): v for k, v in spec.get("info", {}).items()}
            requestable = sorted(
                {_GOAL_REQUESTABLE[r.lower()] for r in spec.get("reqt", []) if r.lower() in _GOAL_REQUESTABLE}
            )
            booking = {k: v for k, v in spec.get("book", {}).items() if k not in ("pre_invalid", "invalid")}
            if "book" in spec:
                requestable.append("REFERENCE")
            goal[domain] = dict(informable=informable, requestable=requestable, booking=booking or [])
        goals[dialogue_id] = goal
    return goals


def load_booked_domains(data_dir) -> dict:
    """Per dialogue, per system turn, the domains where a booking (reference number) was made."""
    return _read_json(pathlib.Path(data_dir) / "mwzeval" / "booked_domains.json.gz")


def _convlab_state(metadata: dict) -> dict:
    state = {}
    for domain, parts in metadata.items():
        slots = dict(parts.get("semi", {}))
        slots.update({f"book{k}": v for k, v in parts.get("book", {}).items() if k != "booked"})
        slots = {k: v for k, v in slots.items() if isinstance(v, str) and v.strip().lower() not in _DONT_CARE}
        if slots:
            state[domain] = slots
    return state


def _delexicalise(turn: dict) -> str:
    words = turn["text"].split(" ")
    spans = sorted((s for s in turn.get("span_info", []) if isinstance(s[3], int)), key=lambda s: s[3])
    out, position = [], 0
    for act, slot, value, start, end in spans:
        if start < position or str(value).lower() == "dontcare" or end >= len(words):
            continue
        out.extend(words[position:start])
        out.append(f"[{act.split('-')[0].lower()}_{slot.lower()}]")
        position = end + 1
    out.extend(words[position:])
    return " ".join(out)


def gold_states(data_dir, split: str = "test") -> dict:
    """ConvLab belief states per system turn `{dialogue_id: [state, ...]}` (stand-in for the 2.2 gold states)."""
    return {
        dialogue_id: [_convlab_state(turn.get("metadata") or {}) for turn in dialogue["log"][1::2]]
        for dialogue_id, dialogue in _load_dialogues(str(data_dir), split).items()
    }


def human_references(data_dir, split: str = "test") -> dict:
    """The delexicalised human system turns with ConvLab states, in the evaluator's input format (no domains)."""
    states = gold_states(data_dir, split)
    return {
        dialogue_id: [
            dict(response=_delexicalise(turn), state=state)
            for turn, state in zip(dialogue["log"][1::2], states[dialogue_id])
        ]
        for dialogue_id, dialogue in _load_dialogues(str(data_dir), split).items()
    }


# ------------------------------------------------------------------------------------------------- scoring


def estimate_active_domains(states: list[dict]) -> list[list[str]]:
    """Active domain per turn from state changes (the standard evaluator's heuristic for systems without domains)."""
    current, previous, previous_changed = None, {}, []
    domains = []
    for state in states:
        changed = [d for d in state if set(state[d].items()) - set(previous.get(d, {}).items())]
        if not changed:
            if current is None:
                domains.append([])
                continue
            if len(previous_changed) > 1:
                others = [d for d in previous_changed if d in state and d != current]
                if others:
                    current = others[0]
        elif current not in changed:
            current = max(changed, key=lambda d: len(state[d]))
        previous, previous_changed = state, changed
        domains.append([current])
    return domains


def dialogue_inform_success(
    goal: dict,
    booked: list,
    responses: list[str],
    states: list[dict],
    domains: list[list[str]],
    database: VenueDatabase,
) -> tuple[dict, dict]:
    """Per-domain and total Inform / Success of one dialogue (normalised responses and states)."""
    wanted = {d: set(goal[d]["requestable"]) for d in goal}
    offered: dict[str, Any] = {d: [] for d in goal}
    provided = {d: set() for d in goal}
    for response, state, booked_now, active in zip(responses, states, booked, domains):
        for domain in goal:
            if domain not in active:
                continue
            names_venue = ("NAME" in response and domain in ("restaurant", "hotel", "attraction")) or (
                "TRAINID" in response and domain == "train"
            )
            if names_venue:
                venues = database.query(domain, state[domain]) if domain in state else []
                if not offered[domain] or any(v not in venues for v in offered[domain]):
                    offered[domain] = venues
            for token in REQUESTABLE_TOKENS:
                if token in response and (token != "REFERENCE" or domain in booked_now):
                    provided[domain].add(token)
    inform = {}
    for domain in goal:
        if "name" in goal[domain]["informable"] or domain in NO_VENUE_DOMAINS:
            inform[domain] = True
        elif domain == "train" and not offered["train"] and "TRAINID" not in wanted["train"]:
            inform[domain] = True
        elif offered[domain]:
            goal_venues = set(database.query(domain, normalise_state({domain: goal[domain]["informable"]})[domain]))
            inform[domain] = set(offered[domain]) <= goal_venues
        else:
            inform[domain] = False
    inform["total"] = all(inform.values())
    success = {}
    if inform["total"]:
        success = {d: wanted[d] <= provided[d] for d in goal}
        success["total"] = all(success.values())
    return inform, success


def _validate(predictions: dict, goals: dict, booked: dict, reference_turns: dict, split: str) -> dict:
    if not isinstance(predictions, dict) or not predictions:
        raise MultiWOZDataError("predictions: expected a non-empty JSON object {dialogue_id: [turn, ...]}")
    clean = {}
    for raw_id, turns in predictions.items():
        dialogue_id = raw_id.split(".")[0].lower()
        if dialogue_id not in goals:
            raise MultiWOZDataError(
                f"predictions: dialogue {raw_id!r} is not in the MultiWOZ {split} split; score "
                "each split separately (--split)"
            )
        if not isinstance(turns, list) or any(not isinstance(t, dict) or "response" not in t for t in turns):
            raise MultiWOZDataError(f"predictions[{raw_id!r}]: expected a list of {{'response': ...}} objects")
        if len(turns) != reference_turns[dialogue_id]:
            raise MultiWOZDataError(
                f"predictions[{raw_id!r}]: {len(turns)} turns, but the dialogue has "
                f"{reference_turns[dialogue_id]} system turns; give one entry per system turn"
            )
        if dialogue_id not in booked:
            raise MultiWOZDataError(f"booked_domains.json.gz has no entry for {dialogue_id!r}; re-fetch the file")
        clean[dialogue_id] = [dict(t) for t in turns]
    return clean


def evaluate(predictions: dict, data_dir, *, split: str = "test", bleu: bool = True) -> dict:
    """Scores predictions in the standard evaluator format; returns the JSON-able report (rates in percent)."""
    data_dir = pathlib.Path(data_dir)
    goals = load_goals(data_dir, split)
    booked = load_booked_domains(data_dir)
    dialogues = _load_dialogues(str(data_dir), split)
    reference_turns = {k: len(v["log"][1::2]) for k, v in dialogues.items()}
    data = _validate(predictions, goals, booked, reference_turns, split)
    database = VenueDatabase(data_dir)

    used_gold_states = not all("state" in t for turns in data.values() for t in turns)
    used_estimated_domains = not all("active_domains" in t for turns in data.values() for t in turns)
    states = gold_states(data_dir, split) if used_gold_states else None
    per_domain_total: dict[str, int] = {}
    inform_count: dict[str, int] = {}
    success_count: dict[str, int] = {}
    for dialogue_id, turns in data.items():
        responses = [normalise_response(t["response"]) for t in turns]
        turn_states = [
            normalise_state(s) for s in (states[dialogue_id] if used_gold_states else [t["state"] for t in turns])
        ]
        domains = (
            estimate_active_domains(turn_states)
            if used_estimated_domains
            else [[d.lower() for d in t["active_domains"]] for t in turns]
        )
        inform, success = dialogue_inform_success(
            goals[dialogue_id], booked[dialogue_id], responses, turn_states, domains, database
        )
        for domain in set(inform) | set(success):
            per_domain_total[domain] = per_domain_total.get(domain, 0) + 1
            inform_count[domain] = inform_count.get(domain, 0) + int(inform.get(domain, False))
            success_count[domain] = success_count.get(domain, 0) + int(success.get(domain, False))

    n = len(data)
    # Success per domain is only defined for informed dialogues; "total" rates are over all scored dialogues.
    report = dict(
        split=split,
        num_dialogues=n,
        inform=round(100.0 * inform_count["total"] / n, 2),
        success=round(100.0 * success_count.get("total", 0) / n, 2),
        inform_per_domain={
            d: round(100.0 * inform_count[d] / per_domain_total[d], 2) for d in sorted(inform_count) if d != "total"
        },
        success_per_domain={
            d: round(100.0 * success_count[d] / per_domain_total[d], 2) for d in sorted(success_count) if d != "total"
        },
        states="convlab-gold (prediction file has no states)" if used_gold_states else "predicted",
        active_domains="estimated from state changes" if used_estimated_domains else "predicted",
    )
    if bleu:
        refs = human_references(data_dir, split)
        hyps, ref_texts = [], []
        for dialogue_id, turns in data.items():
            for turn, ref in zip(turns, refs[dialogue_id]):
                hyps.append(normalise_response(turn["response"]))
                ref_texts.append(normalise_response(ref["response"]))
        report["bleu"] = round(sacrebleu.corpus_bleu(hyps, [ref_texts]).score, 2)
        report["bleu_reference_set"] = (
            f"ConvLab-3 MultiWOZ {split} system turns delexicalised with their span_info "
            "(not the canonical mwz22 references; comparable only within this scorer)"
        )
        report["combined"] = round(report["bleu"] + 0.5 * (report["inform"] + report["success"]), 2)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", help="JSON (or .json.gz) in the standard evaluator format")
    source.add_argument(
        "--human-references",
        action="store_true",
        help="score the delexicalised human responses of the split (gold-like input)",
    )
    parser.add_argument("--data", required=True, help="the MultiWOZ data folder (shared/data/multiwoz)")
    parser.add_argument("--split", default="test", choices=sorted(_SPLIT_FILES))
    parser.add_argument("--no-bleu", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.human_references:
            predictions = human_references(args.data, args.split)
            # Gold-like input: the states are the annotations, the active domains estimated like any state-only system.
            for turns in predictions.values():
                for turn in turns:
                    turn.pop("active_domains", None)
        else:
            predictions = _read_json(pathlib.Path(args.predictions), "check the --predictions path")
        report = evaluate(predictions, args.data, split=args.split, bleu=not args.no_bleu)
    except MultiWOZDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
