"""Bad-input fuzzing of the data loaders: whatever a file holds (random bytes, a truncated file, valid JSON of the
wrong shape, wrong types, missing and extra keys, huge and negative numbers, unicode, an empty file), a loader either
loads it or raises its documented error as one line that names the file (and the record at fault where a record
is); never a KeyError, TypeError, JSONDecodeError, ... from deep inside. Valid input keeps loading.

Each case starts from a small valid example embedded here (real records from ../shared/data join them when it is
there) and mutates it: JSON edits confined to one record or anywhere, truncation, spliced garbage, raw bytes, and
for zip/gzip files a broken container. Hypothesis runs derandomized, so CI sees the same 1,000 cases per loader.
"""
from __future__ import annotations

import contextlib
import copy
import gzip
import io
import json
import pathlib
import typing
import zipfile

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gopo_jax.dialogue.sop import SOPError, load_sop
from gopo_jax.envs import mgshop_data, multiwoz, tmallbrand
from gopo_jax.envs.base import EnvDataError
from gopo_jax.metrics import multiwoz_eval
from gopo_jax.models import hf_io, qwen3

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------- the mutations

_DELETE = object()
_ODD_NUMBERS = (0, -1, -(2**63), 2**64, 10**30, 0.5, -1e308, 1e308, float("inf"), float("-inf"), float("nan"))
_ODD_TEXT = ("", " ", "\n", "\x00", "\ud800", "ü", "名前", "🙂", "a" * 300, "null", "[]", "'", '"', "a:b:c", "-")
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from(_ODD_NUMBERS),
                     st.floats(), st.text(max_size=10), st.sampled_from(_ODD_TEXT))
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
# Files no JSON reader may trip over: empty, a BOM, bad UTF-8, nesting past the recursion limit, an integer past
# Python's 4,300-digit conversion limit, JSON's non-standard constants, the wrong top-level kind.
_SPECIAL = (b"", b" \n\t", b"\xef\xbb\xbf{}", b"\xff\xfe\xfd", b"[" * 5_000, b'{"a":' * 5_000, b"9" * 5000,
            b'{"x": -' + b"9" * 5000 + b"}", b"NaN", b"-Infinity", b"null", b"true", b"0", b"[]", b"{}", b'""',
            b'"\\ud800"', b"[1, 2", b"\x00" * 16)


class Case(typing.NamedTuple):
    data: bytes  # the file's bytes
    doc: typing.Any = None  # the JSON it encodes when it is a mutated example, else None
    record: tuple | None = None  # the path of the record every mutation stayed inside, else None


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _node(doc, path):
    for key in path:
        doc = doc[key]
    return doc


def _edit(draw, node):
    """A mutation of `node`: another value, type or size, or _DELETE."""
    op = draw(st.sampled_from(("replace", "retype", "delete", "extra", "empty", "number", "text", "duplicate")))
    if op == "replace":
        return draw(_JSON)
    if op == "retype":
        return draw(st.sampled_from((None, True, 0, -1, 1.5, "", "x", [], {}, [node], {"x": node})))
    if op == "delete":
        return _DELETE
    if op == "extra" and isinstance(node, dict):
        return {**node, draw(st.text(max_size=6)): draw(_JSON)}
    if op == "extra" and isinstance(node, list):
        at = draw(st.integers(0, len(node)))
        return node[:at] + [draw(_JSON)] + node[at:]
    if op == "empty":
        return type(node)() if isinstance(node, (dict, list, str, bool)) else 0
    if op == "number":
        return draw(st.sampled_from(_ODD_NUMBERS) | st.integers(-(2**64), 2**64))
    if op == "text":
        return draw(st.sampled_from(_ODD_TEXT) | st.text(max_size=20))
    if op == "duplicate" and isinstance(node, list) and node:
        return node + node[:1]
    return [node, draw(_JSON)]


@st.composite
def mutated(draw, seed, scope=()):
    """1-3 edits of a deep copy of `seed`, each at a node under the path `scope` (the scope itself is never deleted,
    so the records around it keep their places)."""
    doc = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p[:len(scope)] == scope]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        new = _edit(draw, _node(doc, path))
        if new is _DELETE and len(path) == len(scope):
            new = draw(_JSON)
        if not path:
            doc = None if new is _DELETE else new
        elif new is _DELETE:
            del _node(doc, path[:-1])[path[-1]]
        else:
            _node(doc, path[:-1])[path[-1]] = new
    return doc


