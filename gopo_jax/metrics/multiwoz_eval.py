"""MultiWOZ Inform / Success / BLEU / Combined with the standardised definitions of Nekvinda & Dušek (2021).

Input is the standard evaluator format `{dialogue_id: [{"response": str, "state"?: {...}, "active_domains"?: [...]},
...]}` with one entry per system turn and delexicalised responses (`[restaurant_name]`, `[value_phone]`, ...).

What the scorer does (written for this project to the rules of the standard evaluator, mwzeval; its code is not
copied, but its lookup tables — placeholder names, value spellings — are reproduced as data so that scores match;
scripts/multiwoz_published.py checks the published systems in the shared data, docs/metrics.md lists what still
differs):
- Responses are lower-cased, placeholders are mapped to the evaluator's slot tokens (NAME, PHONE, POST, ADDRESS,
  REFERENCE, TRAINID, ...; a plural suffix `-s`/`s`/`es` after the bracket is absorbed; a name outside the
  evaluator's table becomes nothing, as there, and is counted in the report), `-s`/`-ly` split suffixes are
  removed and spacing around punctuation is normalised.
- States: slot names canonical (`arriveBy` → `arrive`, `leaveAt` → `leave`), values as the evaluator reads them:
  times to HH:MM, venue names and food through its alias tables, `guest house` → `guesthouse`, parking /
  internet `free` → `yes`. Don't-care values stay in the state (they change the active domain) and are skipped
  by the database query; any other value constrains it ("none" and "" match no venue, as there).
- Inform: per goal domain, the venues the system last offered (database look-up with the turn's dialogue state
  whenever a NAME / TRAINID token is produced while the domain is active; the offered set is replaced when it
  stops being a subset of the new look-up) must be a subset of the venues matching the goal's constraints.
  Domains whose goal names the venue, taxi/police/hospital, and train when no train was offered and the train id
  was not requested, count as matched. A dialogue is informed when every goal domain matches.
- Success: informed, and every requestable of every goal domain (PHONE, ADDRESS, POST, TRAINID, and REFERENCE
  when the goal books) was produced as a token while the domain was active; REFERENCE only counts on turns where
  the data say a booking happened (`mwzeval/booked_domains.json.gz`).
- Missing `state`: the ConvLab belief state annotated on the reference system turn is used (the canonical
  MultiWOZ 2.2 gold states are not on disk). Missing `active_domains`: when the responses' placeholders name
  domains (`[hotel_name]`), each turn's domains are the ones its placeholders name (the evaluator's
  add_slot_domains.py, which its README asks such systems to run); otherwise they are estimated from state changes
  as in the evaluator (the domain whose state changed; ties keep the current one, else the one with most slots).
- A dialogue with fewer turns than the reference is scored on the turns given (the evaluator pairs turns up to the
  shorter list); the report counts such dialogues. More turns than the reference is an error.
- BLEU: sacreBLEU corpus BLEU of the normalised responses against ONE reference set, the ConvLab-3 MultiWOZ
  test/val system turns delexicalised with their own `span_info` annotations (word spans → `[slot]`) and
  normalised the same way. This is NOT the canonical `mwz22` reference set (built from the absent 2.2
  `dialog_acts.json`), so BLEU is comparable across systems scored here, not to published BLEU.
- Combined = BLEU + 0.5 · (Inform + Success), rates in percent.

Goals are rebuilt from the ConvLab `goal` field of the real dialogues (the evaluator's goals.json is absent):
informable = `info` (leaveAt→leave, arriveBy→arrive), requestable = `reqt` ∩ {phone, address, postcode,
trainID} as tokens, plus REFERENCE when the goal has a `book` section; booking = `book` minus pre_invalid/invalid.

Command line: `python -m gopo_jax.metrics.multiwoz_eval --predictions FILE[.gz] --data DIR [--split test]
[--nobleu]` prints a JSON report; `--human_references` scores the delexicalised human responses instead of a file.
"""

import collections
import functools
import gzip
import json
import pathlib
import re
import zipfile
import zlib
from typing import Any

import sacrebleu
from absl import flags
from rapidfuzz import fuzz

from gopo_jax import command_line

