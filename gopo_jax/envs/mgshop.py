"""MG-ShopDial (env.name "mg_shopdial"): a host environment built from the 64 real MG-ShopDial shopping
conversations (Bernard & Balog, SIGIR 2023).

The data (../shared/data/mgshopdial/MGShopDial.json, see that folder's README.md) holds Client/Wizard (shop
assistant) conversations in four product categories, every utterance annotated with intents and vote counts. This
module turns it into a GOPO world (GOPO.md §1, §5); every number below is fitted by this module from the training
conversations and printed by `describe()` (the values quoted are those of the default options).

Scenario. One real conversation (category, client scenario `desc`, type, constraint). Splits are BY CONVERSATION:
within each category the conversations sorted by id alternate "train", "test" (33/31 conversations); R, the SOP
and the fitted tables come from "train". Customers (gopo_jax/envs/customers.py): a training reset seed draws one of
the 33 training conversations; the held-out 31 are divided into 17 VALIDATION and 14 TEST customers (within each
category sorted by id, alternating), and held-out customer i of a split plays that split's conversation i % its
size. Half the data is held out because a held-out customer is one fixed conversation and evaluation is greedy: a
split of n conversations measures a policy on exactly n dialogues, and the earlier 50/8/6 split's 6 test dialogues
moved a trained run's TSE by up to 0.05 between evaluations, more than any method's change from its SFT start.
Agents see the category and their role, not the client's hidden `desc`.

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
Demonstrations are the logged wizard turns (context, customer text, strategy, utterance); `logged_demonstrations`
returns the same, under the name every world with logged demonstrations shares, and `logged_report` says how they
fit the world: split "all" has 1,047 wizard turns, 1,017 annotated and 30 labelled by R; R agrees with 56.1% of the
annotated ones (it was fitted on the training conversations' turns; its held-out accuracy is below); 97.2% of the
turns are SOP-valid.

Fitted numbers with the default options (split train/test by conversation, from `describe()`):
* SOP allowed masks: opening {greeting, elicit}; discovery and recommendation: all 8 (every strategy passes the
  thresholds there: real wizards do everything once the conversation is under way); closing terminal. 97.1% of the
  labelled logged wizard turns are SOP-valid under it.
* c (P(no nf next)): global 0.961; opening greeting 1.000, elicit 0.981; discovery 0.966 (clarify, recommend) ..
  0.999 (greeting), pf 0.973; recommendation clarify 0.857, pf 0.884, elicit 0.885, explain 0.951, answer 0.955,
  interaction 0.959, recommend 0.982, greeting 0.999. Violations 0.992 and UNRECOGNISED 0.992: the logged data
  shows no engagement cost for either (few cases, mostly wizards who never greeted), so they are penalised only
  through rel_t = 0, g_t = 0 and R_B's SOP term.
* rel top strategy (stage | client intent), e.g. opening|* -> greeting; discovery|o_question -> answer,
  discovery|none -> explain, discovery|interaction -> recommend; recommendation|o_question -> answer,
  recommendation|recommend -> pf, recommendation|nf -> explain, recommendation|greeting -> greeting.
* R: 521 training / 496 held-out labelled utterances (33 / 31 conversations). Held-out accuracy 0.444 (balanced
  accuracy 0.405), majority class "answer" 0.286, nearest centroid 0.440; train accuracy 0.681. The class-balanced
  fit is the default because without balancing pf is never predicted (no reply could realise it); l2=1e-3, 500
  steps, lr 2 were chosen by 5-fold cross-validation over the training conversations of the earlier 50/14 split.
  Annotations are multi-label crowd votes, which caps what a single-label check can reach.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
from absl import flags

from gopo_jax import command_line
from gopo_jax.dialogue.env_protocol import DemoTurn, Demonstration, EnvSpec, EpisodeOutcome, HostObs, TurnSignals
from gopo_jax.dialogue.sop import UNRECOGNISED, load_sop, sop_from_dict
from gopo_jax.envs import customers, logged
from gopo_jax.envs.base import HostEnv
from gopo_jax.envs.mgshop_data import (CHECKLIST, QUESTION_INTENTS, SOP_PATH, STAGES, STRATEGIES,
                                       STRATEGY_DESCRIPTIONS, Conversation, MgshopDataError, customer_indices,
                                       derive_sop, load_conversations, logged_stages, resolve_data_path,
                                       split_indices, top_client_intent)
from gopo_jax.envs.mgshop_stats import (StrategyClassifier, fit_statistics, nearest_centroid_predict,
                                        relevance_grades, strategy_probabilities)

_BONUS_CONV, _BONUS_SCENARIO, _BONUS_CATEGORY, _BONUS_STAGE = 0.2, 0.1, 0.05, 0.1


@dataclasses.dataclass(frozen=True)
class _Options:
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
        self.customers = customer_indices(self.conversations)
        train_convs = [self.conversations[i] for i in self.train]
        derived = derive_sop(train_convs, min_count=opts.min_count, min_share=opts.min_share)
        self.sop = load_sop(opts.sop_path or SOP_PATH)
        if opts.sop_path is None and self.sop.to_json()["stages"] != sop_from_dict(derived).to_json()["stages"]:
            raise MgshopDataError(f"{SOP_PATH} does not match the SOP derived from {path} with min_count="
                                  f"{opts.min_count}, min_share={opts.min_share}; regenerate it with "
                                  "`python -m gopo_jax.envs.mgshop --write_sop` or pass sop_path=")
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


def _context_text(category: str) -> str:
    """What the agents are told about a scenario: the shop category and their role (never the client's `desc`)."""
    return (f"MG-ShopDial online shop, category: {category}. You are the shop assistant: help the customer find and "
            "choose products.")


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


class MgshopEnv(HostEnv):
    """HostEnv over MG-ShopDial (see the module doc). One episode at a time; deepcopy copies only the episode."""

    def __init__(self, world: _World):
        self._w = world
        self.spec = EnvSpec(name="mg_shopdial", sop=world.sop, max_turns=world.opts.max_turns, max_relevance=3,
                            strategy_descriptions=STRATEGY_DESCRIPTIONS)
        self._ep = _Episode()

    # -- episode ---------------------------------------------------------------------------------------------
    @property
    def conversation(self) -> Conversation:
        return self._w.conversations[self._ep.conv]

    def _obs(self) -> HostObs:
        ep = self._ep
        return HostObs(context=_context_text(self.conversation.category), customer=ep.customer, stage=ep.stage,
                       allowed=self._w.sop.allowed[ep.stage].copy(), done=ep.done)

    def start(self, conv: int) -> HostObs:
        """Starts the episode of conversation `conv` (an index into the loaded file)."""
        first = self._w.conversations[conv].turns[0]
        self._ep = _Episode(conv=conv, stage=self._w.sop.initial, customer=first.customer_before,
                            client_intent=top_client_intent(first.intents_before), done=False, started=True)
        self._count_feedback(first.intents_before)
        return self._obs()

    def reset(self, seed: int) -> HostObs:
        split, index = customers.customer(seed)
        convs = self._w.customers[split]
        if split == customers.TRAIN:
            return self.start(convs[int(np.random.default_rng(seed).integers(len(convs)))])
        return self.start(convs[index % len(convs)])

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
        grades = relevance_grades(probs, sop.allowed[stage])
        rel = int(grades[strategy]) if valid and strategy >= 0 else 0
        rel_realised = int(grades[realised]) if valid else 0  # valid: realised is a recognised, allowed strategy
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
        signals = TurnSignals(gain=float(gain), cont=float(cont), rel=rel, rel_realised=rel_realised, quality=quality,
                              realised=int(realised),
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
        """The logged wizard turns of the training conversations, in a seed-shuffled order (cycling if needed)."""
        convs = list(self._w.customers[customers.TRAIN])
        order = [convs[i] for i in np.random.default_rng(seed).permutation(len(convs))]
        demos = []
        for n in range(num_episodes):
            conv = self._w.conversations[order[n % len(order)]]
            stages = logged_stages(self._w.sop, conv, self._w.replay_labels[order[n % len(order)]])
            demos.append(Demonstration(context=_context_text(conv.category), turns=[
                DemoTurn(customer=t.customer_before, strategy=STRATEGIES[k], reply=t.text, stage=int(s))
                for t, k, s in zip(conv.turns, self._w.replay_labels[order[n % len(order)]], stages)]))
        return demos

    def logged_demonstrations(self, num_episodes: int, seed: int) -> list[Demonstration]:
        """The logged wizard dialogues, as every logged-demonstration world names them: this world's
        `demonstrations`, whatever its reference policy."""
        return self.demonstrations(num_episodes, seed)

    def logged_report(self) -> dict:
        """How all 64 conversations' logged wizard turns fit this world (see logged.report). R was fitted on the
        training conversations' turns, so its agreement here is partly training accuracy; `classifier_report` has
        the held-out one."""
        w = self._w
        replayed = []
        for i in range(len(w.conversations)):
            turns = [logged.LoggedTurn(t.customer_before, t.text, None if t.label is None else STRATEGIES[t.label])
                     for t in w.conversations[i].turns]
            replayed += logged.replay(turns, w.sop, self.realise)
        return logged.report(replayed, STRATEGIES, dialogues=len(w.conversations))

    def corpus(self) -> Iterable[str]:
        seen = set()
        for c in self._w.conversations:
            for t in (_context_text(c.category),
                      *(x for turn in c.turns for x in (turn.customer_before, turn.text, turn.response))):
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
        for i, conv in enumerate(w.conversations):
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


def make_env(data_dir: str | pathlib.Path | None = None, **options: Any) -> MgshopEnv:
    """The Mgshop host environment. Options: max_turns (36), reference ('logged'|'fitted'), reject_below (0.2),
    min_count (3), min_share (0.02), sop_path (None: the shipped SOP)."""
    known = {f.name for f in dataclasses.fields(_Options)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown Mgshop option(s) {sorted(unknown)}; valid: {sorted(known)}")
    opts = _Options(**options)
    if opts.reference not in ("logged", "fitted"):
        raise ValueError(f"Mgshop reference must be 'logged' or 'fitted', got {opts.reference!r}")
    path = resolve_data_path(data_dir)
    return MgshopEnv(_world(str(path.resolve()), opts))


def define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "the MG-ShopDial folder (default: ../shared/data/mgshopdial)")
    flags.DEFINE_bool("write_sop", False, f"re-derive {SOP_PATH} from the data")
    flags.DEFINE_bool("describe", False, "print the fitted numbers")


def main(argv) -> None:
    del argv
    f = flags.FLAGS
    if not (f.write_sop or f.describe):
        command_line.fail("nothing to do: pass --write_sop (re-derive the SOP file) and/or --describe")
    try:
        if f.write_sop:
            convs = load_conversations(resolve_data_path(f.data_dir))
            train = [convs[i] for i in split_indices(convs, "train")]
            SOP_PATH.parent.mkdir(parents=True, exist_ok=True)
            SOP_PATH.write_text(json.dumps(derive_sop(train), indent=1) + "\n")
            print(f"wrote {SOP_PATH}")
        if f.describe:
            print(json.dumps(make_env(f.data_dir).describe(), indent=1))
    except (FileNotFoundError, ValueError) as e:
        command_line.fail(str(e))


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
