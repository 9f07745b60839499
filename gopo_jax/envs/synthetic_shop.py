"""The synthetic shop: the embedded default world (GOPO.md §5), pure JAX, no files needed.

A seeded catalogue (categories × products, each with attribute values and a price) is fixed per world; a customer
is drawn per episode from the key: a hidden need (category), hidden preferences (the attribute values of one ideal
product), a budget (a price level the ideal product fits), patience, price sensitivity, and whether the store runs a
promotion (shown in the business context). The agent speaks in template sentences; the realisation check R reads
the reply's ids: the first strategy *cue word* decides the strategy (else UNRECOGNISED), the first product name is
the product it talks about. The customer reacts to the realised strategy and its content, and answers with a
template utterance filled from precomputed id tables (no text inside jit).

Any tokenizer (the embedded BPE, or a checkpoint's, e.g. Qwen3's): every word of running text is the id sequence
of `encode(" " + word)` (the first word of a message without the space where the chat template writes contents as
they are), and a content is the concatenation of its words' sequences. Construction checks that this equals how
the tokenizer encodes the whole text, and raises if it does not (a pre-tokenizer that merges across words cannot
be filled word by word). The embedded BPE makes every world word one id; Qwen's splits a product name into a few.
Utterances are framed by the tokenizer's chat template (`gopo_jax.models.chat_format`): context = system_open +
[preamble, blank line] + content + system_close, customer = user_open + content + user_close, scripted reply =
content + eot. Templates are filled inside jit from padded per-piece id rows (literal runs and slot values of
varying length), and R matches each world word's id sequence at every reply position (first by position; the
longest at one position; a word's bare form only at the reply's start). R reads the world's words as the world
writes them (lowercase: "Hello" is not "hello"). With the embedded tokenizer every pattern is one id, so R and the
filled utterances are exactly those of the one-id lookup tables this replaced (tests/test_synthetic_shop.py pins
them).

Slot lengths (`customer_len`, `reply_len`, `context_len`): a number, checked against the longest filling of every
template with this tokenizer (a clear error names the field and the length needed), or -1 for exactly that longest
filling. The defaults fit the embedded tokenizer (and keep its buffer layout); a checkpoint's tokenizer needs -1 or
larger numbers. A model-written reply is cut at `reply_len`.

Signals (GOPO.md §1); where they come from (a designed world, not data):
* gain g_t: need learned 0.05, preferences learned 0.05, first recommendation in the right category 0.10, plus 0.10 ×
  the rise in the best attribute match, product explained 0.05, price settled (objection handled or a discount
  taken) 0.05, purchase = the rest up to 1. Each once, so Σ g ≤ 1.
* cont c_t: a per-reaction engagement probability (0.98 for a useful move, 0.88 for a premature recommendation,
  0.90 for an irrelevant one, 0.80 for an SOP violation, ...) minus 0.03 on every turn once the customer was not
  greeted. Engagement E = Π c; the customer walks away when E falls below 1 − patience or after two failed closes.
* rel_t: 3 if the reference policy would choose k_t here, 2 if k_t is allowed and useful now, 1 if only allowed,
  0 if the SOP forbids it. q_t: content correctness (attribute match of a recommended product, explaining or
  closing on the product actually recommended).
* outcome = purchase; satisfaction = final engagement E; fcr = purchase without a refused close.

The long horizon matters by design: skipping the greeting costs engagement on every later turn and trust at the
close; recommending before the preferences are known earns an immediate gain but lowers engagement, usually misses
(a fit objection to undo) and lowers trust; a discount offered before any price objection earns the "price
settled" gain at once, but the customer then haggles at the close (a refused close, a second discount, lost fcr).
A one-step greedy policy takes each of these baits; the reference policy (greet, elicit need, elicit preferences,
recommend the best match, handle a price objection, explain, close) does not.
"""
from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.env_protocol import EnvSpec, EpisodeOutcome, JaxObs, TurnSignals
from gopo_jax.dialogue.sop import SOP, UNRECOGNISED, load_sop
from gopo_jax.models import tokenizer as tokenizer_lib
from gopo_jax.models.chat_format import ChatFormat

SOP_PATH = pathlib.Path(__file__).parent / "sops" / "shop.json"

GREET, NEED, PREF, RECOMMEND, EXPLAIN, HANDLE, INCENTIVE, CLOSE = (
    "greet", "elicit_need", "elicit_preference", "recommend", "explain", "handle_objection", "offer_incentive",
    "close")
STRATEGY_NAMES = (GREET, NEED, PREF, RECOMMEND, EXPLAIN, HANDLE, INCENTIVE, CLOSE)
DESCRIPTIONS = {
    GREET: "welcome the customer",
    NEED: "ask what kind of product the customer needs",
    PREF: "ask which attributes and budget the customer prefers",
    RECOMMEND: "recommend one product from the catalogue",
    EXPLAIN: "explain the features of the recommended product",
    HANDLE: "address the customer's objection with arguments",
    INCENTIVE: "offer a promotional discount",
    CLOSE: "ask the customer to place the order",
}
# The first of these words in a reply decides the strategy it realises.
CUE_WORDS = {GREET: "hello", NEED: "looking", PREF: "prefer", RECOMMEND: "recommend", EXPLAIN: "features",
             HANDLE: "understand", INCENTIVE: "discount", CLOSE: "order"}

CATEGORIES = ("laptop", "phone", "chair", "lamp", "backpack", "watch", "kettle", "camera")
ATTRIBUTES = (("colour", ("red", "blue", "green", "black", "white", "grey")),
              ("size", ("small", "medium", "large", "compact", "wide", "slim")),
              ("material", ("steel", "wood", "plastic", "leather", "glass", "fabric")),
              ("style", ("classic", "modern", "sporty", "retro", "minimal", "bold")))
PRICES = ("19", "29", "49", "79", "99", "149", "199", "249", "299", "399", "499", "699")
STORES = ("nordmart", "shopwise", "brightbuy", "cornerstore", "valuehub", "citymarket")
PROMO_WORDS = ("no", "yes")

# Agent reply templates (one or more variants per strategy). Placeholders: {store} {cat} {attr} {product} {val}
# {price}; the scripted reply fills them with the best content for the state.
REPLIES = {
    GREET: ("hello and welcome to {store} how can i help you today",
            "hello there welcome to {store} what can i do for you"),
    NEED: ("what are you looking for today", "tell me what you are looking for"),
    PREF: ("which {attr} do you prefer and what is your budget", "what do you prefer in {attr} and price"),
    RECOMMEND: ("i recommend the {product} in {val} for {price}", "i recommend our {product} it costs {price}"),
    EXPLAIN: ("the {product} has great features and a {val} design", "let me show the features of the {product}"),
    HANDLE: ("i understand your concern the {product} is worth every cent",
             "i understand but the {product} lasts for years"),
    INCENTIVE: ("i can give you a discount on the {product} today", "we have a discount for the {product} now"),
    CLOSE: ("shall i place the order for the {product} now", "can i put in the order for the {product}"),
}