VENUE_DOMAINS = ("restaurant", "hotel", "attraction", "train")
NO_VENUE_DOMAINS = ("taxi", "police", "hospital")
GOAL_DOMAINS = VENUE_DOMAINS + NO_VENUE_DOMAINS
REQUESTABLE_TOKENS = ("PHONE", "ADDRESS", "POST", "REFERENCE", "TRAINID")
_GOAL_REQUESTABLE = {"phone": "PHONE", "address": "ADDRESS", "postcode": "POST", "trainid": "TRAINID"}
# The values the evaluator's database query treats as "no constraint" (compared before normalisation, exactly).
_QUERY_DONT_CARE = frozenset({"dontcare", "not mentioned", "don't care", "dont care", "do n't care", "do not care"})
# Empty and don't-care values of the ConvLab belief states; the 2.2 gold states they stand in for have neither.
_CONVLAB_EMPTY = _QUERY_DONT_CARE | {"", "none"}
_FUZZY_KEYS = {
    "restaurant": {"name", "food"},
    "hotel": {"name"},
    "attraction": {"name"},
    "train": {"departure", "destination"},
}
_FUZZY_THRESHOLD = 90
# Database columns the evaluator does not match on (free text, coordinates, nested prices).
_IGNORED_COLUMNS = {"location", "openhours", "introduction", "signature", "takesbookings"}
_SPLIT_FILES = {"test": "test.json.zip", "val": "val.json.zip", "validation": "val.json.zip", "dev": "val.json.zip"}


# The evaluator's placeholder names per slot token: exactly these names are understood, so that a system is
# credited for the same placeholders as there (e.g. `[booking_reference]` or `[restaurant_addr]` are not).
_TOKEN_NAMES = {
    "ADDRESS": "address attraction_address hospital_address hotel_address police_address restaurant_address "
    "value_address".split(),
    "AREA": "area value_area attraction_area restaurant_area hotel_area".split(),
    "TIME": "booktime value_time time duration value_duration train_duration arriveby taxi_arriveby value_arrive "
    "train_arriveby leaveat value_leave train_leaveat train_leave train_arrive taxi_leaveat".split()
    + ["arrive by", "leave at"],
    "DAY": "day value_day bookday train_day".split(),
    "PLACE": "destination value_destination departure value_departure value_place train_departure train_destination "
    "taxi_destination taxi_departure".split(),
    "FOOD": "food value_food restaurant_food".split(),
    "NAME": "name attraction_name hospital_name hotel_name police_name restaurant_name value_name".split(),
    "PHONE": "phone attraction_phone hospital_phone hotel_phone police_phone restaurant_phone taxi_phone "
    "value_phone".split(),
    "POST": "postcode attraction_postcode hospital_postcode hotel_postcode restaurant_postcode value_postcode "
    "police_postcode".split(),
    "PRICE": "price value_price entrancefee train_price attraction_entrancefee pricerange value_pricerange "
    "restaurant_pricerange hotel_pricerange attraction_pricerange attraction_price".split()
    + ["entrance fee", "price range"],
    "REFERENCE": "ref attraction_reference hotel_reference restaurant_reference train_reference value_reference "
    "reference".split(),
    "COUNT": "stars value_stars hotel_stars bookstay value_stay stay bookpeople value_people people choice "
    "value_choice value_count attraction_choice hotel_choice restaurant_choice train_choice".split(),
    "TYPE": "type taxi_type taxi_car value_type value_car car restaurant_type hotel_type attraction_type".split(),
    "TRAINID": "trainid train_id value_id id train train_trainid".split(),
    "INTERNET": "internet hotel_internet".split(),
    "PARKING": "parking hotel_parking".split(),
    "ID": "hospital_id attraction_id restaurant_id".split(),
    "DEPARTMENT": "value_department department hospital_department".split(),
    "OPEN": ["openhours"],
}
_SLOT_TOKENS = {name: token for token, names in _TOKEN_NAMES.items() for name in names}
# Names of the table that say their domain (`hotel_name`): a system delexicalising with them knows each turn's domain.
_DOMAIN_NAMED = frozenset(name for name in _SLOT_TOKENS if name.partition("_")[0] in GOAL_DOMAINS and "_" in name)
_PLACEHOLDER = re.compile(r"\[([\w\s]+)\](?:-es|-s|es|s)?")
_PLACEHOLDER_NAME = re.compile(r"\[([\w\s]+)\]")