def _encode(doc, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, one more way for a file to be unreadable.
    return json.dumps(doc, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def malformed(draw, seeds, records=lambda doc: []):
    """A Case from the valid documents `seeds`; `records(doc)` lists the record paths a mutation may stay inside."""
    seed = draw(st.sampled_from(seeds))
    valid = _encode(seed, True)
    kind = draw(st.sampled_from(("mutated",) * 6 + ("truncated", "spliced", "random", "special")))
    if kind == "mutated":
        scopes = records(seed)
        scope = draw(st.sampled_from(scopes)) if scopes and draw(st.booleans()) else ()
        doc = draw(mutated(seed, scope))
        data = _encode(doc, draw(st.booleans()))
        # A lone surrogate written raw makes the whole file undecodable: the error is then about the file, and no
        # record can be named.
        return Case(data, doc, (scope or None) if _is_utf8(data) else None)
    if kind == "truncated":
        return Case(valid[:draw(st.integers(0, len(valid) - 1))])
    if kind == "spliced":
        at = draw(st.integers(0, len(valid)))
        return Case(valid[:at] + draw(st.binary(min_size=1, max_size=8)) + valid[at:])
    if kind == "random":
        return Case(draw(st.binary(max_size=64)))
    return Case(draw(st.sampled_from(_SPECIAL)))


def _damaged(draw, packed: bytes) -> bytes:
    """A container's bytes cut short or with a few bytes flipped."""
    if draw(st.booleans()):
        return packed[:draw(st.integers(0, len(packed) - 1))]
    out = bytearray(packed)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(out) - 1))
        out[at] ^= draw(st.integers(1, 255))
    return bytes(out)


@st.composite
def zipped(draw, cases, member: str):
    """The Case's bytes as the one member of a zip archive (or a broken archive, or one without a .json member)."""
    case = draw(cases)
    kind = draw(st.sampled_from(("member",) * 6 + ("damaged", "no_json", "not_zip")))
    if kind == "not_zip":
        return case._replace(record=None)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("README.txt" if kind == "no_json" else member, case.data)
    if kind == "member":
        return case._replace(data=buf.getvalue())
    packed = buf.getvalue()
    return Case(_damaged(draw, packed) if kind == "damaged" else packed)


@st.composite
def gzipped(draw, cases):
    """The Case's bytes gzipped (or a broken gzip stream, or not gzipped at all)."""
    case = draw(cases)
    kind = draw(st.sampled_from(("gzip",) * 6 + ("damaged", "not_gzip")))
    if kind == "not_gzip":
        return case._replace(record=None)
    packed = gzip.compress(case.data, mtime=0)
    return case._replace(data=packed) if kind == "gzip" else Case(_damaged(draw, packed))


def loads_or_fails_cleanly(load, error: type[Exception], *names):
    """`load()`'s value, or None when it raised `error` with a one-line message naming each of `names` (a name is
    a string or a tuple of alternatives). Any other exception fails the test."""
    try:
        value = load()
    except error as e:
        event("documented error")
        message = str(e)
        assert message and "\n" not in message, f"not one line: {message!r}"
        for name in names:
            alternatives = name if isinstance(name, tuple) else (name,)
            assert any(a in message for a in alternatives), f"{message!r} names none of {alternatives}"
        return None
    event("loaded")
    return value


def _indices(doc) -> list:
    return [(i,) for i in range(len(doc))] if isinstance(doc, list) else []


def _keys(doc) -> list:
    return [(k,) for k in doc] if isinstance(doc, dict) else []