# Customer reaction templates; placeholders {cat} {a0}..{a3} (preferred values) {budget} {product}.
CUSTOMER = {
    "open0": "hi i need some help",
    "open1": "hello i have a question",
    "greeted": "hi thanks i am shopping today",
    "need": "i am looking for a {cat}",
    "need_again": "i already told you i want a {cat}",
    "prefs": "i prefer {prefs} and my budget is {budget}",
    "prefs_again": "as i said i prefer {prefs}",
    "no_need_yet": "i have not said what i need yet",
    "which_one": "which one do you mean",
    "wrong_category": "that is not what i need",
    "fit_objection": "hmm it is not really what i prefer",
    "price_objection": "it looks nice but the price is high",
    "rec_good": "that sounds good tell me more",
    "explained": "thanks that is helpful",
    "explain_pointless": "features do not matter if it is not what i want",
    "already": "you already told me that",
    "handled": "ok that makes sense",
    "not_handled": "i still think it is too expensive",
    "talk_no_fit": "talking will not change what i want",
    "discount_taken": "great i like the discount",
    "no_promo": "so there is no discount then",
    "discount_what": "a discount on what",
    "haggle": "can you do better on the price",
    "not_ready": "i am not ready to buy yet",
    "think": "i need to think about it",
    "bought": "yes please place the order for the {product}",
    "irrelevant": "why are you telling me this",
    "violation": "that seems out of place right now",
    "unrecognised": "sorry i do not understand",
    "goodbye": "never mind goodbye",
}
CUSTOMER_KEYS = tuple(CUSTOMER)
_C = {k: i for i, k in enumerate(CUSTOMER_KEYS)}
CONTEXT_TEMPLATE = "welcome to {store} promo {promo}"

# Slots of the customer fill vector (placeholder -> index).
_CUSTOMER_SLOTS = ("cat", "a0", "a1", "a2", "a3", "budget", "product")
_REPLY_SLOTS = ("store", "cat", "attr", "product", "val", "price")

# Gains (see the module docstring).
G_NEED, G_PREF, G_REC, G_FIT, G_EXPLAIN, G_PRICE = 0.05, 0.05, 0.10, 0.10, 0.05, 0.05


@dataclasses.dataclass(frozen=True)
class SyntheticShopConfig:
    num_categories: int = 6
    products_per_category: int = 8
    num_attributes: int = 3
    values_per_attribute: int = 4
    max_turns: int = 8
    # Slot lengths in tokens; -1: the longest filling with the env's tokenizer (see the module docstring).
    customer_len: int = 16
    reply_len: int = 14
    context_len: int = 8
    catalogue_seed: int = 0
    vocab_size: int = 512  # byte-level BPE vocabulary; the world's words are added on top as single tokens
    promo_probability: float = 0.7
    no_greet_penalty: float = 0.03  # engagement lost on every turn once the greeting was skipped

    def validate(self) -> None:
        def fail(msg):
            return ValueError(f"SyntheticShopConfig: {msg}")
        if not 1 <= self.num_categories <= len(CATEGORIES):
            raise fail(f"num_categories={self.num_categories} must be in 1..{len(CATEGORIES)}")
        if not 1 <= self.num_attributes <= len(ATTRIBUTES):
            raise fail(f"num_attributes={self.num_attributes} must be in 1..{len(ATTRIBUTES)}")
        if not 2 <= self.values_per_attribute <= len(ATTRIBUTES[0][1]):
            raise fail(f"values_per_attribute={self.values_per_attribute} must be in 2..{len(ATTRIBUTES[0][1])}")
        if self.products_per_category < 1 or self.max_turns < 1:
            raise fail("products_per_category and max_turns must be >= 1")
        if not 0.0 <= self.promo_probability <= 1.0:
            raise fail(f"promo_probability={self.promo_probability} must be in [0, 1]")
        for field in ("customer_len", "reply_len", "context_len"):
            value = getattr(self, field)
            if value != -1 and value < 1:
                raise fail(f"{field}={value} must be >= 1, or -1 for the longest filling with the tokenizer")


@dataclasses.dataclass(frozen=True)
class Catalogue:
    names: tuple[str, ...]  # product names, index = product id
    category: np.ndarray  # int32[P]
    attrs: np.ndarray  # int32[P, A] value index per attribute
    price: np.ndarray  # int32[P] index into PRICES
    store: str


def make_catalogue(config: SyntheticShopConfig) -> Catalogue:
    """The world's fixed catalogue, a pure function of the config (seeded)."""
    rng = np.random.default_rng(config.catalogue_seed)
    n = config.num_categories * config.products_per_category
    reserved = set(_all_template_words()) | set(CATEGORIES) | set(PRICES) | set(STORES)
    names: list[str] = []
    consonants, vowels = "bcdfgklmnprstvz", "aeiou"
    while len(names) < n:
        name = "".join(rng.choice(list(consonants)) + rng.choice(list(vowels)) for _ in range(3))
        if name not in reserved and name not in names:
            names.append(name)
    category = np.repeat(np.arange(config.num_categories, dtype=np.int32), config.products_per_category)
    attrs = rng.integers(0, config.values_per_attribute, (n, config.num_attributes)).astype(np.int32)
    # Each category has its own price band so that budgets differ by category.
    base = rng.integers(0, len(PRICES) - 4, config.num_categories)
    price = (base[category] + rng.integers(0, 4, n)).astype(np.int32)
    store = STORES[int(rng.integers(len(STORES)))]
    return Catalogue(tuple(names), category, attrs, price, store)


def _all_template_words() -> list[str]:
    texts = [*(t for v in REPLIES.values() for t in v), *CUSTOMER.values(), CONTEXT_TEMPLATE]
    return [w for t in texts for w in t.split() if not w.startswith("{")]


def world_words(config: SyntheticShopConfig) -> list[str]:
    """Every word the world can say; the embedded tokenizer makes each one id (`train_tokenizer(added_words=...)`)."""
    cat = make_catalogue(config)
    words = [*_all_template_words(), *CATEGORIES[:config.num_categories], *PRICES, *STORES, *PROMO_WORDS,
             *cat.names]
    for name, values in ATTRIBUTES[:config.num_attributes]:
        words += [name, *values[:config.values_per_attribute]]
    return list(dict.fromkeys(words))