# Value spellings of the MultiWOZ data that the evaluator maps to the database's (its tables, kept as they are —
# "seven o'clock tomorrow evening" → 07:00 included — so that scores match). Two venue aliases map a name the
# database has ("the junction", "parkside pools") to one it lacks, so a state naming either venue matches nothing:
# the published scores include that (dropping the two moves LAVA, MarCo and SFN by 0.3), so `evaluate` keeps it,
# and `normalise_state` applies the venue aliases only when asked.
_NAME_ALIASES = {
    "hotel du vin bistro": "hotel du vin and bistro",
    "the river bar and grill": "the river bar steakhouse and grill",
    "nando's": "nandos",
    "city center b and b": "city center north b and b",
    "acorn house": "acorn guest house",
    "caffee uno": "caffe uno",
    "cafe uno": "caffe uno",
    "rosa's": "rosas bed and breakfast",
    "restaurant called two two": "restaurant two two",
    "restaurant 2 two": "restaurant two two",
    "restaurant two 2": "restaurant two two",
    "restaurant 2 2": "restaurant two two",
    "restaurant 1 7": "restaurant one seven",
    "restaurant 17": "restaurant one seven",
    "lime house": "limehouse",
    "cityrooms": "cityroomz",
    "whale of time": "whale of a time",
    "huntingdon hotel": "huntingdon marriott hotel",
    "holiday inn exlpress, cambridge": "express by holiday inn cambridge",
    "university hotel": "university arms hotel",
    "arbury guesthouse and lodge": "arbury lodge guesthouse",
    "bridge house": "bridge guest house",
    "arbury guesthouse": "arbury lodge guesthouse",
    "nandos in the city centre": "nandos city centre",
    "broughton gallery": "broughton house gallery",
    "scudamores punt co": "scudamores punting co",
    "cambridge botanic gardens": "cambridge university botanic gardens",
    "the junction": "junction theatre",
    "trinity street college": "trinity college",
    "christ college": "christ's college",
    "christs": "christ's college",
    "history of science museum": "whipple museum of the history of science",
    "parkside pools": "parkside swimming pool",
    "the botanical gardens at cambridge university": "cambridge university botanic gardens",
    "cafe jello museum": "cafe jello gallery",
}
_FOOD_ALIASES = {
    "eriterean": "mediterranean",
    "brazilian": "portuguese",
    "sea food": "seafood",
    "portugese": "portuguese",
    "modern american": "north american",
    "americas": "north american",
    "intalian": "italian",
    "italain": "italian",
    "asian or oriental": "asian",
    "english": "british",
    "australasian": "australian",
    "gastropod": "gastropub",
    "brutish": "british",
    "bristish": "british",
    "europeon": "european",
}
_TYPE_ALIASES = {
    "swimming pool": "swimmingpool",
    "mutliple sports": "multiple sports",
    "night club": "nightclub",
    "guest house": "guesthouse",
}
_TIME_ALIASES = {
    "afternoon": "13:00",
    "lunch": "12:00",
    "noon": "12:00",
    "mid-day": "12:00",
    "around lunch time": "12:00",
    "morning": "08:00",
    "seven o'clock tomorrow evening": "07:00",
    "three forty five p.m": "15:45",
    "one thirty p.m.": "13:30",
    "six fourty five": "06:45",
    "eight thirty": "08:30",
}
_TIME_PREFIX_ALIASES = (("one o'clock p.m", "13:00"), ("ten o'clock a.m", "10:00"))


class MultiWOZDataError(ValueError):
    """Missing or malformed MultiWOZ data or predictions; the message names the file/dialogue and the fix."""


# What reading a damaged archive raises: a bad header (BadZipFile, OSError), a corrupt deflate stream (zlib.error),
# a cut-off member (EOFError), a flipped compression or encryption flag (NotImplementedError, RuntimeError).
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, RuntimeError)
# What json.loads raises beyond JSONDecodeError: UnicodeDecodeError and, for an integer past Python's digit limit,
# ValueError (both ValueErrors); RecursionError for nesting past the interpreter's limit.
JSON_ERRORS = (ValueError, RecursionError)


