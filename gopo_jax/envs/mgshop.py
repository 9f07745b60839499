"""Mgshop: a host environment built from the 64 real MG-ShopDial shopping conversations (Bernard & Balog, SIGIR 2023).

The data (../shared/data/mgshopdial/MGShopDial.json, see that folder's README.md) holds Client/Wizard (shop
assistant) conversations in four product categories, every utterance annotated with intents and vote counts. This
module turns it into a GOPO world (GOPO.md §1, §5); every number below is fitted by this module from the training
conversations and printed by `describe()` (the values quoted are those of the default options).

Scenario. One real conversation (category, client scenario `desc`, type, constraint). `reset(seed)` draws one of
the split's conversations from the seed. Splits are BY CONVERSATION: within each category the conversations sorted
by id go 3 to "train", every 4th to "test" (50/14 conversations); "all" uses all 64. Agents see the category and their role, not the
client's hidden `desc`.

Agent turn = one Wizard utterance. The customer utterance before it is the Client text since the previous Wizard
utterance (it may be empty: wizards often send two messages in a row).

Strategies (8) = the wizard-side intents: greeting, elicit, clarify, recommend, answer, explain, interaction, pf
(positive feedback / affirmation). Left out as strategies: o_question (an annotation of question form that mostly
co-occurs with elicit/clarify), disclose and nf (client-side intents: 228 and 47 client vs 52 and 12 wizard
uses) and other (URLs, typos). A logged wizard utterance's strategy is its top-voted intent among the 8 (ties by
the priority recommend > answer > elicit > clarify > explain > greeting > pf > interaction); with none of the 8,
o_question -> elicit, disclose -> explain, nf -> answer; with none of those it is unlabelled (only "other" or no
annotation) and gets the realisation classifier's prediction where a strategy is needed (logged replay).

SOP (gopo_jax/envs/sops/mgshop.json, re-derived from the data by `derive_sop`). Stages follow the order of the
wizard checklist (greetings -> need/clarify/preferences -> first-recommend -> qa/search/second-recommend -> end):
opening -> discovery (on any first move except recommend) -> recommendation (on recommend) -> closing (on greeting
after a recommendation, the farewell; terminal). The allowed mask of a stage keeps the strategies that real wizards
used there at least `min_count`=3 times and in at least `min_share`=2% of that stage's turns (counts from the
training conversations walked through the skeleton automaton); transitions on strategies that fail the test are
dropped.

Realisation check R(reply). Multinomial logistic regression (numpy, full-batch gradient descent, deterministic) on
the all-MiniLM-L6-v2 sentence embedding (gopo_jax.models.bert) of the reply, trained on the labelled wizard
utterances of the training conversations. An empty reply, or one whose top class probability is below
`reject_below`, is UNRECOGNISED. Held-out accuracy on the test conversations: see `classifier_report()`.

Customer simulator (deterministic, retrieval over real Client text). The pool holds, for every logged wizard turn
of ALL conversations, the Client text that followed it. Given the realised strategy k̂ and the reply:
1. a reply equal to a not-yet-used wizard utterance of the scenario's own conversation gets that utterance's logged
   response (so replaying the log reproduces the real conversation exactly);
2. otherwise, among pool entries whose wizard turn had strategy k̂ (unlabelled turns for UNRECOGNISED), narrowed
   to the scenario's product category and to entries not used yet in the episode (each where any remain), the one
   maximising cos(reply, logged wizard utterance) + 0.2[same conversation] + 0.1[same scenario] +
   0.05[same category] + 0.1[same stage] answers.
The episode ends when the retrieved response ended its real conversation, on the terminal stage, or at max_turns.

Per-turn signals.
* g_t: wizard-checklist progress. The 9 items (greetings, need, clarify, preferences, first-recommend, qa, search,
  second-recommend, end) each weigh 1/9 and tick once, on an SOP-valid realised strategy: greeting in the opening ->
  greetings; elicit -> need, a later elicit -> preferences; clarify -> clarify; recommend after need ->
  first-recommend, a later recommend -> second-recommend; answer right after a customer question (client intent
  o_question/clarify/elicit) -> qa; explain after the first recommendation -> search (presenting what was found);
  greeting in the recommendation stage once the customer has accepted a recommendation (o below) -> end.
  Recommending before eliciting the need earns nothing, and closing before a recommendation was accepted earns
  nothing and ends the episode: that is what makes the order matter.
* c_t: probability the customer stays engaged, estimated as P(the Client's next text carries no negative feedback
  (nf) | stage, realised strategy) from the training conversations with a Beta prior of strength 4 towards the
  strategy's rate (itself shrunk towards the global rate). A realised strategy the SOP forbids gets the pooled rate
  after the logged turns that the derived SOP calls violations; UNRECOGNISED gets the rate after unlabelled wizard
  utterances.
* rel_t in {0..3}: what real wizards did next. p(k | stage, top client intent of the last customer text) is counted
  from the training conversations and smoothed towards p(k | stage) (prior strength 2); among the stage's allowed
  strategies the most likely gets 3, the next two get 2, the rest 1; an SOP violation (realised strategy not
  allowed) gets 0.
* q_t: max cosine similarity of the reply to the real wizard utterances of the realised strategy, clipped to [0,1]
  (0 when UNRECOGNISED): how human-like the realisation is. Real utterances score 1.
* Outcome o (purchase proxy): after the first recommendation, some Client text carries positive feedback (pf) and no
  nf. sat = (n_pf + 1) / (n_pf + n_nf + 2) over the episode's Client texts. fcr = o and the conversation was closed
  (end item ticked) — there is no hand-off in this world, so "first contact" means resolved and closed in this one.

Reference policy. `reference="logged"` (default): the logged human wizard, replaying the scenario's wizard turns in
order (strategy = the annotated label, or R's prediction if unlabelled); replay reproduces the real conversation.
`reference="fitted"`: argmax of p(k | stage, client intent) among allowed strategies with `scripted_reply(k)`.
Demonstrations are the logged wizard turns (context, customer text, strategy, utterance).

Fitted numbers with the default options (split train/test by conversation, from `describe()`):
* SOP allowed masks: opening {greeting, elicit}; discovery and recommendation: all 8 (every strategy passes the
  thresholds there: real wizards do everything once the conversation is under way); closing terminal. 97.1% of the
  labelled logged wizard turns are SOP-valid under it.
* c (P(no nf next)): global 0.960; opening greeting 0.976, elicit 0.982; discovery 0.955 (recommend) .. 0.997
  (answer), clarify 0.958; recommendation elicit 0.879, clarify 0.902, pf 0.930, explain 0.932, interaction 0.949,
  answer 0.962, recommend 0.979, greeting 0.997. Violations 0.994 and UNRECOGNISED 0.993: the logged data shows
  no engagement cost for either (few cases, mostly wizards who never greeted), so they are penalised only through
  rel_t = 0, g_t = 0 and R_B's SOP term.
* rel top strategy (stage | client intent), e.g. opening|* -> greeting; discovery|o_question -> answer,
  discovery|none -> clarify, discovery|pf -> recommend; recommendation|o_question -> answer,
  recommendation|recommend -> pf, recommendation|nf -> explain, recommendation|greeting -> greeting.
* R: 773 training / 244 held-out labelled utterances (50 / 14 conversations). Held-out accuracy 0.398 (balanced
  accuracy 0.368), majority class "answer" 0.316, nearest centroid 0.422; train accuracy 0.636. Without class
  balancing the held-out accuracy is 0.479 but pf is never predicted (no reply could realise it), so the
  balanced fit is the default; l2=1e-3, 500 steps, lr 2 were chosen by 5-fold cross-validation over the training
  conversations. Annotations are multi-label crowd votes, which caps what a single-label check can reach.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from gopo_jax.dialogue.sop import SOP, UNRECOGNISED, load_sop, sop_from_dict
from gopo_jax.envs.base import DemoTurn, Demonstration, EnvSpec, EpisodeOutcome, HostObs, TurnSignals

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
_SPLIT_EVERY = 4  # every 4th conversation of a category (sorted by id) is held out
_BONUS_CONV, _BONUS_SCENARIO, _BONUS_CATEGORY, _BONUS_STAGE = 0.2, 0.1, 0.05, 0.1
_C_PRIOR, _REL_PRIOR = 4.0, 2.0


class MgshopDataError(ValueError):
    """Malformed, truncated or inconsistent MG-ShopDial input; the message names the file and the record."""


# ----------------------------------------------------------------------------------------------------------------
# Loading and validation


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
            if (not isinstance(pair, list) or len(pair) != 2 or pair[0] not in INTENTS
                    or isinstance(pair[1], bool) or not isinstance(pair[1], (int, float)) or not pair[1] > 0):
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

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise fail(f"not valid JSON ({e}); the file may be truncated — restore it from the source named in "
                   f"{path.parent / 'README.md'}") from None
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text ({e})") from None
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
    """The MGShopDial.json to read; a missing one is an error that says where the data comes from."""
    default = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data" / DATA_FOLDER
    folder = pathlib.Path(data_dir) if data_dir is not None else default
    path = folder / DATA_FILE if folder.is_dir() or folder.suffix != ".json" else folder
    if not path.exists():
        raise FileNotFoundError(
            f"Mgshop data not found at {path}. The environment reads MG-ShopDial's MGShopDial.json (64 conversations "
            f"from github.com/iai-group/MG-ShopDial, described in shared/data/{DATA_FOLDER}/README.md). Put it in "
            f"a folder and point the config at it with --config.env.data_dir=/path/to/{DATA_FOLDER}")
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


# ----------------------------------------------------------------------------------------------------------------
# SOP and statistics fitted from the logged wizard turns


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
    return {"name": "mgshop", "strategies": list(STRATEGIES), "initial": "opening", "stages": stages,
            "derived_from": f"MG-ShopDial training conversations (split by conversation), min_count={min_count}, "
                            f"min_share={min_share}; observed_counts are per strategy in this order"}


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Engagement and relevance tables fitted from logged wizard turns (see the module doc)."""

    cont: np.ndarray  # f32[n_stages, n_k]: P(no nf next | stage, strategy)
    cont_violation: float
    cont_unrecognised: float
    cont_global: float
    next_strategy: dict  # (stage, client intent) -> f64[n_k] smoothed p(k | stage, intent), zero where disallowed
    stage_prior: np.ndarray  # f64[n_stages, n_k] p(k | stage) over allowed strategies