def corpus(config: SyntheticShopConfig | None = None) -> list[str]:
    """All texts the world produces (templates filled with every value) plus its words, for tokenizer training."""
    config = config or SyntheticShopConfig()
    cat = make_catalogue(config)
    values = [v for _, vs in ATTRIBUTES[:config.num_attributes] for v in vs[:config.values_per_attribute]]
    texts = []
    for i, name in enumerate(cat.names):
        filling = dict(store=cat.store, cat=CATEGORIES[cat.category[i]], attr=ATTRIBUTES[0][0], product=name,
                       val=values[i % len(values)], price=PRICES[cat.price[i]], budget=PRICES[cat.price[i]],
                       prefs=" ".join(ATTRIBUTES[a][1][cat.attrs[i, a]] for a in range(config.num_attributes)))
        texts += [t.format(**filling) for v in REPLIES.values() for t in v]
        texts += [t.format(**filling) for t in CUSTOMER.values()]
    texts += [CONTEXT_TEMPLATE.format(store=cat.store, promo=p) for p in PROMO_WORDS]
    texts += world_words(config)
    return texts


def special_tokens(sop: SOP) -> list[str]:
    return ([tokenizer_lib.strategy_token(k) for k in sop.strategies]
            + [tokenizer_lib.stage_token(s) for s in sop.stages])


# -------------------------------------------------------------------- words as id sequences (any tokenizer)
class Words(NamedTuple):
    """Id sequences padded to a common width: ids int32[..., W] (pad past each length), lens int32[...]."""

    ids: Any
    lens: Any


class Pieces(NamedTuple):
    """Templates cut into pieces, each a literal run of ids or a slot: ids int32[n, P, W] and lens int32[n, P] of the
    literal runs, slot int32[n, P] (the slot's index, -1 for a literal run); unused pieces are empty literals."""

    ids: Any
    lens: Any
    slot: Any


class Patterns(NamedTuple):
    """Word id sequences the realisation check looks for: ids int32[N, W] (-1 past each length), lens int32[N],
    start_only bool[N] (the bare form of a word, which only opens a message), labels int32[N, len(PATTERN_KINDS)]
    (what the word is of each kind, -1 if it is not of that kind)."""

    ids: Any
    lens: Any
    start_only: Any
    labels: Any


PATTERN_KINDS = ("cue", "product", "value")


def word_sequence(tokenizer, chat_format: ChatFormat, word: str, *, opens_message: bool) -> tuple[int, ...]:
    """The ids of `word` in running text: `encode(" " + word)`, or `encode(word)` for the first word of a message
    when the chat format writes contents without a leading space (as `ChatFormat.content_ids` does)."""
    bare = opens_message and not chat_format.content_space
    ids = tuple(tokenizer.encode(word if bare else " " + word, add_special_tokens=False))
    if not ids:
        raise ValueError(f"synthetic shop: the tokenizer encodes the word {word!r} as no ids")
    return ids


def template_pieces(text: str, slot_names: Sequence[str], encode) -> list[tuple[int, ...] | int]:
    """A template's content as pieces: runs of literal ids (consecutive words merged) and slot indices.
    `encode(word, opens_message)` gives a literal word's ids."""
    pieces: list[tuple[int, ...] | int] = []
    run: list[int] = []
    for position, word in enumerate(text.split()):
        if word.startswith("{"):
            if position == 0:
                # A slot's values are encoded as running text (with their space), so none may open a message.
                raise ValueError(f"synthetic shop: template {text!r} starts with a slot; start it with a word")
            if run:
                pieces.append(tuple(run))
                run = []
            pieces.append(slot_names.index(word[1:-1]))
        else:
            run += encode(word, position == 0)
    if run:
        pieces.append(tuple(run))
    return pieces


def framed(pieces: list, opening: Sequence[int], closing: Sequence[int]) -> list:
    """The pieces with the chat format's opening and closing ids as literal runs around them."""
    return ([tuple(opening)] if opening else []) + list(pieces) + ([tuple(closing)] if closing else [])