# ----------------------------------------------------------------------------------------------- normalisation


def _slot_token(placeholder: str, unknown: collections.Counter | None) -> str:
    name = placeholder.lower()
    token = _SLOT_TOKENS.get(name, "")
    if not token and unknown is not None:
        unknown[name] += 1
    return token


def normalise_response(text: str, unknown_placeholders: collections.Counter | None = None) -> str:
    """Lower-case, placeholders → slot tokens, drop `-s`/`-ly` split suffixes, normalise spacing around punctuation.

    Placeholder names outside the evaluator's table become "" (as there) and are counted in `unknown_placeholders`.
    """
    text = _PLACEHOLDER.sub(lambda m: _slot_token(m.group(1), unknown_placeholders), text.lower())
    text = text.replace("-s", "").replace("-ly", "")
    text = re.sub(r"\s+([.,!?;:%)])", r"\1", text)  # "word ." → "word."
    text = re.sub(r"([($])\s+", r"\1", text)
    text = re.sub(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", text)  # tokenised contractions "do n't" → "don't"
    return re.sub(r"\s+", " ", text).strip()


def placeholder_domains(response: str) -> list[str]:
    """The goal domains named by a response's placeholders (`[hotel_name]` → hotel), add_slot_domains.py's rule."""
    named = {name.split("_")[0] for name in _PLACEHOLDER_NAME.findall(response.lower())}
    return [domain for domain in GOAL_DOMAINS if domain in named]


def _canonical_time(value: str) -> str:
    """Free-form time → HH:MM by the evaluator's rules ("after 5:30 pm" → 17:30, "1045" → 10:45, "7" → 07:00).

    What they cannot read comes back as written (it then counts as 00:00). Its quirks are kept so that scores match:
    "12 pm" reads as 24:00 and "by" drops three characters.
    """
    text = value.strip().lower()
    if text in _TIME_ALIASES:
        return _TIME_ALIASES[text]
    for prefix, time in _TIME_PREFIX_ALIASES:
        if text.startswith(prefix):
            return time
    if text.startswith("by"):
        text = text[3:]
    if text.startswith("after"):
        text = text[5:].strip()
    if text.startswith("afer"):
        text = text[4:].strip()
    for suffix in ("am", "a.m."):
        if text.endswith(suffix):
            text = text[: -len(suffix)].strip()
    if text.endswith(("pm", "p.m.")):
        for suffix in ("pm", "p.m."):
            if text.endswith(suffix):
                text = text[: -len(suffix)].strip()
        parts = text.split(":")
        if len(parts) == 2 and parts[0].isdigit():
            return f"{int(parts[0]) + 12}:{parts[1]}"
        if len(parts) == 1 and text.isdigit():
            return f"{int(text) + 12}:00"
    if not text:
        return "00:00"
    if text[-1] in ".,?":
        text = text[:-1]
    if text.isdigit():
        return f"{text[:2]}:{text[2:]}" if len(text) == 4 else f"{text.zfill(2)}:00"
    if ":" in text:
        text = text.replace(" ", "")
    if len(text) == 4 and text[1] == ":":
        return f"0{text}"
    return text


def _canonical_name(value: str, aliases: bool) -> str:
    name = value.strip().lower().replace(" & ", " and ").replace("&", " and ").replace(" '", "'")
    return _NAME_ALIASES.get(name, name) if aliases else name


def _canonical_value(slot: str, value: Any, name_aliases: bool = False) -> str:
    """A state or goal value as the evaluator compares it with the database (`slot` already canonical)."""
    value = str(value)
    if slot in ("name", "departure", "destination"):
        return _canonical_name(value, name_aliases)
    if slot == "type":
        return _TYPE_ALIASES.get(value, value)
    if slot == "food":
        food = value.strip().lower()
        return _FOOD_ALIASES.get(food, food)
    if slot in ("arrive", "leave", "time"):
        return _canonical_time(value)
    if slot in ("parking", "internet"):
        return "yes" if value == "free" else value
    return value


def _canonical_slot(slot: str) -> str:
    slot = slot.lower().replace(" ", "")
    return {"arriveby": "arrive", "leaveat": "leave"}.get(slot, slot)


def normalise_state(state: dict, *, name_aliases: bool = False) -> dict:
    """Dialogue state {domain: {slot: value}} with canonical slot names and values (don't-care values kept).

    `name_aliases`: also map venue names through the evaluator's alias table, as `evaluate` does (see `_NAME_ALIASES`
    for why a world built on the database leaves it off).
    """
    out = {}
    for domain, slots in state.items():
        clean = {}
        for slot, value in slots.items():
            if isinstance(value, list):  # 2.2-style alternatives: the first, as the evaluator's gold states take
                value = value[0] if value else ""
            name = _canonical_slot(slot)
            clean[name] = _canonical_value(name, value, name_aliases)
        out[domain.lower()] = clean
    return out


def _minutes(time: str) -> int:
    # Unreadable times count as 00:00, as in the evaluator (an unreadable "arrive by" then matches no train).
    match = re.match(r"(\d\d):(\d\d)", time)
    return int(match.group(1)) * 60 + int(match.group(2)) if match else 0


@functools.lru_cache(maxsize=None)
def partial_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.partial_ratio`, which the evaluator calls: the similarity (0–100) of the shorter string to
    its best-aligned window of the longer one (rapidfuzz), rounded to an integer; equal strings 100, an empty one 0."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(fuzz.partial_ratio(a, b)))


# --------------------------------------------------------------------------------------------------- database


class VenueDatabase:
    """The restaurant/hotel/attraction/train databases with the evaluator's matching rules.

    Constraints are normalised as states are (without the venue aliases; raw goal values work too), don't-care
    values are skipped;
    exact match on most columns, fuzzy match (partial ratio ≥ 90) on names, food and train stations, trains
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
                for row in _checked_venues(rows, path, "trainID" if domain == "train" else "id")
            ]
        self._cache: dict = {}

    def query(self, domain: str, constraints: dict) -> list[str]:
        if domain not in VENUE_DOMAINS:
            return []
        key = (domain, tuple(sorted((k, str(v)) for k, v in constraints.items())))
        if key not in self._cache:
            self._cache[key] = self._query(domain, constraints)
        return self._cache[key]

    def _query(self, domain: str, constraints: dict) -> list[str]:
        # The columns of the first row are the queryable ones, as in the evaluator.
        columns = self.rows[domain][0].keys()
        wanted = {
            slot: _canonical_value(slot, value)
            for slot, value in ((_canonical_slot(k), v) for k, v in constraints.items())
            if slot in columns and str(value) not in _QUERY_DONT_CARE
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
                    if partial_ratio(str(have), value) < _FUZZY_THRESHOLD:
                        break
                elif str(have) != value:
                    break
            else:
                results.append(row["trainid"] if domain == "train" else str(row["id"]))
        return results


def _checked_venues(rows: Any, path: pathlib.Path, id_column: str) -> list:
    """The database rows: a non-empty list of venue objects with an id and text values (the columns of the first
    row are the queryable ones, and every comparison reads a value as text)."""
    if not isinstance(rows, list) or not rows:
        raise MultiWOZDataError(f"{path}: expected a non-empty list of venue objects; re-fetch the file")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(id_column), str):
            raise MultiWOZDataError(f"{path}: venue #{i} is not an object with a {id_column!r} string; re-fetch it")
        bad = next((k for k, v in row.items() if not isinstance(v, (str, dict, list))), None)
        if bad is not None:
            raise MultiWOZDataError(f"{path}: venue #{i} ({row[id_column]!r}): column {bad!r} is {row[bad]!r:.40}, "
                                    "expected a string; re-fetch the file")
    return rows


# ------------------------------------------------------------------------------------------------------ data


_DATA_HINT = "pass --data pointing at the shared multiwoz folder (it holds db/, mwzeval/ and mwz21_convlab3/)"


def _read_json(path: pathlib.Path, missing_hint: str = _DATA_HINT) -> Any:
    if not path.exists():
        raise MultiWOZDataError(f"{path}: file not found; {missing_hint}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return json.load(f)
    except (*JSON_ERRORS, OSError, EOFError, zlib.error) as err:  # EOFError, zlib.error: a cut or corrupt .gz
        raise MultiWOZDataError(f"{path}: not readable JSON ({err}); re-fetch the file") from None


def read_zipped_dialogues(path: pathlib.Path, error: type[Exception]) -> dict:
    """The {dialogue_id: {goal, log}} object in the first .json member of the existing zip archive `path` (ConvLab-3's
    MultiWOZ 2.1 files); a broken archive, malformed JSON or an empty object raise the caller's `error` type."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(".json")]
            if not names:
                raise error(f"{path}: the archive holds no .json file; re-fetch it")
            raw = archive.read(names[0])
    except ZIP_ERRORS as err:
        raise error(f"{path}: not a readable zip archive ({err}); re-fetch the file") from None
    try:
        dialogues = json.loads(raw)
    except JSON_ERRORS as err:
        raise error(f"{path}: the dialogue JSON inside is malformed ({err}); re-fetch the file") from None
    if not isinstance(dialogues, dict) or not dialogues:
        raise error(f"{path}: expected a non-empty object {{dialogue_id: {{goal, log}}}}; re-fetch it")
    return dialogues


@functools.lru_cache(maxsize=4)
def _load_dialogues(data_dir: str, split: str) -> dict:
    if split not in _SPLIT_FILES:
        raise MultiWOZDataError(
            f"unknown MultiWOZ split {split!r}; use one of {sorted(_SPLIT_FILES)} (no training dialogues are on disk)"
        )
    path = pathlib.Path(data_dir) / "mwz21_convlab3" / _SPLIT_FILES[split]
    if not path.exists():
        raise MultiWOZDataError(f"{path}: file not found; {_DATA_HINT}")
    dialogues = read_zipped_dialogues(path, MultiWOZDataError)
    for key, dialogue in dialogues.items():
        _check_dialogue(dialogue, f"{path}: dialogue {key!r}")
    return {key.split(".")[0].lower(): value for key, value in dialogues.items()}


def _check_dialogue(dialogue: Any, where: str) -> None:
    """The parts of a ConvLab dialogue the scorer reads: goal specs, turn texts, span annotations, belief states."""
    if not isinstance(dialogue, dict) or not isinstance(dialogue.get("goal"), dict) or not isinstance(
            dialogue.get("log"), list):
        raise MultiWOZDataError(f"{where}: expected an object with a 'goal' object and a 'log' list")
    for domain in GOAL_DOMAINS:
        spec = dialogue["goal"].get(domain) or {}
        reqt = spec.get("reqt", []) if isinstance(spec, dict) else None
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k, {}), dict) for k in ("info", "book")) \
                or not (isinstance(reqt, list) and all(isinstance(r, str) for r in reqt)):
            raise MultiWOZDataError(f"{where}: goal[{domain!r}] must be an object with 'info' and 'book' objects "
                                    "and a 'reqt' list of names")
    for i, turn in enumerate(dialogue["log"]):
        at = f"{where}, log[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str):
            raise MultiWOZDataError(f"{at}: expected an object with a 'text' string")
        spans = turn.get("span_info", [])
        if not isinstance(spans, list) or not all(
                isinstance(s, list) and len(s) == 5 and isinstance(s[1], str) and isinstance(s[3], int)
                and isinstance(s[4], int) for s in spans):
            raise MultiWOZDataError(f"{at}: 'span_info' must be a list of [act, slot, value, start word, end word]")
        metadata = turn.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(parts, dict) and all(isinstance(parts.get(k, {}), dict) for k in ("semi", "book"))
                for parts in metadata.values()):
            raise MultiWOZDataError(f"{at}: 'metadata' must map domains to {{'semi': {{...}}, 'book': {{...}}}}")


def load_goals(data_dir, split: str = "test") -> dict:
    """Evaluator-format goals `{dialogue_id: {domain: {informable, requestable, booking}}}` from the ConvLab goals."""
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


def _booked_path(data_dir) -> pathlib.Path:
    return pathlib.Path(data_dir) / "mwzeval" / "booked_domains.json.gz"


def load_booked_domains(data_dir) -> dict:
    """Per dialogue, per system turn, the domains where a booking (reference number) was made."""
    path = _booked_path(data_dir)
    booked = _read_json(path)
    if not isinstance(booked, dict):
        raise MultiWOZDataError(f"{path}: expected an object {{dialogue_id: [[domain, ...] per turn]}}; re-fetch it")
    for dialogue_id, turns in booked.items():
        if not isinstance(turns, list) or not all(
                isinstance(t, list) and all(isinstance(d, str) for d in t) for t in turns):
            raise MultiWOZDataError(f"{path}: dialogue {dialogue_id!r}: expected a list of domain lists, one per "
                                    "system turn; re-fetch the file")
    return booked


def _convlab_state(metadata: dict) -> dict:
    state = {}
    for domain, parts in metadata.items():
        slots = dict(parts.get("semi", {}))
        slots.update({f"book{k}": v for k, v in parts.get("book", {}).items() if k != "booked"})
        slots = {k: v for k, v in slots.items() if isinstance(v, str) and v.strip().lower() not in _CONVLAB_EMPTY}
        if slots:
            state[domain] = slots
    return state


# ConvLab span slot names → the MultiWOZ 2.2 names the canonical references are delexicalised with (and which the
# evaluator's placeholder table knows); the rest are the same word lower-cased.
_CONVLAB_SPAN_SLOTS = {
    "addr": "address",
    "post": "postcode",
    "fee": "entrancefee",
    "price": "pricerange",
    "ticket": "price",
    "car": "type",
    "arrive": "arriveby",
    "leave": "leaveat",
    "depart": "departure",
    "dest": "destination",
    "id": "trainid",
}


def _delexicalise(turn: dict) -> str:
    words = turn["text"].split(" ")
    spans = sorted((s for s in turn.get("span_info", []) if isinstance(s[3], int)), key=lambda s: s[3])
    out, position = [], 0
    for _, slot, value, start, end in spans:
        if start < position or str(value).lower() == "dontcare" or end >= len(words):
            continue
        out.extend(words[position:start])
        out.append(f"[{_CONVLAB_SPAN_SLOTS.get(slot.lower(), slot.lower())}]")
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
    """The delexicalised human system turns with ConvLab states, in the evaluator's input format (no domains).

    Placeholders carry no domain (`[name]`), as in the canonical 2.2 references, so active domains are estimated
    from the states as the evaluator does for them.
    """
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
            inform[domain] = set(offered[domain]) <= set(database.query(domain, goal[domain]["informable"]))
        else:
            inform[domain] = False
    inform["total"] = all(inform.values())
    success = {}
    if inform["total"]:
        success = {d: wanted[d] <= provided[d] for d in goal}
        success["total"] = all(success.values())
    return inform, success


def _check_turn(turn: dict, where: str) -> None:
    """A predicted turn: a response string, and where given a state {domain: {slot: value}} and a list of domains."""
    if not isinstance(turn["response"], str):
        raise MultiWOZDataError(f"{where}: 'response' must be a string, got {turn['response']!r:.60}")
    state = turn.get("state", {})
    if not isinstance(state, dict) or not all(isinstance(slots, dict) for slots in state.values()):
        raise MultiWOZDataError(f"{where}: 'state' must be an object {{domain: {{slot: value}}}}, got {state!r:.60}")
    domains = turn.get("active_domains", [])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise MultiWOZDataError(f"{where}: 'active_domains' must be a list of domain names, got {domains!r:.60}")


def _validate(predictions: dict, goals: dict, booked: dict, reference_turns: dict, split: str,
              booked_path: pathlib.Path) -> dict:
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
        for i, turn in enumerate(turns):
            _check_turn(turn, f"predictions[{raw_id!r}][{i}]")
        if len(turns) > reference_turns[dialogue_id]:
            raise MultiWOZDataError(
                f"predictions[{raw_id!r}]: {len(turns)} turns, but the dialogue has "
                f"{reference_turns[dialogue_id]} system turns; give one entry per system turn"
            )
        if dialogue_id not in booked:
            raise MultiWOZDataError(f"{booked_path} has no entry for {dialogue_id!r}; re-fetch the file")
        clean[dialogue_id] = [dict(t) for t in turns]
    if not any(clean.values()):
        raise MultiWOZDataError("predictions: every dialogue's turn list is empty, so there is nothing to score; "
                                "give one {'response': ...} per system turn")
    return clean


def _active_domains(data: dict, turn_states: dict, from_states: bool) -> tuple[dict, str]:
    """Active domains per dialogue turn, and how they were obtained (see the module docstring)."""
    if from_states:
        return {k: estimate_active_domains(states) for k, states in turn_states.items()}, "estimated from state changes"
    if all("active_domains" in t for turns in data.values() for t in turns):
        return {k: [[d.lower() for d in t["active_domains"]] for t in turns] for k, turns in data.items()}, "predicted"
    responses = [t["response"].lower() for turns in data.values() for t in turns]
    names = {name for response in responses for name in _PLACEHOLDER_NAME.findall(response)}
    if names & _DOMAIN_NAMED:
        return (
            {k: [placeholder_domains(t["response"]) for t in turns] for k, turns in data.items()},
            "named by the response placeholders (add_slot_domains.py)",
        )
    return {k: estimate_active_domains(states) for k, states in turn_states.items()}, "estimated from state changes"


def evaluate(
    predictions: dict, data_dir, *, split: str = "test", bleu: bool = True, domains_from_states: bool = False
) -> dict:
    """Scores predictions in the standard evaluator format; returns the JSON-able report (rates in percent).

    `domains_from_states`: estimate the active domains from state changes even where the predictions give them or
    their placeholders name them (what the evaluator does with a file that has no `active_domains`).
    """
    data_dir = pathlib.Path(data_dir)
    goals = load_goals(data_dir, split)
    booked = load_booked_domains(data_dir)
    dialogues = _load_dialogues(str(data_dir), split)
    reference_turns = {k: len(v["log"][1::2]) for k, v in dialogues.items()}
    data = _validate(predictions, goals, booked, reference_turns, split, _booked_path(data_dir))
    database = VenueDatabase(data_dir)

    used_gold_states = not all("state" in t for turns in data.values() for t in turns)
    states = gold_states(data_dir, split) if used_gold_states else None
    turn_states = {
        k: [
            normalise_state(s, name_aliases=True)
            for s in (states[k][: len(turns)] if used_gold_states else [t["state"] for t in turns])
        ]
        for k, turns in data.items()
    }
    domains, domain_source = _active_domains(data, turn_states, domains_from_states)
    unknown_placeholders: collections.Counter = collections.Counter()
    responses = {
        k: [normalise_response(t["response"], unknown_placeholders) for t in turns] for k, turns in data.items()
    }
    per_domain_total: dict[str, int] = {}
    inform_count: dict[str, int] = {}
    success_count: dict[str, int] = {}
    for dialogue_id in data:
        inform, success = dialogue_inform_success(
            goals[dialogue_id], booked[dialogue_id], responses[dialogue_id], turn_states[dialogue_id],
            domains[dialogue_id], database,
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
        active_domains=domain_source,
        dialogues_with_fewer_turns=sum(len(turns) < reference_turns[k] for k, turns in data.items()),
        unknown_placeholders=dict(unknown_placeholders.most_common()),
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


# ---------------------------------------------------------------------------------------------- command line


def define_flags() -> None:
    flags.DEFINE_string("predictions", None, "JSON (or .json.gz) in the standard evaluator format")
    flags.DEFINE_bool("human_references", False, "score the delexicalised human responses of the split instead")
    flags.DEFINE_string("data", None, "the MultiWOZ data folder (shared/data/multiwoz)")
    flags.DEFINE_enum("split", "test", sorted(_SPLIT_FILES), "the split the predictions answer")
    flags.DEFINE_bool("bleu", True, "compute BLEU and Combined (--nobleu: Inform and Success only)")
    flags.DEFINE_bool("domains_from_states", False, "estimate the active domains from state changes even where the "
                      "predictions give them or their placeholders name them")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if f.data is None:
        command_line.fail("--data is required: the shared multiwoz folder (it holds db/, mwzeval/ and mwz21_convlab3/)")
    if bool(f.predictions) == f.human_references:
        command_line.fail("give exactly one of --predictions FILE and --human_references")
    try:
        if f.human_references:
            predictions = human_references(f.data, f.split)
        else:
            predictions = _read_json(pathlib.Path(f.predictions), "check the --predictions path")
        report = evaluate(predictions, f.data, split=f.split, bleu=f.bleu, domains_from_states=f.domains_from_states)
    except MultiWOZDataError as err:
        command_line.fail(str(err))
    print(json.dumps(report, indent=2, sort_keys=True))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