def _beta_mean(pos: float, n: float, prior_mean: float, strength: float) -> float:
    return (pos + strength * prior_mean) / (n + strength)


def fit_statistics(conversations: Sequence[Conversation], sop: SOP, labels: dict[int, list[int | None]]) -> Statistics:
    """c_t and rel_t tables from the logged turns of `conversations` (labels[i] = strategy per turn of conv i)."""
    n_s, n_k = sop.num_stages, sop.num_strategies
    pos = np.zeros((n_s, n_k)); tot = np.zeros((n_s, n_k))
    viol_pos = viol_tot = unrec_pos = unrec_tot = 0.0
    ctx_counts: dict[tuple[int, str], np.ndarray] = {}
    for i, conv in enumerate(conversations):
        ks = labels[i]
        for s, k, turn in zip(logged_stages(sop, conv, ks), ks, conv.turns):
            engaged = float("nf" not in turn.response_intents)
            if k is None:
                unrec_pos += engaged; unrec_tot += 1
            elif not sop.allowed[s, k]:
                viol_pos += engaged; viol_tot += 1
            else:
                pos[s, k] += engaged; tot[s, k] += 1
                key = (s, top_client_intent(turn.intents_before))
                ctx_counts.setdefault(key, np.zeros(n_k))[k] += 1
    glob = _beta_mean(pos.sum(), tot.sum(), 0.5, 2.0)
    per_k = [_beta_mean(pos[:, k].sum(), tot[:, k].sum(), glob, _C_PRIOR) for k in range(n_k)]
    cont = np.array([[_beta_mean(pos[s, k], tot[s, k], per_k[k], _C_PRIOR) for k in range(n_k)]
                     for s in range(n_s)], np.float32)
    allowed = sop.allowed.astype(np.float64)
    stage_prior = (tot + 0.5) * allowed
    stage_prior /= np.maximum(stage_prior.sum(1, keepdims=True), 1e-12)
    next_strategy = {key: (c + _REL_PRIOR * stage_prior[key[0]]) * allowed[key[0]] / (c.sum() + _REL_PRIOR)
                     for key, c in ctx_counts.items()}
    return Statistics(cont=cont, cont_violation=_beta_mean(viol_pos, viol_tot, glob, _C_PRIOR),
                      cont_unrecognised=_beta_mean(unrec_pos, unrec_tot, glob, _C_PRIOR), cont_global=glob,
                      next_strategy=next_strategy, stage_prior=stage_prior)