def pad_words(seqs: Sequence[Sequence[int]], width: int, pad: int = 0) -> Words:
    ids = np.full((len(seqs), width), pad, np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = seq
    return Words(ids, np.array([len(s) for s in seqs], np.int32))


def pad_pieces(templates: Sequence[list], width: int) -> Pieces:
    n_pieces = max(len(p) for p in templates)
    ids = np.zeros((len(templates), n_pieces, width), np.int32)
    lens = np.zeros((len(templates), n_pieces), np.int32)
    slot = np.full((len(templates), n_pieces), -1, np.int32)
    for i, pieces in enumerate(templates):
        for j, piece in enumerate(pieces):
            if isinstance(piece, int):
                slot[i, j] = piece
            else:
                ids[i, j, :len(piece)], lens[i, j] = piece, len(piece)
    return Pieces(ids, lens, slot)


def fill(pieces: Pieces, slot_words: Words, length: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """One template's pieces (ids [P, W], lens [P], slot [P]) with slot j filled by `slot_words` row j, laid end to
    end into `length` slots -> (ids int32[length], valid bool[length]: exactly the filled ids, a prefix)."""
    chex.assert_rank([pieces.ids, slot_words.ids], 2)
    is_slot = pieces.slot >= 0
    row = jnp.clip(pieces.slot, 0, slot_words.lens.shape[0] - 1)
    ids = jnp.where(is_slot[:, None], slot_words.ids[row], pieces.ids)
    lens = jnp.where(is_slot, slot_words.lens[row], pieces.lens)
    ends = jnp.cumsum(lens)
    k = jnp.arange(length)
    # Position k lies in the first piece that ends after it (empty pieces end where they start and are skipped).
    piece = jnp.minimum(jnp.sum(k[:, None] >= ends[None, :], axis=1), lens.shape[0] - 1)
    offset = jnp.clip(k - (ends - lens)[piece], 0, ids.shape[1] - 1)
    valid = k < ends[-1]
    return jnp.where(valid, ids[piece, offset], pad_id).astype(jnp.int32), valid


def longest_match(reply: jax.Array, reply_valid: jax.Array, patterns: Patterns) -> jax.Array:
    """int32[L]: at each reply position, the longest pattern whose ids start there (every id valid; a start-only
    pattern at position 0 alone), -1 where none does. A static loop over the pattern width, vectorised over
    positions and patterns."""
    chex.assert_rank([reply, reply_valid], 1)
    length = reply.shape[0]
    width = patterns.ids.shape[1]
    match = jnp.ones((length, patterns.lens.shape[0]), bool)
    for j in range(width):
        ids = jnp.full((length,), -1, jnp.int32).at[:max(length - j, 0)].set(reply[j:].astype(jnp.int32))
        ok = jnp.zeros((length,), bool).at[:max(length - j, 0)].set(reply_valid[j:])
        hit = (ids[:, None] == patterns.ids[None, :, j]) & ok[:, None]
        match &= (j >= patterns.lens)[None, :] | hit
    match &= ~patterns.start_only[None, :] | (jnp.arange(length) == 0)[:, None]
    matched_len = jnp.where(match, patterns.lens[None, :], 0)
    return jnp.where(matched_len.max(axis=1) > 0, jnp.argmax(matched_len, axis=1), -1).astype(jnp.int32)


def first_label(best: jax.Array, labels: jax.Array) -> jax.Array:
    """The label (>= 0) of the first position whose matched word has one, else -1. `best` from `longest_match`."""
    hits = jnp.where(best >= 0, labels[jnp.clip(best, 0)], -1)
    idx = jnp.argmax(hits >= 0)
    return jnp.where(hits[idx] >= 0, hits[idx], -1).astype(jnp.int32)


def realisation_patterns(entries: Sequence[tuple[str, str, int]], tokenizer, chat_format: ChatFormat) -> Patterns:
    """Patterns of (word, kind, label) entries: each word's running-text ids, plus its bare form where a message
    opens without a space (a reply may start with it). A word of several kinds is one pattern with several labels."""
    table: dict[tuple[tuple[int, ...], bool], list[int]] = {}
    words_of: dict[tuple[tuple[int, ...], bool], str] = {}
    for word, kind, label in entries:
        spaced = word_sequence(tokenizer, chat_format, word, opens_message=False)
        bare = word_sequence(tokenizer, chat_format, word, opens_message=True)
        forms = [(spaced, False)] + ([(bare, True)] if bare != spaced else [])
        for form in forms:
            labels = table.setdefault(form, [-1] * len(PATTERN_KINDS))
            column = PATTERN_KINDS.index(kind)
            if labels[column] not in (-1, label):
                raise ValueError(f"synthetic shop: the tokenizer encodes {word!r} and {words_of[form]!r} as the same "
                                 f"ids {list(form[0])}; the realisation check cannot tell them apart")
            labels[column] = label
            words_of[form] = word
    forms = list(table)
    width = max(len(ids) for ids, _ in forms)
    padded = pad_words([ids for ids, _ in forms], width, pad=-1)
    return Patterns(ids=padded.ids, lens=padded.lens, start_only=np.array([s for _, s in forms], bool),
                    labels=np.array([table[f] for f in forms], np.int32))


def with_preamble(preamble: str, text: str) -> str:
    """A system message's content: instructions (the SOP), a blank line, the business context; as host worlds
    write it (`dialogue.host_rollout.TextCodec.context`)."""
    return f"{preamble}\n\n{text}" if preamble else text


def check_word_by_word(tokenizer, chat_format: ChatFormat, text: str, pieces: list,
                       fillers: dict[str, list[tuple[str, tuple[int, ...]]]], *, preamble: str = "") -> None:
    """Raises unless `pieces` (from `template_pieces`), filled with every value of each of its slots in turn, are
    the ids `chat_format.content_ids` gives the filled text (after `preamble`): the buffer is assembled word by
    word inside jit, the model reads (and writes) whole texts."""
    names = list(fillers)
    used = sorted({p for p in pieces if isinstance(p, int)})
    for i in range(max([len(fillers[names[s]]) for s in used], default=1)):
        choice = {s: fillers[names[s]][i % len(fillers[names[s]])] for s in used}
        filled = text.format(**{names[s]: word for s, (word, _) in choice.items()})
        by_words = [t for p in pieces for t in (choice[p][1] if isinstance(p, int) else p)]
        whole = chat_format.content_ids(tokenizer, with_preamble(preamble, filled))
        if by_words != whole:
            raise ValueError(
                f"synthetic shop: this tokenizer encodes {filled!r} as {whole}, but word by word as {by_words}. The "
                "shop fills its utterances word by word inside jit, so it cannot run on a tokenizer whose "
                "pre-tokenizer merges across words (a byte-level BPE that splits before every space-led word, like "
                "GPT-2's or Qwen's, works)")


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


def _stack_words(*tables: Words, rows) -> Words:
    """Words row `rows[j]` of `tables[j]`, stacked: the slot values of one template, slot j from table j."""
    return Words(jnp.stack([t.ids[r] for t, r in zip(tables, rows, strict=True)]),
                 jnp.stack([t.lens[r] for t, r in zip(tables, rows, strict=True)]))


@flax.struct.dataclass
class ShopState:
    key: Any  # PRNG key of the customer's per-turn noise
    turn: Any  # int32[]
    stage: Any  # int32[]
    done: Any  # bool[]
    # the hidden customer
    need: Any  # int32[] category
    target: Any  # int32[] the ideal product
    prefs: Any  # int32[A] preferred attribute values (= the ideal product's)
    budget: Any  # int32[] price level the customer accepts
    price_sens: Any  # f32[] probability-like sensitivity to price
    patience: Any  # f32[]: leaves when engagement < 1 - patience
    promo: Any  # bool[] the store has a promotion budget (shown in the context)
    # what happened so far
    greeted: Any
    need_known: Any
    prefs_known: Any
    rec: Any  # int32[] last product recommended in the right category (-1 none)
    best_match: Any  # f32[] best attribute match recommended so far
    rec_done: Any  # bool[] a right-category recommendation was made (its gain taken)
    pushy: Any  # int32[] premature moves (recommend before preferences, discount before objection)
    objection: Any  # int32[] 0 none, 1 price, 2 fit
    explained: Any
    discount: Any  # a discount was given
    anchored: Any  # the discount came before any price objection: the customer will haggle at the close
    haggled: Any
    price_settled: Any  # its gain taken
    close_fails: Any
    purchased: Any
    progress: Any  # f32[] Σ g so far
    engagement: Any  # f32[] Π c so far


class SyntheticShop:
    """The synthetic shop as a `JaxEnv` (see gopo_jax/envs/base.py). Construct with `make_env`."""

    def __init__(self, config: SyntheticShopConfig, tokenizer, sop: SOP, chat_format: ChatFormat,
                 system_preamble: str = ""):
        config.validate()
        self.config = config  # as given: a length of -1 stays -1 here; the env's own lengths are resolved
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.system_preamble = system_preamble
        self.pad_id, self.eot_id = chat_format.pad, chat_format.eot
        self.catalogue = make_catalogue(config)
        missing = [k for k in STRATEGY_NAMES if k not in sop.strategies]
        if missing:
            raise ValueError(f"synthetic shop: SOP {sop.name!r} lacks strategies {missing}; it needs all of "
                             f"{list(STRATEGY_NAMES)}")
        self.spec = EnvSpec(name="synthetic_shop", sop=sop, max_turns=config.max_turns, max_relevance=3,
                            strategy_descriptions=tuple(DESCRIPTIONS.get(k, k) for k in sop.strategies))
        self._sop = sop.as_jax()
        self._k = {name: sop.strategy_index(name) for name in STRATEGY_NAMES}
        self._build_tables()

    # Hash by identity: the env is a static argument of jitted rollouts.
    __hash__ = object.__hash__

    # ---------------------------------------------------------------- id tables (host side, once)
    def _build_tables(self) -> None:
        tok, fmt, cfg, cat = self.tokenizer, self.chat_format, self.config, self.catalogue
        n_attr, n_val = cfg.num_attributes, cfg.values_per_attribute
        values = [ATTRIBUTES[a][1][v] for a in range(n_attr) for v in range(n_val)]  # index a * n_val + v
        vocabulary = {"category": CATEGORIES[:cfg.num_categories], "product": cat.names, "price": PRICES,
                      "value": values, "attr": [name for name, _ in ATTRIBUTES[:n_attr]], "store": [cat.store],
                      "promo": PROMO_WORDS}
        # What each slot is filled with: (word, its ids in running text).
        said = {name: [(w, word_sequence(tok, fmt, w, opens_message=False)) for w in words]
                for name, words in vocabulary.items()}

        prefs = " ".join(f"{{a{a}}}" for a in range(n_attr))
        customer_fillers = {"cat": said["category"],
                            **{f"a{a}": said["value"][a * n_val:(a + 1) * n_val] if a < n_attr else []
                               for a in range(len(ATTRIBUTES))},
                            "budget": said["price"], "product": said["product"]}
        assert tuple(customer_fillers) == _CUSTOMER_SLOTS
        customer, self.customer_len = self._compile(
            [CUSTOMER[k].replace("{prefs}", prefs) for k in CUSTOMER_KEYS], customer_fillers, fmt.user_open,
            fmt.user_close, cfg.customer_len, what="customer utterance", field="customer_len")
        self._n_variants = len(REPLIES[GREET])
        if any(len(REPLIES.get(k, ())) != self._n_variants for k in self.spec.strategies):
            raise ValueError("synthetic shop: every strategy of the SOP needs the same number of reply templates")
        # Scripted replies name the first attribute only (`scripted_reply`).
        reply_fillers = {"store": said["store"], "cat": said["category"], "attr": said["attr"][:1],
                         "product": said["product"], "val": said["value"], "price": said["price"]}
        assert tuple(reply_fillers) == _REPLY_SLOTS
        replies, self.reply_len = self._compile(
            [t for k in self.spec.strategies for t in REPLIES.get(k, ())], reply_fillers, (), (fmt.eot,),
            cfg.reply_len, what="reply", field="reply_len")
        context, self.context_len = self._compile(
            [CONTEXT_TEMPLATE], {"store": said["store"], "promo": said["promo"]}, fmt.system_open, fmt.system_close,
            cfg.context_len, what="context", field="context_len", preamble=self.system_preamble)

        # One width for every literal run and every slot value, so that a template's slots fill from any table.
        width = max([len(p) for t in customer + replies + context for p in t if isinstance(p, tuple)]
                    + [len(ids) for words in said.values() for _, ids in words])
        self._customer_pieces = _as_jax(pad_pieces(customer, width))
        self._reply_pieces = _as_jax(pad_pieces(replies, width))
        self._context_pieces = jax.tree.map(lambda x: x[0], _as_jax(pad_pieces(context, width)))
        words = {name: _as_jax(pad_words([ids for _, ids in seqs], width)) for name, seqs in said.items()}
        self._category_words, self._product_words, self._price_words = (
            words["category"], words["product"], words["price"])
        self._value_words, self._attr_words = words["value"], words["attr"]
        self._store_words, self._promo_words = words["store"], words["promo"]
        self._no_word_table = Words(jnp.zeros((1, width), jnp.int32), jnp.zeros((1,), jnp.int32))

        entries = ([(CUE_WORDS[name], "cue", self._k[name]) for name in CUE_WORDS]
                   + [(name, "product", p) for p, name in enumerate(cat.names)]
                   + [(value, "value", i) for i, value in enumerate(values)])
        self._patterns = _as_jax(realisation_patterns(entries, tok, fmt))
        self._p_cat = jnp.asarray(cat.category)
        self._p_attrs = jnp.asarray(cat.attrs)
        self._p_price = jnp.asarray(cat.price)

    def _compile(self, templates, fillers, opening, closing, configured, *, what, field, preamble=""):
        """Templates -> (their framed pieces, the slot length: `configured`, or the longest filling if -1).
        A `preamble` opens each content (`with_preamble`): the first word is encoded with it.

        Raises if a template filled word by word is not how the tokenizer encodes the filled text, or if its
        longest filling (each slot at its longest value) does not fit `configured`."""
        tok, fmt = self.tokenizer, self.chat_format
        names = list(fillers)

        def encode(word, opens_message):
            if opens_message and preamble:
                return tuple(fmt.content_ids(tok, with_preamble(preamble, word)))
            return word_sequence(tok, fmt, word, opens_message=opens_message)

        compiled, needed, longest = [], 0, ""
        for text in templates:
            content = template_pieces(text, names, encode)
            check_word_by_word(tok, fmt, text, content, fillers, preamble=preamble)
            pieces = framed(content, opening, closing)
            size = sum(len(p) if isinstance(p, tuple) else max((len(ids) for _, ids in fillers[names[p]]), default=0)
                       for p in pieces)
            if size > needed:
                needed, longest = size, text
            compiled.append(pieces)
        if configured == -1:
            return compiled, needed
        if configured < needed:
            raise ValueError(f"SyntheticShopConfig.{field}={configured} is too short for this tokenizer: the {what} "
                             f"{longest!r} fills up to {needed} tokens; set {field} >= {needed}, or -1 for the "
                             "longest filling")
        return compiled, configured

    # ---------------------------------------------------------------- the customer and the catalogue
    def _match(self, state: ShopState, product) -> jax.Array:
        """Fraction of preferred attribute values the product has (0 for a wrong category or no product)."""
        p = jnp.clip(product, 0, self._p_cat.shape[0] - 1)
        m = jnp.mean((self._p_attrs[p] == state.prefs).astype(jnp.float32))
        return jnp.where((product >= 0) & (self._p_cat[p] == state.need), m, 0.0)

    def _in_budget(self, state: ShopState, product) -> jax.Array:
        return self._p_price[jnp.clip(product, 0, self._p_price.shape[0] - 1)] <= state.budget

    def _best_product(self, state: ShopState) -> jax.Array:
        """What a shop assistant would show given what it knows: the best match in budget once the preferences are
        known, the category's first product once only the need is known, product 0 before that."""
        p = jnp.arange(self._p_cat.shape[0])
        same_cat = self._p_cat == state.need
        match = jnp.mean((self._p_attrs == state.prefs[None, :]).astype(jnp.float32), axis=1)
        in_budget = self._p_price <= state.budget
        informed = jnp.argmax(same_cat * 4.0 + match * 2.0 + in_budget * 1.0 - p * 1e-3)
        first_of_cat = jnp.argmax(same_cat)
        return jnp.where(state.prefs_known, informed, jnp.where(state.need_known, first_of_cat, 0)).astype(jnp.int32)

    def _ready(self, state: ShopState, product) -> jax.Array:
        return ((self._match(state, product) >= 1.0) & (state.objection == 0) & state.explained
                & (self._in_budget(state, product) | state.discount))

    def reset(self, key: jax.Array):
        cfg = self.config
        k_need, k_target, k_budget, k_sens, k_pat, k_promo, k_open, k_state = jax.random.split(key, 8)
        need = jax.random.randint(k_need, (), 0, cfg.num_categories)
        target = need * cfg.products_per_category + jax.random.randint(k_target, (), 0, cfg.products_per_category)
        budget = jnp.minimum(self._p_price[target] + jax.random.randint(k_budget, (), 0, 3), len(PRICES) - 1)
        state = ShopState(
            key=k_state, turn=jnp.int32(0), stage=self._sop.initial, done=jnp.bool_(False),
            need=need.astype(jnp.int32), target=target.astype(jnp.int32), prefs=self._p_attrs[target],
            budget=budget.astype(jnp.int32), price_sens=jax.random.uniform(k_sens, ()),
            patience=jax.random.uniform(k_pat, (), minval=0.45, maxval=0.85),
            promo=jax.random.bernoulli(k_promo, cfg.promo_probability),
            greeted=jnp.bool_(False), need_known=jnp.bool_(False), prefs_known=jnp.bool_(False),
            rec=jnp.int32(-1), best_match=jnp.float32(0.0), rec_done=jnp.bool_(False), pushy=jnp.int32(0),
            objection=jnp.int32(0), explained=jnp.bool_(False), discount=jnp.bool_(False),
            anchored=jnp.bool_(False), haggled=jnp.bool_(False), price_settled=jnp.bool_(False),
            close_fails=jnp.int32(0), purchased=jnp.bool_(False), progress=jnp.float32(0.0),
            engagement=jnp.float32(1.0))
        ctx_slots = _stack_words(self._store_words, self._promo_words, rows=(0, state.promo.astype(jnp.int32)))
        ctx, ctx_valid = fill(self._context_pieces, ctx_slots, self.context_len, self.pad_id)
        opener = jnp.where(jax.random.bernoulli(k_open), _C["open0"], _C["open1"])
        return state, ctx, ctx_valid, self._obs(state, opener)

    def _customer_ids(self, state: ShopState, template, product):
        n_attr, n_val = state.prefs.shape[0], self.config.values_per_attribute
        # Slots a{n_attr}.. are in no template: empty.
        unused = len(ATTRIBUTES) - n_attr
        slots = _stack_words(self._category_words, *[self._value_words] * n_attr, *[self._no_word_table] * unused,
                             self._price_words, self._product_words,
                             rows=(state.need, *(a * n_val + state.prefs[a] for a in range(n_attr)), *[0] * unused,
                                   state.budget, jnp.clip(product, 0, self._product_words.lens.shape[0] - 1)))
        return fill(jax.tree.map(lambda x: x[template], self._customer_pieces), slots, self.customer_len,
                    self.pad_id)

    def _obs(self, state: ShopState, template, product=-1) -> JaxObs:
        ids, valid = self._customer_ids(state, template, product)
        return JaxObs(customer=ids, customer_valid=valid, stage=state.stage, allowed=self._sop.mask(state.stage),
                      done=state.done)

    # ---------------------------------------------------------------- realisation check R (pure JAX)
    def realise(self, reply: jax.Array, reply_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """R(reply ids) -> (strategy or UNRECOGNISED, first product id or -1, first attribute value a*V+v or -1).

        Words are matched as id sequences (`longest_match`): the first cue word decides the strategy, the first
        product name and attribute value are what the reply talks about."""
        chex.assert_rank([reply, reply_valid], 1)
        best = longest_match(reply, reply_valid, self._patterns)
        cue, product, value = (first_label(best, self._patterns.labels[:, PATTERN_KINDS.index(kind)])
                               for kind in PATTERN_KINDS)
        return jnp.where(cue >= 0, cue, UNRECOGNISED), product, value

    # ---------------------------------------------------------------- the reference policy and relevance
    def reference_strategy(self, state: ShopState) -> jax.Array:
        k = self._k
        rec_good = (state.rec >= 0) & (self._match(state, state.rec) >= 1.0)
        choice = jnp.select(
            [(state.turn == 0) & ~state.greeted, ~state.need_known, ~state.prefs_known, ~rec_good,
             (state.objection == 1) & state.promo & (state.anchored | state.haggled), state.objection == 1,
             ~state.explained],
            [k[GREET], k[NEED], k[PREF], k[RECOMMEND], k[INCENTIVE], k[HANDLE], k[EXPLAIN]], default=k[CLOSE])
        allowed = self._sop.mask(state.stage)
        # The SOP is the authority: if the plan is not allowed here, take the first allowed strategy.
        return jnp.where(allowed[choice], choice, jnp.argmax(allowed)).astype(jnp.int32)

    def useful(self, state: ShopState) -> jax.Array:
        """bool[n_k]: strategies that would make progress (or are required) in this state."""
        k = self._k
        rec_good = (state.rec >= 0) & (self._match(state, state.rec) >= 1.0)
        flags = {
            GREET: (state.turn == 0) & ~state.greeted,
            NEED: ~state.need_known,
            PREF: state.need_known & ~state.prefs_known,
            RECOMMEND: state.need_known & ~rec_good,
            EXPLAIN: rec_good & ~state.explained,
            HANDLE: state.objection == 1,
            INCENTIVE: (state.objection == 1) & state.promo,
            CLOSE: self._ready(state, state.rec),
        }
        out = jnp.zeros((self.spec.num_strategies,), bool)
        for name, flag in flags.items():
            out = out.at[k[name]].set(flag)
        return out

    def relevance(self, state: ShopState, strategy: jax.Array) -> jax.Array:
        allowed = self._sop.is_allowed(state.stage, strategy)
        safe = jnp.clip(strategy, 0, self.spec.num_strategies - 1)
        grade = jnp.where(strategy == self.reference_strategy(state), 3,
                          jnp.where(self.useful(state)[safe], 2, 1))
        return jnp.where(allowed, grade, 0).astype(jnp.float32)

    # ---------------------------------------------------------------- replies
    def scripted_reply(self, state: ShopState, strategy: jax.Array, key: jax.Array):
        """A template reply realising `strategy` with the best content the agent can know in this state."""
        product = jnp.where(state.rec >= 0, state.rec, self._best_product(state))
        product = jnp.where(strategy == self._k[RECOMMEND], self._best_product(state), product)
        attrs = self._p_attrs[product]
        a = jax.random.randint(key, (), 0, attrs.shape[0])
        slots = _stack_words(self._store_words, self._category_words, self._attr_words, self._product_words,
                             self._value_words, self._price_words,
                             rows=(0, state.need, 0, product, a * self.config.values_per_attribute + attrs[a],
                                   self._p_price[product]))
        variant = jax.random.randint(jax.random.fold_in(key, 1), (), 0, self._n_variants)
        row = jnp.clip(strategy, 0, self.spec.num_strategies - 1) * self._n_variants + variant
        return fill(jax.tree.map(lambda x: x[row], self._reply_pieces), slots, self.reply_len, self.pad_id)

    def reference_turn(self, state: ShopState, key: jax.Array):
        strategy = self.reference_strategy(state)
        reply, valid = self.scripted_reply(state, strategy, key)
        return strategy, reply, valid

    def habit_strategy(self, state: ShopState) -> jax.Array:
        """The myopic habit of the logged human agents (the demonstrator's systematic bias): skip the greeting and
        go straight to the need; recommend as soon as the need is known instead of asking for preferences. Both
        pay off at once and cost later (engagement, a wrong first recommendation), so imitation inherits them and
        only a long-horizon objective removes them."""
        k = self._k
        ref = self.reference_strategy(state)
        habit = jnp.where(ref == k[GREET], k[NEED], jnp.where(ref == k[PREF], k[RECOMMEND], ref))
        return jnp.where(self._sop.is_allowed(state.stage, habit), habit, ref).astype(jnp.int32)

    def demonstration_turn(self, state: ShopState, key: jax.Array, *, noise: float, kind: str = "random"):
        """The reference policy, replaced with probability `noise` by a uniformly random SOP-allowed strategy
        (`kind="random"`) or by the myopic habit (`kind="habit"`, see `habit_strategy`)."""
        k_noise, k_pick, k_reply = jax.random.split(key, 3)
        if kind == "random":
            allowed = self._sop.mask(state.stage)
            deviation = jax.random.choice(k_pick, allowed.shape[0], p=allowed / allowed.sum())
        elif kind == "habit":
            deviation = self.habit_strategy(state)
        else:
            raise ValueError(f"demonstration kind must be 'random' or 'habit', got {kind!r}")
        strategy = jnp.where(jax.random.bernoulli(k_noise, noise), deviation, self.reference_strategy(state))
        reply, valid = self.scripted_reply(state, strategy, k_reply)
        return strategy.astype(jnp.int32), reply, valid

    # ---------------------------------------------------------------- the customer's reaction
    def _react(self, s: ShopState, realised, product, value, noise):
        """-> (new state, gain, cont, quality, template, product to name). `realised` is allowed here."""
        cfg, k = self.config, self._k
        n_val = cfg.values_per_attribute
        rec_or_named = jnp.where(product >= 0, product, s.rec)

        def irrelevant(st):
            return st, 0.0, 0.90, 0.0, _C["irrelevant"], -1

        def greet(st):
            ok = (st.turn == 0) & ~st.greeted
            return (st.replace(greeted=st.greeted | ok), 0.0, jnp.where(ok, 0.99, 0.90), ok * 1.0,
                    jnp.where(ok, _C["greeted"], _C["irrelevant"]), -1)

        def need(st):
            new = ~st.need_known
            return (st.replace(need_known=jnp.bool_(True)), new * G_NEED, jnp.where(new, 0.98, 0.90), 1.0,
                    jnp.where(new, _C["need"], _C["need_again"]), -1)

        def pref(st):
            new = st.need_known & ~st.prefs_known
            template = jnp.select([~st.need_known, new], [_C["no_need_yet"], _C["prefs"]], _C["prefs_again"])
            cont = jnp.select([~st.need_known, new, st.objection == 2], [0.92, 0.98, 0.95], 0.90)
            return st.replace(prefs_known=st.prefs_known | st.need_known), new * G_PREF, cont, new * 1.0, template, -1

        def recommend(st):
            m = self._match(st, product)
            right_cat = (product >= 0) & (self._p_cat[jnp.clip(product, 0)] == st.need)
            gain = right_cat * (~st.rec_done * G_REC + G_FIT * jnp.maximum(m - st.best_match, 0.0))
            premature = ~st.prefs_known
            in_budget = self._in_budget(st, product)
            price_obj = right_cat & (m >= 1.0) & (~in_budget | (noise[0] < 0.5 * st.price_sens))
            objection = jnp.where(right_cat, jnp.where(m < 1.0, 2, jnp.where(price_obj, 1, 0)), st.objection)
            template = jnp.select([product < 0, ~right_cat, m < 1.0, price_obj],
                                  [_C["which_one"], _C["wrong_category"], _C["fit_objection"],
                                   _C["price_objection"]], _C["rec_good"])
            cont = jnp.select([product < 0, ~right_cat, premature], [0.90, 0.85, 0.88], 0.98)
            new = st.replace(
                rec=jnp.where(right_cat, product, st.rec), best_match=jnp.maximum(st.best_match, m),
                rec_done=st.rec_done | right_cat, pushy=st.pushy + (premature & (product >= 0)),
                objection=objection.astype(jnp.int32),
                explained=jnp.where(right_cat & (product != st.rec), False, st.explained))
            return new, gain, cont, m * in_budget, template, product

        def explain(st):
            good = (st.rec >= 0) & (self._match(st, st.rec) >= 1.0)
            on_rec = (product < 0) | (product == st.rec)
            rec_values = jnp.arange(st.prefs.shape[0]) * n_val + self._p_attrs[jnp.clip(st.rec, 0)]
            value_ok = (value < 0) | jnp.any(value == rec_values)
            new = good & on_rec & ~st.explained
            template = jnp.select([st.rec < 0, ~good, new], [_C["irrelevant"], _C["explain_pointless"],
                                                             _C["explained"]], _C["already"])
            cont = jnp.select([st.rec < 0, ~good, new], [0.90, 0.90, 0.98], 0.92)
            return (st.replace(explained=st.explained | new), new * G_EXPLAIN, cont, (on_rec & value_ok) * 1.0,
                    template, -1)

        def settle(st, resolved):
            gain = resolved * ~st.price_settled * G_PRICE
            return st.replace(objection=jnp.where(resolved, 0, st.objection).astype(jnp.int32),
                              price_settled=st.price_settled | resolved), gain

        def handle(st):
            price = st.objection == 1
            # A second argument convinces more easily; a customer anchored on an early discount only takes more.
            resolved = price & ~st.anchored & (noise[1] > st.price_sens * jnp.where(st.haggled, 0.5, 1.0))
            new, gain = settle(st, resolved)
            template = jnp.select([st.objection == 0, st.objection == 2, resolved],
                                  [_C["irrelevant"], _C["talk_no_fit"], _C["handled"]], _C["not_handled"])
            cont = jnp.select([st.objection == 0, st.objection == 2, resolved], [0.90, 0.90, 0.97], 0.93)
            return new.replace(haggled=st.haggled | (price & ~resolved)), gain, cont, price * 1.0, template, -1

        def incentive(st):
            price = st.objection == 1
            premature = (st.objection == 0) & ~st.discount & (st.rec >= 0)
            takes = st.promo & (price | premature)
            new, gain = settle(st, takes)
            template = jnp.select([~st.promo, takes, st.discount], [_C["no_promo"], _C["discount_taken"],
                                                                    _C["already"]], _C["discount_what"])
            cont = jnp.select([~st.promo, takes], [0.85, 0.99], 0.90)
            new = new.replace(discount=st.discount | takes, anchored=st.anchored | (takes & premature),
                              pushy=st.pushy + (takes & premature))
            return new, gain, cont, takes * 1.0, template, -1

        def close(st):
            target = rec_or_named
            haggle = st.anchored & ~st.haggled & (target >= 0)
            ready = self._ready(st, target) & ~haggle
            trust = 1.0 - 0.2 * st.pushy - 0.15 * ~st.greeted
            buys = ready & (noise[2] < trust)
            fails = ~buys
            template = jnp.select([haggle, buys, ready], [_C["haggle"], _C["bought"], _C["think"]], _C["not_ready"])
            cont = jnp.select([haggle, buys, ready], [0.85, 1.0, 0.85], 0.80)
            gain = buys * (1.0 - st.progress)
            new = st.replace(purchased=buys, close_fails=st.close_fails + fails, haggled=st.haggled | haggle,
                             objection=jnp.where(haggle, 1, st.objection).astype(jnp.int32))
            return new, gain, cont, (self._match(st, target) >= 1.0) * 1.0, template, target

        branches = {GREET: greet, NEED: need, PREF: pref, RECOMMEND: recommend, EXPLAIN: explain,
                    HANDLE: handle, INCENTIVE: incentive, CLOSE: close}
        fns = [irrelevant] * self.spec.num_strategies
        for name, fn in branches.items():
            fns[k[name]] = fn

        def wrap(fn):
            def run(st):
                new, gain, cont, quality, template, named = fn(st)
                return (new, jnp.asarray(gain, jnp.float32), jnp.asarray(cont, jnp.float32),
                        jnp.asarray(quality, jnp.float32), jnp.asarray(template, jnp.int32),
                        jnp.asarray(named, jnp.int32))
            return run

        return jax.lax.switch(jnp.clip(realised, 0, len(fns) - 1), [wrap(f) for f in fns], s)

    def step(self, state: ShopState, strategy: jax.Array, reply: jax.Array, reply_valid: jax.Array):
        chex.assert_shape([reply, reply_valid], (self.reply_len,))
        realised, product, value = self.realise(reply, reply_valid)
        # Without an Expert (single-agent baselines, the no-EA ablation) the chosen strategy is the realised one.
        strategy = jnp.asarray(strategy, jnp.int32)
        strategy = jnp.where(strategy < 0, realised, strategy)
        sop_valid = self._sop.is_allowed(state.stage, realised)
        key, k_noise = jax.random.split(state.key)
        noise = jax.random.uniform(k_noise, (3,))
        reacted, gain, cont, quality, template, named = self._react(state, realised, product, value, noise)
        # An unrecognised or SOP-violating reply changes nothing but the customer's mood.
        new = jax.tree.map(lambda a, b: jnp.where(sop_valid, a, b), reacted, state)
        gain = jnp.where(sop_valid, jnp.minimum(gain, 1.0 - state.progress), 0.0)
        cont = jnp.where(sop_valid, cont, jnp.where(realised == UNRECOGNISED, 0.85, 0.80))
        template = jnp.where(sop_valid, template,
                             jnp.where(realised == UNRECOGNISED, _C["unrecognised"], _C["violation"]))
        quality = jnp.where(sop_valid, quality, 0.0)
        cont = jnp.clip(cont - self.config.no_greet_penalty * (~new.greeted & (state.turn > 0)), 0.0, 1.0)
        engagement = state.engagement * cont
        abandoned = ~new.purchased & ((engagement < 1.0 - state.patience) | (new.close_fails >= 2))
        template = jnp.where(abandoned, _C["goodbye"], template)
        turn = state.turn + 1
        new = new.replace(key=key, turn=turn, stage=self._sop.advance(state.stage, realised),
                          progress=state.progress + gain, engagement=engagement,
                          done=new.purchased | abandoned | (turn >= self.config.max_turns))
        signals = TurnSignals(
            gain=gain, cont=cont, rel=self.relevance(state, strategy),
            rel_realised=self.relevance(state, realised), quality=quality, realised=realised,
            aligned=((realised == strategy) & (realised >= 0)).astype(jnp.float32),
            sop_valid=sop_valid.astype(jnp.float32),
            done=new.done)
        obs = self._obs(new, template, named)
        # No-op once done: state unchanged, padding observation and zero signals.
        was_done = state.done
        new = jax.tree.map(lambda a, b: jnp.where(was_done, b, a), new, state)
        obs = obs.replace(customer=jnp.where(was_done, self.pad_id, obs.customer),
                          customer_valid=obs.customer_valid & ~was_done, done=obs.done | was_done)
        signals = jax.tree.map(lambda x: jnp.where(was_done, jnp.zeros_like(x), x), signals)
        signals = signals.replace(realised=jnp.where(was_done, UNRECOGNISED, realised), done=new.done)
        return new, obs, signals

    def outcome(self, state: ShopState) -> EpisodeOutcome:
        return EpisodeOutcome(outcome=state.purchased.astype(jnp.float32), satisfaction=state.engagement,
                              fcr=(state.purchased & (state.close_fails == 0)).astype(jnp.float32))


def make_env(config: SyntheticShopConfig | None = None, tokenizer=None, *, chat_format: ChatFormat | None = None,
             system_preamble: str = "", sop_path=SOP_PATH) -> SyntheticShop:
    """The synthetic shop; trains its byte-level BPE on `corpus(config)` when no tokenizer is given.

    `tokenizer` may be any Hugging Face tokenizer with a chat template (a checkpoint's); `chat_format` defaults to
    `ChatFormat.from_tokenizer(tokenizer)`. With a tokenizer that writes world words as several ids, set the slot
    lengths to -1 (or large enough: the error says how large). `system_preamble` (e.g. `sop.prompt(...)`) opens
    the system message before the business context (`with_preamble`); context_len must then hold it too."""
    config = config or SyntheticShopConfig()
    config.validate()
    sop = load_sop(sop_path)
    if tokenizer is None:
        tokenizer = tokenizer_lib.train_tokenizer(corpus(config), vocab_size=config.vocab_size,
                                                  special_tokens=special_tokens(sop),
                                                  added_words=world_words(config))
    return SyntheticShop(config, tokenizer, sop, chat_format or ChatFormat.from_tokenizer(tokenizer),
                         system_preamble)
