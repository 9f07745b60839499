"""The synthetic shop: the embedded default world (GOPO.md §5), pure JAX, no files needed.

A seeded catalogue (categories × products, each with attribute values and a price) is fixed per world; a customer
is drawn per episode from the key: a hidden need (category), hidden preferences (the attribute values of one ideal
product), a budget (a price level the ideal product fits), patience, price sensitivity, and whether the store runs a
promotion (shown in the business context). The agent speaks in template sentences; the realisation check R reads
the reply's ids: the first strategy *cue word* decides the strategy (else UNRECOGNISED), the first product name is
the product it talks about. The customer reacts to the realised strategy and its content, and answers with a
template utterance filled from precomputed id tables (no text inside jit).

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
import functools
import pathlib
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gopo_jax.dialogue.env_protocol import EnvSpec, EpisodeOutcome, JaxObs, TurnSignals
from gopo_jax.dialogue.sop import SOP, UNRECOGNISED, load_sop
from gopo_jax.models import tokenizer as tokenizer_lib

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
    """Every word the world can say: each becomes one token (the id tables and the realisation check need it)."""
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
        fill = dict(store=cat.store, cat=CATEGORIES[cat.category[i]], attr=ATTRIBUTES[0][0], product=name,
                    val=values[i % len(values)], price=PRICES[cat.price[i]], budget=PRICES[cat.price[i]],
                    prefs=" ".join(ATTRIBUTES[a][1][cat.attrs[i, a]] for a in range(config.num_attributes)))
        texts += [t.format(**fill) for v in REPLIES.values() for t in v]
        texts += [t.format(**fill) for t in CUSTOMER.values()]
    texts += [CONTEXT_TEMPLATE.format(store=cat.store, promo=p) for p in PROMO_WORDS]
    texts += world_words(config)
    return texts


def special_tokens(sop: SOP) -> list[str]:
    return ([tokenizer_lib.strategy_token(k) for k in sop.strategies]
            + [tokenizer_lib.stage_token(s) for s in sop.stages])


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

    def __init__(self, config: SyntheticShopConfig, tokenizer, sop: SOP):
        config.validate()
        self.config = config
        self.tokenizer = tokenizer
        self.catalogue = make_catalogue(config)
        missing = [k for k in STRATEGY_NAMES if k not in sop.strategies]
        if missing:
            raise ValueError(f"synthetic shop: SOP {sop.name!r} lacks strategies {missing}; it needs all of "
                             f"{list(STRATEGY_NAMES)}")
        self.spec = EnvSpec(name="synthetic_shop", sop=sop, max_turns=config.max_turns, max_relevance=3,
                            strategy_descriptions=tuple(DESCRIPTIONS.get(k, k) for k in sop.strategies))
        self.customer_len, self.reply_len, self.context_len = config.customer_len, config.reply_len, config.context_len
        self._sop = sop.as_jax()
        self._k = {name: sop.strategy_index(name) for name in STRATEGY_NAMES}
        self._build_tables()

    # Hash by identity: the env is a static argument of jitted rollouts.
    __hash__ = object.__hash__

    # ---------------------------------------------------------------- id tables (host side, once)
    def _build_tables(self) -> None:
        tok, cfg, cat = self.tokenizer, self.config, self.catalogue
        sid = tokenizer_lib.special_ids(tok)
        for t in (tokenizer_lib.CONTEXT, tokenizer_lib.CUSTOMER, tokenizer_lib.EOT, tokenizer_lib.PAD):
            if t not in sid:
                raise ValueError(f"synthetic shop: tokenizer lacks special token {t}; train it with "
                                 "synthetic_shop.make_env() or tokenizer.train_tokenizer(special_tokens=...)")
        self.pad_id, self.eot_id = sid[tokenizer_lib.PAD], sid[tokenizer_lib.EOT]
        self.customer_id, self.context_id = sid[tokenizer_lib.CUSTOMER], sid[tokenizer_lib.CONTEXT]
        w = functools.partial(tokenizer_lib.word_id, tok)
        vocab = len(tok)
        n_attr, n_val = cfg.num_attributes, cfg.values_per_attribute
        cue = np.full((vocab,), UNRECOGNISED, np.int32)
        for name, word in CUE_WORDS.items():
            cue[w(word)] = self._k[name]
        product_of = np.full((vocab,), -1, np.int32)
        for p, name in enumerate(cat.names):
            product_of[w(name)] = p
        value_ids = np.array([[w(ATTRIBUTES[a][1][v]) for v in range(n_val)] for a in range(n_attr)], np.int32)
        value_of = np.full((vocab,), -1, np.int32)  # a * n_val + v
        for a in range(n_attr):
            for v in range(n_val):
                value_of[value_ids[a, v]] = a * n_val + v
        self._cue = jnp.asarray(cue)
        self._product_of = jnp.asarray(product_of)
        self._value_of = jnp.asarray(value_of)
        self._value_ids = jnp.asarray(value_ids)
        self._category_ids = jnp.asarray([w(c) for c in CATEGORIES[:cfg.num_categories]], jnp.int32)
        self._product_ids = jnp.asarray([w(n) for n in cat.names], jnp.int32)
        self._price_ids = jnp.asarray([w(p) for p in PRICES], jnp.int32)
        self._p_cat = jnp.asarray(cat.category)
        self._p_attrs = jnp.asarray(cat.attrs)
        self._p_price = jnp.asarray(cat.price)
        self._store_id = w(cat.store)
        self._attr_name_ids = jnp.asarray([w(ATTRIBUTES[a][0]) for a in range(n_attr)], jnp.int32)
        self._promo_ids = jnp.asarray([w(p) for p in PROMO_WORDS], jnp.int32)

        prefs = " ".join(f"{{a{a}}}" for a in range(n_attr))
        customer = [CUSTOMER[k].replace("{prefs}", prefs) for k in CUSTOMER_KEYS]
        self._cust_codes, self._cust_valid = self._compile(
            customer, _CUSTOMER_SLOTS, cfg.customer_len, prefix=self.customer_id, what="customer utterance",
            field="customer_len")
        replies = [t for k in self.spec.strategies for t in REPLIES.get(k, ())]
        self._n_variants = len(REPLIES[GREET])
        if any(len(REPLIES.get(k, ())) != self._n_variants for k in self.spec.strategies):
            raise ValueError("synthetic shop: every strategy of the SOP needs the same number of reply templates")
        self._reply_codes, self._reply_valid = self._compile(
            replies, _REPLY_SLOTS, cfg.reply_len, prefix=None, what="reply", field="reply_len")
        ctx_codes, ctx_valid = self._compile([CONTEXT_TEMPLATE], ("store", "promo"), cfg.context_len,
                                             prefix=self.context_id, what="context", field="context_len",
                                             eot=False)
        self._ctx_codes, self._ctx_valid = ctx_codes[0], ctx_valid[0]

    def _compile(self, templates, slots, length, *, prefix, what, field, eot=True):
        """Templates -> (codes int32[n, length], valid bool[n, length]); code >= 0 is a token id, -1-j slot j."""
        codes = np.full((len(templates), length), self.pad_id, np.int32)
        valid = np.zeros((len(templates), length), bool)
        for i, text in enumerate(templates):
            row = [] if prefix is None else [prefix]
            for word in text.split():
                if word.startswith("{"):
                    row.append(-1 - slots.index(word[1:-1]))
                else:
                    row.append(tokenizer_lib.word_id(self.tokenizer, word))
            if eot:
                row.append(self.eot_id)
            if len(row) > length:
                raise ValueError(f"SyntheticShopConfig.{field}={length} is too short for the {what} {text!r} "
                                 f"({len(row)} tokens); raise {field}")
            codes[i, :len(row)] = row
            valid[i, :len(row)] = True
        return jnp.asarray(codes), jnp.asarray(valid)

    @staticmethod
    def _fill(codes, valid, slot_ids):
        filled = jnp.where(codes >= 0, codes, slot_ids[jnp.clip(-1 - codes, 0, slot_ids.shape[0] - 1)])
        return filled.astype(jnp.int32), valid

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
        ctx_slots = jnp.stack([jnp.int32(self._store_id), self._promo_ids[state.promo.astype(jnp.int32)]])
        ctx, ctx_valid = self._fill(self._ctx_codes, self._ctx_valid, ctx_slots)
        opener = jnp.where(jax.random.bernoulli(k_open), _C["open0"], _C["open1"])
        return state, ctx, ctx_valid, self._obs(state, opener)

    def _customer_ids(self, state: ShopState, template, product):
        prefs = jnp.concatenate([self._value_ids[jnp.arange(state.prefs.shape[0]), state.prefs],
                                 jnp.full((4 - state.prefs.shape[0],), self.pad_id, jnp.int32)])
        slots = jnp.concatenate([self._category_ids[state.need][None], prefs, self._price_ids[state.budget][None],
                                 self._product_ids[jnp.clip(product, 0, self._product_ids.shape[0] - 1)][None]])
        return self._fill(self._cust_codes[template], self._cust_valid[template], slots)

    def _obs(self, state: ShopState, template, product=-1) -> JaxObs:
        ids, valid = self._customer_ids(state, template, product)
        return JaxObs(customer=ids, customer_valid=valid, stage=state.stage, allowed=self._sop.mask(state.stage),
                      done=state.done)

    # ---------------------------------------------------------------- realisation check R (pure JAX)
    def realise(self, reply: jax.Array, reply_valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """R(reply ids) -> (strategy or UNRECOGNISED, first product id or -1, first attribute value a*V+v or -1)."""
        chex.assert_rank([reply, reply_valid], 1)

        def first(table):
            hits = jnp.where(reply_valid, table[reply], -1)
            idx = jnp.argmax(hits >= 0)
            return jnp.where(hits[idx] >= 0, hits[idx], -1).astype(jnp.int32)

        strategy = first(self._cue)
        return jnp.where(strategy >= 0, strategy, UNRECOGNISED), first(self._product_of), first(self._value_of)

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
        slots = jnp.stack([jnp.int32(self._store_id), self._category_ids[state.need], self._attr_name_ids[0],
                           self._product_ids[product], self._value_ids[a, attrs[a]],
                           self._price_ids[self._p_price[product]]])
        variant = jax.random.randint(jax.random.fold_in(key, 1), (), 0, self._n_variants)
        row = jnp.clip(strategy, 0, self.spec.num_strategies - 1) * self._n_variants + variant
        return self._fill(self._reply_codes[row], self._reply_valid[row], slots)

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
            gain=gain, cont=cont, rel=self.relevance(state, strategy), quality=quality, realised=realised,
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


def make_env(config: SyntheticShopConfig | None = None, tokenizer=None, *, sop_path=SOP_PATH) -> SyntheticShop:
    """The synthetic shop; trains its byte-level BPE on `corpus(config)` when no tokenizer is given."""
    config = config or SyntheticShopConfig()
    config.validate()
    sop = load_sop(sop_path)
    if tokenizer is None:
        tokenizer = tokenizer_lib.train_tokenizer(corpus(config), vocab_size=config.vocab_size,
                                                  special_tokens=special_tokens(sop),
                                                  added_words=world_words(config))
    return SyntheticShop(config, tokenizer, sop)