def _record_names(case: Case, label: typing.Callable[[typing.Any, typing.Any], tuple]) -> list:
    """The names an error about the mutated record must mention (none when the mutation was not confined)."""
    if case.record is None:
        return []
    return [label(case.record[-1], _node(case.doc, case.record))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _shared(*parts) -> pathlib.Path | None:
    path = SHARED_DATA.joinpath(*parts)
    return path if path.exists() else None


# ------------------------------------------------------------------------------------------------------- SOP

SOP_EXAMPLE = {
    "name": "mini", "strategies": ["greet", "ask", "sell"], "initial": "open",
    "stages": [{"name": "open", "allowed": ["greet"], "next": {"greet": "talk"}},
               {"name": "talk", "allowed": ["ask", "sell"], "next": {"sell": "end"}, "terminal": False},
               {"name": "end", "allowed": [], "terminal": True}],
}
SOP_SEEDS = [SOP_EXAMPLE, json.loads(mgshop_data.SOP_PATH.read_text())]


def test_the_sop_examples_load(workdir):
    for i, seed in enumerate(SOP_SEEDS):
        (workdir / f"valid_sop{i}.json").write_text(json.dumps(seed))
        assert load_sop(workdir / f"valid_sop{i}.json").to_json()["stages"][0]["name"] == seed["stages"][0]["name"]


@FUZZ
@given(case=malformed(SOP_SEEDS, lambda doc: [("stages", i) for i in range(len(doc["stages"]))]))
def test_sop_loader(workdir, case):
    path = workdir / "sop.json"
    path.write_bytes(case.data)
    loads_or_fails_cleanly(lambda: load_sop(path), SOPError, str(path))


# ---------------------------------------------------------------------------------------------- MG-ShopDial


def _utterance(n, who, text, *intents):
    return {"utterance_id": n, "participant": who, "utterance": text, "goal": "recommendation",
            "intents": [list(i) for i in intents]}


MGSHOP_EXAMPLE = [
    {"id": "Books:45:109:118",
     "metadata": {"type": "simple", "id": "45", "constraint": "low", "desc": "You want a thriller.",
                  "client_checklist": ["greetings"], "wizard_checklist": [], "search_logs": []},
     "utterances": [_utterance(1, "Wizard", "Hello, how can I help?", ("greeting", 4.0)),
                    _utterance(2, "Client", "I'm looking for a thriller.", ("disclose", 3.0)),
                    _utterance(3, "Wizard", "Any author in particular?", ("elicit", 2.0), ("o_question", 3.0)),
                    _utterance(4, "Client", "No, surprise me.", ("answer", 2)),
                    _utterance(5, "Wizard", "Try Gone Girl.", ("recommend", 4.0)),
                    _utterance(6, "Client", "Great, thanks!", ("pf", 3.0), ("greeting", 1.0))]},
    {"id": "Office Products:12:3:4",
     "metadata": {"type": "complex", "id": "12", "constraint": "high", "desc": "You need a stapler."},
     "utterances": [_utterance(1, "Client", "Hi, I need a stapler.", ("greeting", 2.0), ("disclose", 2.0)),
                    _utterance(2, "Wizard", "This one staples 20 sheets.", ("recommend", 3.0), ("explain", 1.0))]},
]


def _mgshop_seeds() -> list:
    seeds = [MGSHOP_EXAMPLE]
    real = _shared("mgshopdial", mgshop_data.DATA_FILE)
    if real:
        conversations = json.loads(real.read_text())[:2]
        seeds.append([{**c, "utterances": c["utterances"][:6]} for c in conversations])
    return seeds


MGSHOP_SEEDS = _mgshop_seeds()


def test_the_mgshopdial_examples_load(workdir):
    for seed in MGSHOP_SEEDS:
        (workdir / "valid.json").write_text(json.dumps(seed))
        assert [c.id for c in mgshop_data.load_conversations(workdir / "valid.json")] == [c["id"] for c in seed]


@FUZZ
@given(case=malformed(MGSHOP_SEEDS, _indices))
def test_mgshopdial_loader(workdir, case):
    path = workdir / mgshop_data.DATA_FILE
    path.write_bytes(case.data)
    record = _record_names(case, lambda i, conv: (f"#{i}", repr(conv.get("id")) if isinstance(conv, dict) else "#"))
    loads_or_fails_cleanly(lambda: mgshop_data.load_conversations(path), mgshop_data.MgshopDataError, str(path),
                           *record)


# ------------------------------------------------------------------------------------------------- MultiWOZ


def _service(name, *slots):
    return {"service_name": name, "slots": [{"name": f"{name}-{s}", "is_categorical": False} for s in slots]}


MULTIWOZ_SCHEMA = [_service("restaurant", "food", "area", "pricerange", "name", "bookday", "bookpeople", "booktime"),
                   _service("hotel", "area", "type", "pricerange", "bookday", "bookpeople", "bookstay"),
                   _service("train", "departure", "destination", "day", "leaveat", "bookpeople"),
                   _service("taxi", "departure", "destination", "leaveat")]
MULTIWOZ_DB = {
    "db/restaurant_db.json": [
        {"address": "Regent Street", "area": "centre", "food": "italian", "id": "19210", "location": [52.2, 0.12],
         "name": "pizza hut city centre", "phone": "01223323737", "postcode": "cb21ab", "pricerange": "cheap",
         "type": "restaurant"},
        {"address": "Milton Road", "area": "north", "food": "chinese", "id": "19211", "name": "golden wok",
         "phone": "01223350688", "postcode": "cb43hl", "pricerange": "moderate", "type": "restaurant"}],
    "db/hotel_db.json": [
        {"address": "124 tenison road", "area": "east", "internet": "yes", "parking": "no", "id": "0",
         "name": "a and b guest house", "phone": "01223315702", "postcode": "cb12dp", "price": {"single": "50"},
         "pricerange": "moderate", "stars": "4", "takesbookings": "yes", "type": "guesthouse"}],
    "mwzeval/database/attraction_db.json": [
        {"address": "pool way", "area": "east", "entrance fee": "?", "id": "1", "name": "abbey pool",
         "openhours": "?", "phone": "01223902088", "postcode": "cb58nt", "pricerange": "?", "type": "swimmingpool"}],
    "db/train_db.json": [
        {"arriveBy": "05:51", "day": "monday", "departure": "cambridge", "destination": "london kings cross",
         "duration": "51 minutes", "leaveAt": "05:00", "price": "23.60 pounds", "trainID": "TR7075"}],
    "db/hospital_db.json": [{"department": "neurosciences", "id": 0, "phone": "01223216297"}],
    "db/police_db.json": [{"name": "Parkside Police Station", "address": "Parkside, Cambridge", "id": 0,
                           "phone": "01223358966"}],
}


def _turn(text, acts=None, spans=(), metadata=None):
    return {"text": text, "metadata": metadata or {}, "dialog_act": acts or {}, "span_info": [list(s) for s in spans]}


def _goal(**domains):
    empty = {"info": {}, "fail_info": {}, "book": {}, "fail_book": {}, "reqt": []}
    return {d: ({**empty, **domains[d]} if d in domains else {}) for d in multiwoz.DOMAINS} | {"message": ["..."]}


MULTIWOZ_DIALOGUES = {
    "MUL0001.json": {
        "goal": _goal(restaurant={"info": {"food": "italian", "pricerange": "cheap", "area": "centre"},
                                  "reqt": ["phone"]},
                      hotel={"info": {"type": "guesthouse", "area": "east"},
                             "book": {"people": "2", "day": "monday", "stay": "3", "invalid": False}}),
        "log": [
            _turn("I want a cheap italian restaurant in the centre .",
                  {"Restaurant-Inform": [["Food", "italian"], ["Price", "cheap"], ["Area", "centre"]]},
                  [["Restaurant-Inform", "Food", "italian", 4, 4]]),
            _turn("Pizza hut city centre is a cheap italian place . Its phone is 01223323737 .",
                  {"Restaurant-Inform": [["Name", "pizza hut city centre"], ["Phone", "01223323737"]]},
                  [["Restaurant-Inform", "Name", "pizza hut city centre", 0, 3],
                   ["Restaurant-Inform", "Phone", "01223323737", 13, 13]],
                  {"restaurant": {"book": {"booked": []}, "semi": {"food": "italian", "pricerange": "cheap",
                                                                   "area": "centre", "name": "not mentioned"}}}),
            _turn("I also need a guesthouse in the east for 2 people , 3 nights from monday .",
                  {"Hotel-Inform": [["Type", "guesthouse"], ["Area", "east"]]}),
            _turn("Booked at a and b guest house , reference ABC123 . Anything else ?",
                  {"Hotel-Book": [["Ref", "ABC123"]], "Hotel-Inform": [["Name", "a and b guest house"]],
                   "general-reqmore": [["none", "none"]]},
                  [["Hotel-Inform", "Name", "a and b guest house", 2, 6], ["Hotel-Book", "Ref", "ABC123", 9, 9]],
                  {"hotel": {"book": {"booked": [{"reference": "ABC123"}], "people": "2", "day": "monday",
                                      "stay": "3"},
                             "semi": {"type": "guesthouse", "area": "east"}}}),
        ]},
    "SNG0002.json": {
        "goal": _goal(train={"info": {"departure": "cambridge", "destination": "london kings cross",
                                      "day": "monday", "leaveAt": "05:00"}, "reqt": ["duration"]},
                      taxi={"info": {"leaveAt": "17:15"}, "reqt": ["car type", "phone"]}),
        "log": [
            _turn("I need a train to london kings cross on monday after 05:00 , and a taxi .",
                  {"Train-Inform": [["Dest", "london kings cross"], ["Day", "monday"]]}),
            _turn("TR7075 leaves at 05:00 and takes 51 minutes . Goodbye .",
                  {"Train-Inform": [["Id", "TR7075"], ["Leave", "05:00"]], "general-bye": [["none", "none"]]},
                  [["Train-Inform", "Id", "TR7075", 0, 0], ["Train-Inform", "Leave", "05:00", 3, 3]],
                  {"taxi": {"book": {"booked": []}, "semi": {"departure": "cambridge", "destination": "the station",
                                                             "leaveAt": "17:15"}},
                   "train": {"book": {"booked": []}, "semi": {"departure": "cambridge", "day": "monday",
                                                              "destination": "london kings cross"}}}),
        ]},
}
MULTIWOZ_BOOKED = {"mul0001": [[], ["hotel"]], "sng0002": [[]]}


def _zip(member: str, doc) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(member, json.dumps(doc))
    return buf.getvalue()


# The embedded MultiWOZ folder: schema, databases, test and val dialogues, the evaluator's booked domains.
MULTIWOZ_FILES = {
    "schema.json": json.dumps(MULTIWOZ_SCHEMA).encode(),
    **{name: json.dumps(rows).encode() for name, rows in MULTIWOZ_DB.items()},
    "mwz21_convlab3/test.json.zip": _zip("test.json", MULTIWOZ_DIALOGUES),
    "mwz21_convlab3/val.json.zip": _zip("val.json", MULTIWOZ_DIALOGUES),
    "mwzeval/booked_domains.json.gz": gzip.compress(json.dumps(MULTIWOZ_BOOKED).encode(), mtime=0),
}


def _write_files(root: pathlib.Path, files: dict) -> pathlib.Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@contextlib.contextmanager
def _written(root: pathlib.Path, name: str, data: bytes, files: dict):
    """`root/name` holds `data` inside the block and its valid bytes `files[name]` again after it."""
    path = root / name
    path.write_bytes(data)
    try:
        yield path
    finally:
        path.write_bytes(files[name])


def _multiwoz_dialogue_seeds() -> list:
    """The embedded dialogues, and two real val dialogues (logged demonstrations need no database)."""
    seeds = [MULTIWOZ_DIALOGUES]
    real = _shared("multiwoz", "mwz21_convlab3", "val.json.zip")
    if real:
        with zipfile.ZipFile(real) as archive:
            dialogues = json.loads(archive.read(archive.namelist()[0]))
        # Their first exchanges: each case re-encodes and re-parses the whole seed, and a full dialogue is ~20 KB.
        seeds.append({k: {**dialogues[k], "log": dialogues[k]["log"][:4]} for k in sorted(dialogues)[:2]})
    return seeds


MULTIWOZ_VAL_SEEDS = _multiwoz_dialogue_seeds()


@pytest.fixture(scope="module")
def multiwoz_dir(workdir):
    return _write_files(workdir / "multiwoz", MULTIWOZ_FILES)


def _dialogue_label(key, record):
    return (f"dialogue {key!r}",)


@pytest.mark.parametrize("bleu", [True, False])
def test_predictions_without_a_single_turn_are_an_error(multiwoz_dir, bleu):
    """Found by the fuzzer with a local example database: BLEU over no turns raised IndexError."""
    predictions = {dialogue_id: [] for dialogue_id in multiwoz_eval.human_references(multiwoz_dir, "test")}
    with pytest.raises(multiwoz_eval.MultiWOZDataError, match="every dialogue's turn list is empty"):
        multiwoz_eval.evaluate(predictions, multiwoz_dir, split="test", bleu=bleu)


def test_the_multiwoz_examples_load(multiwoz_dir, tmp_path):
    data = multiwoz.load_data(multiwoz_dir, "test")
    assert [g.dialogue_id for g in data.goals] == ["mul0001", "sng0002"]
    assert [d.domain for d in data.goals[1].domains] == ["train", "taxi"]
    assert [len(d.turns) for d in multiwoz.load_logged_dialogues(multiwoz_dir)] == [2, 1]
    predictions = multiwoz_eval.human_references(multiwoz_dir, "test")
    report = multiwoz_eval.evaluate(predictions, multiwoz_dir, split="test")
    assert report["num_dialogues"] == 2 and report["inform"] == 100.0
    for seed in MULTIWOZ_VAL_SEEDS[1:]:
        real = {**MULTIWOZ_FILES, "mwz21_convlab3/val.json.zip": _zip("val.json", seed)}
        root = _write_files(tmp_path / "real", real)
        assert len(multiwoz.load_logged_dialogues(root)) == 2


@FUZZ
@given(case=zipped(malformed([MULTIWOZ_DIALOGUES], _keys), "test.json"))
def test_multiwoz_goals_loader(multiwoz_dir, case):
    with _written(multiwoz_dir, "mwz21_convlab3/test.json.zip", case.data, MULTIWOZ_FILES) as path:
        loads_or_fails_cleanly(lambda: multiwoz.load_data(multiwoz_dir, "test"), multiwoz.MultiWOZEnvError,
                               str(path), *_record_names(case, _dialogue_label))


_MULTIWOZ_TABLES = {"schema.json": MULTIWOZ_SCHEMA, **MULTIWOZ_DB}


@FUZZ
@given(name=st.sampled_from(sorted(_MULTIWOZ_TABLES)), data=st.data())
def test_multiwoz_schema_and_database_loader(multiwoz_dir, name, data):
    case = data.draw(malformed([_MULTIWOZ_TABLES[name]], _indices))
    with _written(multiwoz_dir, name, case.data, MULTIWOZ_FILES) as path:
        # A database that lost the goals' venues is the goals' inconsistency with db/, named as such.
        loads_or_fails_cleanly(lambda: multiwoz.load_data(multiwoz_dir, "test"), multiwoz.MultiWOZEnvError,
                               (str(path), "and db/ are inconsistent"))


@FUZZ
@given(case=zipped(malformed(MULTIWOZ_VAL_SEEDS, _keys), "val.json"))
def test_multiwoz_logged_dialogues_loader(multiwoz_dir, case):
    with _written(multiwoz_dir, "mwz21_convlab3/val.json.zip", case.data, MULTIWOZ_FILES) as path:
        loads_or_fails_cleanly(lambda: multiwoz.load_logged_dialogues(multiwoz_dir), multiwoz.MultiWOZEnvError,
                               str(path), *_record_names(case, _dialogue_label))


@pytest.fixture(scope="module")
def multiwoz_predictions(multiwoz_dir):
    return multiwoz_eval.human_references(multiwoz_dir, "test")


_EVALUATOR_FILES = ("mwz21_convlab3/test.json.zip", "mwzeval/booked_domains.json.gz", *sorted(MULTIWOZ_DB))


@FUZZ
@given(name=st.sampled_from(_EVALUATOR_FILES), bleu=st.booleans(), data=st.data())
def test_multiwoz_evaluator_data_readers(multiwoz_dir, multiwoz_predictions, name, bleu, data):
    if name.endswith(".zip"):
        case = data.draw(zipped(malformed([MULTIWOZ_DIALOGUES], _keys), "test.json"))
    elif name.endswith(".gz"):
        case = data.draw(gzipped(malformed([MULTIWOZ_BOOKED], _keys)))
    else:
        case = data.draw(malformed([MULTIWOZ_DB[name]], _indices))
    # The evaluator caches the dialogues per folder; every case brings new ones.
    multiwoz_eval._load_dialogues.cache_clear()
    try:
        with _written(multiwoz_dir, name, case.data, MULTIWOZ_FILES) as path:
            loads_or_fails_cleanly(
                lambda: multiwoz_eval.evaluate(multiwoz_predictions, multiwoz_dir, split="test", bleu=bleu),
                # Dialogues lost from the data surface as predictions the data do not have, named as such.
                multiwoz_eval.MultiWOZDataError, (str(path), "predictions"))
    finally:
        multiwoz_eval._load_dialogues.cache_clear()


@FUZZ
@given(data=st.data(), bleu=st.booleans(), with_domains=st.booleans())
def test_multiwoz_evaluator_predictions_reader(multiwoz_dir, multiwoz_predictions, data, bleu, with_domains):
    valid = {f"{k.upper()}.json": [{**t, "active_domains": ["restaurant"]} if with_domains else t for t in turns]
             for k, turns in multiwoz_predictions.items()}
    case = data.draw(malformed([valid], _keys))
    path = multiwoz_dir / "predictions.json"
    path.write_bytes(case.data)

    def score():
        predictions = multiwoz_eval._read_json(path, "check the --predictions path")
        return multiwoz_eval.evaluate(predictions, multiwoz_dir, split="test", bleu=bleu)

    # The evaluator scores a dict, so its errors name the input as `predictions` (the file only when unreadable).
    loads_or_fails_cleanly(score, multiwoz_eval.MultiWOZDataError, (str(path), "predictions"),
                           *_record_names(case, lambda key, turns: (repr(key),)))


# ----------------------------------------------------------------------------------------------------- ABCD

# The subflows of shared/data/abcd/abcd_sample.json's conversations are among these, so its real records load too.
ABCD_ONTOLOGY = {
    "intents": {"flows": ["account_access", "product_defect", "storewide_query"],
                "subflows": {"account_access": ["recover_username", "recover_password"],
                             "product_defect": ["refund_status", "return_size"], "storewide_query": ["timing"]}},
    "actions": {
        "kb_query": {"verify-identity": ["customer_name", "account_id", "order_id", "zip_code"],
                     "validate-purchase": ["username", "email", "order_id"], "make-password": []},
        "interaction": {"pull-up-account": ["customer_name", "account_id"],
                        "enter-details": ["details_slotval", "full_address"], "record-reason": ["reason_slotval"],
                        "offer-refund": ["amount"], "make-purchase": ["product"],
                        "shipping-status": ["shipping_option"], "update-order": ["order_slotval"],
                        "notify-team": ["company_team"]},
        "faq_policy": {"membership": ["membership_level"], "search-faq": [], "search-boots": [],
                       "search-timing": [], "select-faq": ["storewide_query"]}},
    "values": {"enumerable": {"customer_name": ["Joyce Wu", "Crystal Minh"], "membership_level": ["gold", "bronze"],
                              "product": ["jeans", "boots"], "shipping_option": ["in transit"],
                              "reason_slotval": ["too small"], "company_team": ["manager"]}},
    "next_steps": ["retrieve_utterance", "take_action", "end_conversation"],
}
ABCD_KB = {"recover_username": ["pull-up-account", "verify-identity"],
           "recover_password": ["pull-up-account", "enter-details", "make-password"],
           "refund_status": ["pull-up-account", "validate-purchase", "notify-team", "update-order"],
           "return_size": ["pull-up-account", "validate-purchase", "membership", "enter-details", "update-order"],
           "timing": ["search-faq", "search-timing", "select-faq"]}
ABCD_GUIDELINES = {
    "Account Access": {"description": "forgotten account details", "subflows": {
        "Recover Username": {"actions": [{"type": "interaction", "button": "Pull up Account",
                                          "text": "Ask for the full name.", "subtext": ["or the account id"]}],
                             "instructions": ["Be kind."]},
        "Recover Password": {"actions": []}}},
    "Product Defect": {"description": "refunds and returns", "subflows": {
        "Refund Status": {"actions": [{"type": "kb query", "button": "Validate Purchase", "text": "Check it."}]},
        "Return Due to Size": {"actions": []}}},
    "Storewide Query": {"description": "questions about the store", "subflows": {"Timing FAQ": {}}},
}


def _abcd_conversation(convo_id, subflow, messages):
    """A release-format conversation: `original` messages and `delexed` turns whose targets name the button."""
    return {"convo_id": convo_id,
            "scenario": {"personal": {"customer_name": "crystal minh", "username": "cminh730"},
                         "order": {"order_id": "3348917502"}, "flow": "account_access", "subflow": subflow},
            "original": [[speaker, text] for speaker, text, _ in messages],
            "delexed": [{"speaker": speaker, "text": text.lower(), "turn_count": i + 1,
                         "targets": [subflow, "take_action" if button else "retrieve_utterance", button, [], -1]}
                        for i, (speaker, text, button) in enumerate(messages)]}


ABCD_SAMPLE = [
    _abcd_conversation(1001, "recover_username", [
        ("agent", "Hi! How can I help you?", None), ("customer", "I forgot my username.", None),
        ("agent", "May I have your full name?", None), ("customer", "crystal minh", None),
        ("action", "Account has been pulled up for crystal minh.", "pull-up-account"),
        ("action", "Identity verification in progress ...", "verify-identity"),
        ("agent", "Your username is cminh730. Anything else?", None), ("customer", "No, bye", None)]),
    _abcd_conversation("1002", "return_size", [
        ("customer", "These jeans are too small.", None), ("agent", "Sorry! Your order id, please?", None),
        ("customer", "3348917502", None), ("action", "System Action: search boots", "search-boots"),
        ("agent", "Have a nice day!", None)]),
]


def _write_abcd(root: pathlib.Path) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, doc in (("kb.json", ABCD_KB), ("ontology.json", ABCD_ONTOLOGY), ("guidelines.json", ABCD_GUIDELINES),
                      (tmallbrand.SAMPLE, ABCD_SAMPLE)):
        (root / name).write_text(json.dumps(doc))
    return root


def _abcd_sample_seeds() -> list:
    seeds = [ABCD_SAMPLE]
    real = _shared("abcd", tmallbrand.SAMPLE)
    if real:
        # The first dozen messages, without the utterance candidates (ranking data the loader never reads).
        seeds.append([{**c, "original": c["original"][:12],
                       "delexed": [{k: v for k, v in t.items() if k != "candidates"} for t in c["delexed"][:12]]}
                      for c in json.loads(real.read_text())])
    return seeds


ABCD_SAMPLE_SEEDS = _abcd_sample_seeds()


@pytest.fixture(scope="module")
def abcd_dir(workdir):
    return _write_abcd(workdir / "abcd")


@pytest.fixture(scope="module")
def abcd_sops(abcd_dir):
    return tmallbrand.load_data(abcd_dir).sops


def test_the_abcd_examples_load(abcd_dir, abcd_sops, tmp_path):
    data = tmallbrand.load_data(abcd_dir)
    assert [s.subflow for s in data.scenarios] == list(ABCD_KB)
    conversations = tmallbrand.load_logged_conversations(abcd_dir, abcd_sops)
    assert [c.convo_id for c in conversations] == ["1001", "1002"]
    for seed in ABCD_SAMPLE_SEEDS[1:]:
        root = _write_abcd(tmp_path / "real")
        (root / tmallbrand.SAMPLE).write_text(json.dumps(seed))
        assert len(tmallbrand.load_logged_conversations(root, abcd_sops)) == len(seed)


_ABCD_FILES = {"kb.json": ABCD_KB, "ontology.json": ABCD_ONTOLOGY, "guidelines.json": ABCD_GUIDELINES,
               tmallbrand.SAMPLE: ABCD_SAMPLE}


@FUZZ
@given(name=st.sampled_from(sorted(_ABCD_FILES)), data=st.data())
def test_abcd_kb_ontology_and_guidelines_loader(abcd_dir, name, data):
    valid = _ABCD_FILES[name]
    case = data.draw(malformed([valid], _keys if isinstance(valid, dict) else _indices))
    path = abcd_dir / name
    path.write_bytes(case.data)
    try:
        # The files are checked against each other: a mutation in one may surface as a mismatch named in another.
        loads_or_fails_cleanly(lambda: tmallbrand.load_data(abcd_dir), tmallbrand.TmallBrandError,
                               tuple(str(abcd_dir / n) for n in _ABCD_FILES))
    finally:
        path.write_text(json.dumps(valid))


@FUZZ
@given(full=st.booleans(), data=st.data())
def test_abcd_logged_conversations_loader(abcd_dir, abcd_sops, full, data):
    sample, corpus = abcd_dir / tmallbrand.SAMPLE, abcd_dir / tmallbrand.FULL_CORPUS
    if full:
        seeds = [{"train": s, "dev": s[:1], "test": []} for s in ABCD_SAMPLE_SEEDS]
        case = data.draw(gzipped(malformed(seeds, lambda doc: [("train", i) for i in range(len(doc["train"]))])))
        path = corpus
    else:
        case = data.draw(malformed(ABCD_SAMPLE_SEEDS, _indices))
        path = sample
    path.write_bytes(case.data)
    try:
        loads_or_fails_cleanly(lambda: tmallbrand.load_logged_conversations(abcd_dir, abcd_sops),
                               tmallbrand.TmallBrandError, str(path),
                               *_record_names(case, lambda i, record: (f"conversation #{i}:",)))
    finally:
        corpus.unlink(missing_ok=True)
        sample.write_text(json.dumps(ABCD_SAMPLE))


# ------------------------------------------------------------------------------------ Hugging Face checkpoints

# Qwen3-0.6B's config.json as published, and the tiny preset's as save_pretrained writes it.
HF_CONFIGS = [
    {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
     "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02,
     "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28, "model_type": "qwen3",
     "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
     "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None, "tie_word_embeddings": True,
     "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
     "vocab_size": 151936},
    qwen3.PRESETS["tiny"].to_hf_dict(),
]


def test_the_hf_configs_load(workdir):
    folder = workdir / "hf_valid"
    folder.mkdir()
    for hf in HF_CONFIGS:
        (folder / "config.json").write_text(json.dumps(hf))
        assert hf_io.checkpoint_config(folder).hidden_size == hf["hidden_size"]


@FUZZ
@given(case=malformed(HF_CONFIGS))
def test_hf_config_reader(workdir, case):
    folder = workdir / "hf_config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(case.data)
    loads_or_fails_cleanly(lambda: hf_io.checkpoint_config(folder), hf_io.HFModelError, str(folder / "config.json"))


_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
HF_INDEX = {"metadata": {"total_size": 1234}, "weight_map": {
    "lm_head.weight": _SHARDS[1], "model.embed_tokens.weight": _SHARDS[0], "model.norm.weight": _SHARDS[1],
    "model.layers.0.self_attn.q_proj.weight": _SHARDS[0], "model.layers.0.mlp.up_proj.weight": _SHARDS[1]}}


def test_the_hf_index_loads(workdir):
    folder = workdir / "hf_index_valid"
    folder.mkdir()
    for shard in _SHARDS:
        (folder / shard).write_bytes(b"")
    (folder / hf_io.INDEX_FILE).write_text(json.dumps(HF_INDEX))
    assert hf_io._weight_files(folder) == {name: folder / f for name, f in HF_INDEX["weight_map"].items()}


def test_a_shard_name_too_long_for_the_file_system_is_a_missing_shard(workdir):
    """Found by the fuzzer with a local example database: a 300-byte name made `is_file` raise OSError."""
    folder = workdir / "hf_index_long_name"
    folder.mkdir()
    (folder / hf_io.INDEX_FILE).write_text(json.dumps({"weight_map": {"lm_head.weight": "x" * 300}}))
    with pytest.raises(hf_io.HFModelError, match="lists shard file\\(s\\) that are missing"):
        hf_io._weight_files(folder)


@FUZZ
@given(case=malformed([HF_INDEX], lambda doc: [("weight_map",)]))
def test_hf_safetensors_index_reader(workdir, case):
    folder = workdir / "hf_index"
    folder.mkdir(exist_ok=True)
    for shard in _SHARDS:
        (folder / shard).write_bytes(b"")
    (folder / hf_io.INDEX_FILE).write_bytes(case.data)
    loads_or_fails_cleanly(lambda: hf_io._weight_files(folder), hf_io.HFModelError, str(folder / hf_io.INDEX_FILE))


def test_every_loader_error_is_a_value_error():
    """The documented errors stay ValueErrors, which the entry points turn into one `error:` line."""
    for error in (SOPError, EnvDataError, mgshop_data.MgshopDataError, multiwoz.MultiWOZEnvError,
                  multiwoz_eval.MultiWOZDataError, tmallbrand.TmallBrandError, hf_io.HFModelError):
        assert issubclass(error, ValueError)