def strategy_probabilities(stats: Statistics, stage: int, client_intent: str) -> np.ndarray:
    return stats.next_strategy.get((stage, client_intent), stats.stage_prior[stage])


def relevance_grades(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """rel per strategy: 3 for the most likely allowed strategy, 2 for the next two, 1 for other allowed, 0 else."""
    order = [k for k in np.argsort(-probs, kind="stable") if allowed[k]]
    grades = np.zeros(len(probs), np.int32)
    for r, k in enumerate(order):
        grades[k] = 3 if r == 0 else 2 if r < 3 else 1
    return grades


# ----------------------------------------------------------------------------------------------------------------
# Realisation check


@dataclasses.dataclass(frozen=True)
class StrategyClassifier:
    """Multinomial logistic regression on sentence embeddings; `predict_proba(X[N,D]) -> P[N,n_k]`."""

    weights: np.ndarray  # f64[D+1, n_k] (last row: bias)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1e-3, steps: int = 500,
            lr: float = 2.0, balanced: bool = True) -> "StrategyClassifier":
        """Full-batch gradient descent from zeros: deterministic, convex, no randomness to seed.

        `balanced` weighs each class equally; without it the rare strategies (pf: 4% of the labels) are never
        predicted, so no reply could realise them.
        """
        xb = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
        onehot = np.eye(num_classes)[y]
        counts = np.bincount(y, minlength=num_classes).astype(np.float64)
        sample_w = (len(y) / (num_classes * np.maximum(counts, 1.0)))[y] if balanced else np.ones(len(y))
        w = np.zeros((xb.shape[1], num_classes))
        for _ in range(steps):
            p = _softmax(xb @ w)
            grad = xb.T @ ((p - onehot) * sample_w[:, None]) / len(x) + l2 * np.concatenate(
                [w[:-1], np.zeros((1, num_classes))])
            w -= lr * grad
        return cls(weights=w)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1) @ self.weights)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nearest_centroid_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    """The simpler baseline classifier reported next to the logistic regression."""
    centroids = np.stack([x_train[y_train == k].mean(0) if np.any(y_train == k) else np.zeros(x.shape[1])
                          for k in range(num_classes)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.argmax(x @ centroids.T, axis=1)


# ----------------------------------------------------------------------------------------------------------------
# The world (immutable, shared by every env copy) and the environment


@dataclasses.dataclass(frozen=True)
class _Options:
    split: str = "all"
    max_turns: int = 36
    reference: str = "logged"
    reject_below: float = 0.2
    min_count: int = 3
    min_share: float = 0.02
    sop_path: str | None = None  # None: the shipped gopo_jax/envs/sops/mgshop.json


class _World:
    """Data, fitted tables, classifier and embeddings; built once per (file, options) per process."""

    def __init__(self, path: pathlib.Path, opts: _Options):
        from gopo_jax.models.bert import sentence_encoder

        self.path, self.opts = path, opts
        self.conversations = load_conversations(path)
        self.train = split_indices(self.conversations, "train")
        self.test = split_indices(self.conversations, "test")
        self.episode_convs = split_indices(self.conversations, opts.split)
        train_convs = [self.conversations[i] for i in self.train]
        derived = derive_sop(train_convs, min_count=opts.min_count, min_share=opts.min_share)
        self.sop = load_sop(opts.sop_path or SOP_PATH)
        if opts.sop_path is None and self.sop.to_json()["stages"] != sop_from_dict(derived).to_json()["stages"]:
            raise MgshopDataError(f"{SOP_PATH} does not match the SOP derived from {path} with min_count="
                                  f"{opts.min_count}, min_share={opts.min_share}; regenerate it with "
                                  "`python -m gopo_jax.envs.mgshop --write-sop` or pass sop_path=")
        self.encoder = sentence_encoder()
        self._cache: dict[str, np.ndarray] = {}
        texts = sorted({t for c in self.conversations for turn in c.turns
                        for t in (turn.text, turn.customer_before, turn.response)})
        for t, e in zip(texts, self.encoder.encode(texts)):
            self._cache[t] = e
        # Classifier on the training conversations' labelled wizard utterances.
        x, y = self._labelled(self.train)
        self.classifier = StrategyClassifier.fit(x, y, len(STRATEGIES))
        # Every logged turn's strategy (annotation, else R's prediction) and stage, for all conversations.
        self.turn_labels = {i: [t.label for t in c.turns] for i, c in enumerate(self.conversations)}
        self.stats = fit_statistics(train_convs, self.sop, {j: self.turn_labels[i] for j, i in enumerate(self.train)})
        self.replay_labels = {i: [t.label if t.label is not None else self.classify(t.text)[0] for t in c.turns]
                              for i, c in enumerate(self.conversations)}
        # The pool: one entry per logged wizard turn of all conversations.
        self.pool = [(i, j) for i, c in enumerate(self.conversations) for j in range(len(c.turns))]
        self.pool_emb = np.stack([self._cache[self.conversations[i].turns[j].text] for i, j in self.pool])
        self.pool_before_emb = np.stack([self._cache[self.conversations[i].turns[j].customer_before]
                                         for i, j in self.pool])
        self.pool_label = np.array([-1 if self.conversations[i].turns[j].label is None
                                    else self.conversations[i].turns[j].label for i, j in self.pool])
        stages = {i: logged_stages(self.sop, c, self.turn_labels[i]) for i, c in enumerate(self.conversations)}
        self.pool_stage = np.array([stages[i][j] for i, j in self.pool])
        self.pool_conv = np.array([i for i, _ in self.pool])
        self.pool_texts = [self.conversations[i].turns[j].text for i, j in self.pool]
        pool_texts = self.pool_texts
        pred = self.classifier.predict_proba(self.pool_emb).argmax(1)
        # Scripted replies must realise their strategy: only utterances R maps to their own label qualify.
        self.scriptable = (self.pool_label >= 0) & (pred == self.pool_label) & np.array([bool(t) for t in pool_texts])
        self.scenario_of = [c.scenario for c in self.conversations]
        self.category_of = [c.category for c in self.conversations]

    @functools.lru_cache(maxsize=None)
    def scenario_bonus(self, conv: int) -> np.ndarray:
        """Retrieval bonus of every pool entry for a scenario: same conversation, scenario, category."""
        scenario, category = self.scenario_of[conv], self.category_of[conv]
        return (_BONUS_CONV * (self.pool_conv == conv)
                + _BONUS_SCENARIO * np.array([self.scenario_of[c] == scenario for c in self.pool_conv])
                + _BONUS_CATEGORY * np.array([self.category_of[c] == category for c in self.pool_conv]))

    @functools.lru_cache(maxsize=None)
    def same_category(self, conv: int) -> np.ndarray:
        return np.array([self.category_of[c] == self.category_of[conv] for c in self.pool_conv])

    def _labelled(self, conv_indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = [(t.text, t.label) for i in conv_indices for t in self.conversations[i].turns
                if t.label is not None and t.text]
        return np.stack([self._cache[t] for t, _ in rows]), np.array([k for _, k in rows])

    def embed(self, text: str) -> np.ndarray:
        if text not in self._cache:
            self._cache[text] = self.encoder.encode([text])[0]
        return self._cache[text]

    def classify(self, text: str) -> tuple[int, float]:
        """R(reply): (strategy, its probability), UNRECOGNISED for empty or low-confidence replies."""
        if not text.strip():
            return UNRECOGNISED, 0.0
        p = self.classifier.predict_proba(self.embed(text)[None])[0]
        k = int(np.argmax(p))
        return (k if p[k] >= self.opts.reject_below else UNRECOGNISED), float(p[k])


@functools.lru_cache(maxsize=8)
def _world(path: str, opts: _Options) -> _World:
    return _World(pathlib.Path(path), opts)


@dataclasses.dataclass
class _Episode:
    conv: int = 0
    t: int = 0
    stage: int = 0
    customer: str = ""
    client_intent: str = "none"
    done: bool = True
    ticked: set = dataclasses.field(default_factory=set)
    used_pool: set = dataclasses.field(default_factory=set)
    used_replies: set = dataclasses.field(default_factory=set)
    n_pf: int = 0
    n_nf: int = 0
    accepted: bool = False
    started: bool = False


class MgshopEnv:
    """HostEnv over MG-ShopDial (see the module doc). One episode at a time; deepcopy copies only the episode."""

    def __init__(self, world: _World):
        self._w = world
        self.spec = EnvSpec(name="mgshop", sop=world.sop, max_turns=world.opts.max_turns, max_relevance=3,
                            strategy_descriptions=STRATEGY_DESCRIPTIONS)
        self._ep = _Episode()

    def __deepcopy__(self, memo):
        new = copy.copy(self)
        new._ep = copy.deepcopy(self._ep, memo)
        return new

    # -- episode ---------------------------------------------------------------------------------------------
    @property
    def conversation(self) -> Conversation:
        return self._w.conversations[self._ep.conv]

    def _context(self) -> str:
        return (f"MG-ShopDial online shop, category: {self.conversation.category}. You are the shop assistant: "
                "help the customer find and choose products.")

    def _obs(self) -> HostObs:
        return HostObs(context=self._context(), customer=self._ep.customer, stage=self._ep.stage,
                       allowed=self._w.sop.allowed[self._ep.stage].copy(), done=self._ep.done)

    def start(self, conv: int) -> HostObs:
        """Starts the episode of conversation `conv` (an index into the loaded file)."""
        first = self._w.conversations[conv].turns[0]
        self._ep = _Episode(conv=conv, stage=self._w.sop.initial, customer=first.customer_before,
                            client_intent=top_client_intent(first.intents_before), done=False, started=True)
        self._count_feedback(first.intents_before)
        return self._obs()

    def reset(self, seed: int) -> HostObs:
        convs = self._w.episode_convs
        return self.start(convs[int(np.random.default_rng(seed).integers(len(convs)))])

    def _count_feedback(self, intents: dict) -> None:
        self._ep.n_pf += "pf" in intents
        self._ep.n_nf += "nf" in intents
        if "first-recommend" in self._ep.ticked and "pf" in intents and "nf" not in intents:
            self._ep.accepted = True

    def realise(self, reply: str) -> int:
        return self._w.classify(reply)[0]

    def _progress(self, k: int, stage: int) -> list[str]:
        ticked, name = self._ep.ticked, STRATEGIES[k]
        stage_name = STAGES[stage]
        new = []
        if name == "greeting":
            if stage_name == "opening":
                new.append("greetings")
            elif stage_name == "recommendation" and self._ep.accepted:
                new.append("end")
        elif name == "elicit":
            new.append("need" if "need" not in ticked else "preferences")
        elif name == "clarify":
            new.append("clarify")
        elif name == "recommend" and "need" in ticked:
            new.append("first-recommend" if "first-recommend" not in ticked else "second-recommend")
        elif name == "answer" and self._ep.client_intent in QUESTION_INTENTS:
            new.append("qa")
        elif name == "explain" and "first-recommend" in ticked:
            new.append("search")
        return [item for item in new if item not in ticked]

    def _respond(self, reply: str, realised: int, stage: int) -> int:
        """The pool entry whose logged Client response answers this reply (rules in the module doc)."""
        w, ep = self._w, self._ep
        same_conv = w.pool_conv == ep.conv
        exact = [p for p in np.flatnonzero(same_conv) if p not in ep.used_pool
                 and w.conversations[ep.conv].turns[w.pool[p][1]].text == reply.strip()]
        if exact:
            return int(exact[0])
        candidates = w.pool_label == realised
        for narrower in (w.same_category(ep.conv), ~np.isin(np.arange(len(w.pool)), list(ep.used_pool))):
            if (candidates & narrower).any():
                candidates = candidates & narrower
        score = w.pool_emb @ w.embed(reply) + w.scenario_bonus(ep.conv) + _BONUS_STAGE * (w.pool_stage == stage)
        return int(np.argmax(np.where(candidates, score, -np.inf)))

    def step(self, strategy: int, reply: str) -> tuple[HostObs, TurnSignals]:
        ep, w, sop = self._ep, self._w, self._w.sop
        if not ep.started:
            raise RuntimeError("MgshopEnv.step called before reset(seed)")
        if ep.done:
            raise RuntimeError("MgshopEnv.step called after the episode ended; call reset(seed)")
        if not UNRECOGNISED <= int(strategy) < sop.num_strategies:
            raise ValueError(f"strategy {strategy!r} is not an index into {list(STRATEGIES)} (or -1: no Expert)")
        realised, _ = w.classify(reply)
        # Without an Expert (single-agent baselines, the no-EA ablation) the realised strategy counts as chosen.
        strategy = realised if strategy < 0 else int(strategy)
        stage = ep.stage
        valid = realised != UNRECOGNISED and bool(sop.allowed[stage, realised])
        probs = strategy_probabilities(w.stats, stage, ep.client_intent)
        rel = int(relevance_grades(probs, sop.allowed[stage])[strategy]) if valid and strategy >= 0 else 0
        if realised == UNRECOGNISED:
            cont, quality = w.stats.cont_unrecognised, 0.0
        else:
            cont = float(w.stats.cont[stage, realised]) if valid else w.stats.cont_violation
            same = w.pool_label == realised
            quality = float(np.clip((w.pool_emb[same] @ w.embed(reply)).max(), 0.0, 1.0))
        new_items = self._progress(realised, stage) if valid else []
        ep.ticked.update(new_items)
        gain = len(new_items) / len(CHECKLIST)
        if valid:
            ep.stage = int(sop.transition[stage, realised])
        p = self._respond(reply, realised, stage)
        ep.used_pool.add(p)
        ep.used_replies.add(reply.strip())
        turn = w.conversations[w.pool[p][0]].turns[w.pool[p][1]]
        ep.customer, ep.client_intent = turn.response, top_client_intent(turn.response_intents)
        self._count_feedback(turn.response_intents)
        ep.t += 1
        ep.done = bool(turn.final or sop.terminal[ep.stage] or ep.t >= self.spec.max_turns)
        signals = TurnSignals(gain=float(gain), cont=float(cont), rel=rel, quality=quality, realised=int(realised),
                              aligned=bool(realised == strategy and realised >= 0), sop_valid=bool(valid), done=ep.done)
        return self._obs(), signals

    def outcome(self) -> EpisodeOutcome:
        ep = self._ep
        sat = (ep.n_pf + 1) / (ep.n_pf + ep.n_nf + 2)
        return EpisodeOutcome(outcome=int(ep.accepted), satisfaction=float(sat),
                              fcr=int(ep.accepted and "end" in ep.ticked))

    # -- policies ----------------------------------------------------------------------------------------------
    def scripted_reply(self, strategy: int) -> str:
        """A real wizard utterance that R maps to `strategy`, chosen for the current customer text and scenario."""
        w, ep = self._w, self._ep
        cand = w.scriptable & (w.pool_label == strategy)
        if not cand.any():
            raise ValueError(f"no real wizard utterance realises strategy {STRATEGIES[strategy]!r}")
        texts = w.pool_texts
        for narrower in (w.same_category(ep.conv), np.array([t not in ep.used_replies for t in texts])):
            if (cand & narrower).any():
                cand = cand & narrower
        score = (w.pool_before_emb @ w.embed(ep.customer) + w.scenario_bonus(ep.conv)
                 + _BONUS_STAGE * (w.pool_stage == ep.stage))
        return texts[int(np.argmax(np.where(cand, score, -np.inf)))]

    def fitted_strategy(self) -> int:
        """argmax p(k | stage, client intent) among the allowed strategies (the fitted reference policy)."""
        probs = strategy_probabilities(self._w.stats, self._ep.stage, self._ep.client_intent)
        return int(np.argmax(np.where(self._w.sop.allowed[self._ep.stage], probs, -1.0)))

    def reference_turn(self) -> tuple[int, str]:
        ep = self._ep
        turns = self.conversation.turns
        if self._w.opts.reference == "logged" and ep.t < len(turns):
            return int(self._w.replay_labels[ep.conv][ep.t]), turns[ep.t].text
        k = self.fitted_strategy()
        return k, self.scripted_reply(k)

    def demonstrations(self, num_episodes: int, seed: int) -> list[Demonstration]:
        """The logged wizard turns of the split's conversations, in a seed-shuffled order (cycling if needed)."""
        convs = list(self._w.episode_convs)
        order = [convs[i] for i in np.random.default_rng(seed).permutation(len(convs))]
        demos = []
        for n in range(num_episodes):
            conv = self._w.conversations[order[n % len(order)]]
            stages = logged_stages(self._w.sop, conv, self._w.replay_labels[order[n % len(order)]])
            demos.append(Demonstration(context=(
                f"MG-ShopDial online shop, category: {conv.category}. You are the shop assistant: help the "
                "customer find and choose products."), turns=[
                DemoTurn(customer=t.customer_before, strategy=STRATEGIES[k], reply=t.text, stage=int(s))
                for t, k, s in zip(conv.turns, self._w.replay_labels[order[n % len(order)]], stages)]))
        return demos

    def corpus(self) -> Iterable[str]:
        seen = set()
        for c in self._w.conversations:
            for t in (f"MG-ShopDial online shop, category: {c.category}. You are the shop assistant: help the "
                      "customer find and choose products.", *(x for turn in c.turns
                                                             for x in (turn.customer_before, turn.text, turn.response))):
                if t and t not in seen:
                    seen.add(t)
                    yield t
        yield from STRATEGY_DESCRIPTIONS

    # -- reports ------------------------------------------------------------------------------------------------
    def classifier_report(self) -> dict:
        """Held-out (test conversations) accuracy of R, of nearest-centroid, and of the majority class."""
        w = self._w
        x_tr, y_tr = w._labelled(w.train)
        x_te, y_te = w._labelled(w.test)
        p = w.classifier.predict_proba(x_te)
        pred = p.argmax(1)
        recognised = p.max(1) >= w.opts.reject_below
        majority = int(np.bincount(y_tr, minlength=len(STRATEGIES)).argmax())
        nc = nearest_centroid_predict(x_tr, y_tr, x_te, len(STRATEGIES))
        per_class = {STRATEGIES[k]: float(np.mean(pred[y_te == k] == k)) if np.any(y_te == k) else float("nan")
                     for k in range(len(STRATEGIES))}
        return {"n_train": int(len(y_tr)), "n_test": int(len(y_te)),
                "train_conversations": len(w.train), "test_conversations": len(w.test),
                "accuracy": float(np.mean(pred == y_te)),
                "accuracy_with_reject": float(np.mean((pred == y_te) & recognised)),
                "balanced_accuracy": float(np.nanmean(list(per_class.values()))),
                "train_accuracy": float(np.mean(w.classifier.predict_proba(x_tr).argmax(1) == y_tr)),
                "nearest_centroid_accuracy": float(np.mean(nc == y_te)),
                "majority_class": STRATEGIES[majority], "majority_accuracy": float(np.mean(y_te == majority)),
                "per_class_recall": per_class}

    def describe(self) -> dict:
        """The fitted numbers quoted in the module doc."""
        w, st = self._w, self._w.stats
        logged_valid = []
        for i in w.episode_convs:
            conv = w.conversations[i]
            ks = w.turn_labels[i]
            logged_valid += [bool(w.sop.allowed[s, k]) for s, k in zip(logged_stages(w.sop, conv, ks), ks)
                             if k is not None]
        return {
            "sop_allowed": {s: [STRATEGIES[k] for k in np.flatnonzero(w.sop.allowed[i])]
                            for i, s in enumerate(STAGES)},
            "logged_turns_sop_valid": float(np.mean(logged_valid)),
            "cont": {STAGES[s]: {STRATEGIES[k]: round(float(st.cont[s, k]), 3) for k in np.flatnonzero(
                w.sop.allowed[s])} for s in range(len(STAGES)) if w.sop.allowed[s].any()},
            "cont_global": round(st.cont_global, 3), "cont_violation": round(st.cont_violation, 3),
            "cont_unrecognised": round(st.cont_unrecognised, 3),
            "rel_top": {f"{STAGES[s]}|{ci}": STRATEGIES[int(np.argmax(p))]
                        for (s, ci), p in sorted(st.next_strategy.items())},
            "classifier": self.classifier_report(),
        }


def make_env(data_dir: str | pathlib.Path | None = None, split: str = "all", **options: Any) -> MgshopEnv:
    """The Mgshop host environment. Options: max_turns (36), reference ('logged'|'fitted'), reject_below (0.2),
    min_count (3), min_share (0.02), sop_path (None: the shipped SOP)."""
    known = {f.name for f in dataclasses.fields(_Options)} - {"split"}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown Mgshop option(s) {sorted(unknown)}; valid: {sorted(known)}")
    opts = _Options(split=split, **options)
    if opts.reference not in ("logged", "fitted"):
        raise ValueError(f"Mgshop reference must be 'logged' or 'fitted', got {opts.reference!r}")
    split_indices([], split)  # validates the name before the (slow) world is built
    path = resolve_data_path(data_dir)
    return MgshopEnv(_world(str(path.resolve()), opts))


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--write-sop", action="store_true", help=f"re-derive {SOP_PATH} from the data")
    parser.add_argument("--describe", action="store_true", help="print the fitted numbers")
    args = parser.parse_args(argv)
    if args.write_sop:
        convs = load_conversations(resolve_data_path(args.data_dir))
        train = [convs[i] for i in split_indices(convs, "train")]
        SOP_PATH.parent.mkdir(parents=True, exist_ok=True)
        SOP_PATH.write_text(json.dumps(derive_sop(train), indent=1) + "\n")
        print(f"wrote {SOP_PATH}")
    if args.describe:
        print(json.dumps(make_env(args.data_dir).describe(), indent=1))


if __name__ == "__main__":
    _main()
