"""Tests for gopo_jax/envs/synthetic_shop.py on tokenizers that write world words as several ids: Qwen3's (the real
151,669-token vocabulary, tests/hf_fixtures.py) and a small ChatML byte-level BPE with Qwen's pre-tokenizer that
splits even the template words; plus the pure pieces (template filling, id-sequence matching)."""
import dataclasses
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from absl.testing import parameterized
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from gopo_jax.dialogue.sop import UNRECOGNISED
from gopo_jax.envs import synthetic_shop as ss
from tests.hf_fixtures import qwen3_tok  # noqa: F401  (fixture)

# Qwen2/Qwen3's pre-tokenizer split: a letter run takes at most one leading non-letter (the space), digits go one
# by one, so no piece ever spans a space before a letter.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
FITTED = ss.SyntheticShopConfig(customer_len=-1, reply_len=-1, context_len=-1)
SIGNALS = ("strategy", "realised", "gain", "cont", "rel", "quality", "aligned", "sop_valid", "done", "outcome",
           "satisfaction", "fcr")


def chatml_bpe(*, split_words: bool = True, vocab_size: int = 320) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE trained on the shop's corpus without its words as added tokens: with a few dozen merges most
    words are several ids. `split_words=False` drops Qwen's split, so merges run across spaces."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_SPLIT), behavior="isolated"), byte_level])
        if split_words else byte_level)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(ss.corpus(), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                                pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"],
                                                clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    return fast


def play(env, turn_fn, keys):
    """Episodes driven by `env.reset`/`env.step` alone (no agents, no dialogue buffer), one per key: the customer's
    utterance before each turn, the turn and its signals, and the outcome."""
    def episode(key):
        k_reset, k_agent = jax.random.split(key)
        state, context, context_valid, obs = env.reset(k_reset)

        def turn(carry, t):
            state, obs = carry
            strategy, reply, valid = turn_fn(env, state, jax.random.fold_in(k_agent, t))
            new, new_obs, sig = env.step(state, strategy, reply, valid)
            rec = dict(customer=obs.customer, customer_valid=obs.customer_valid, strategy=strategy, reply=reply,
                       reply_valid=valid, gain=sig.gain, cont=sig.cont, rel=sig.rel, quality=sig.quality,
                       realised=sig.realised, aligned=sig.aligned, sop_valid=sig.sop_valid, done=sig.done)
            return (new, new_obs), rec

        (state, _), turns = jax.lax.scan(turn, (state, obs), jnp.arange(env.spec.max_turns))
        out = env.outcome(state)
        return dict(context=context, context_valid=context_valid, outcome=out.outcome,
                    satisfaction=out.satisfaction, fcr=out.fcr, **turns)
    return jax.device_get(jax.jit(jax.vmap(episode))(keys))


POLICIES = {"reference": lambda env, s, k: env.reference_turn(s, k),
            "demonstrator": lambda env, s, k: env.demonstration_turn(s, k, noise=0.5)}
KEYS = jax.random.split(jax.random.PRNGKey(5), 24)


@pytest.fixture(scope="module")
def embedded():
    env = ss.make_env()
    return env, {name: play(env, fn, KEYS) for name, fn in POLICIES.items()}


@pytest.fixture(scope="module", params=["qwen3", "chatml_bpe"])
def shop(request):
    tok = request.getfixturevalue("qwen3_tok") if request.param == "qwen3" else chatml_bpe()
    env = ss.make_env(FITTED, tokenizer=tok)
    return env, {name: play(env, fn, KEYS) for name, fn in POLICIES.items()}


def _content(env, ids, valid) -> str:
    """The text of an embedded-tokenizer utterance without its role and end tokens."""
    return env.tokenizer.decode(np.asarray(ids)[np.asarray(valid)], skip_special_tokens=True).strip()


def _ids(ids, valid) -> list[int]:
    return np.asarray(ids)[np.asarray(valid)].tolist()


# -------------------------------------------------------------------- the pure pieces
class FillAndMatchTest(parameterized.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_fill_lays_literal_runs_and_slot_values_end_to_end(self):
        # pieces: the run (5, 6), slot 0, an empty run, slot 1, the run (9,); widths padded to 3
        pieces = ss.Pieces(ids=jnp.array([[5, 6, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [9, 0, 0]]),
                           lens=jnp.array([2, 0, 0, 0, 1]), slot=jnp.array([-1, 0, -1, 1, -1]))
        slots = ss.Words(ids=jnp.array([[1, 2, 3], [7, 0, 0]]), lens=jnp.array([3, 1]))
        ids, valid = self.variant(ss.fill, static_argnums=(2, 3))(pieces, slots, 9, -4)
        np.testing.assert_array_equal(ids, [5, 6, 1, 2, 3, 7, 9, -4, -4])
        np.testing.assert_array_equal(valid, [True] * 7 + [False] * 2)
        empty_slot = slots._replace(lens=jnp.array([3, 0]))
        ids, valid = self.variant(ss.fill, static_argnums=(2, 3))(pieces, empty_slot, 6, -4)
        np.testing.assert_array_equal(ids, [5, 6, 1, 2, 3, 9])
        assert bool(valid.all())

    @chex.variants(with_jit=True, without_jit=True)
    def test_longest_match_prefers_the_longest_word_at_a_position(self):
        # 0: [10] a cue; 1: [10, 11] a product starting like it; 2: [20] a bare form (opens a message only);
        # 3: [30, 31] a value
        patterns = ss.Patterns(ids=jnp.array([[10, -1], [10, 11], [20, -1], [30, 31]]), lens=jnp.array([1, 2, 1, 2]),
                               start_only=jnp.array([False, False, True, False]),
                               labels=jnp.array([[4, -1, -1], [-1, 7, -1], [2, -1, -1], [-1, -1, 5]]))
        reply = jnp.array([20, 10, 11, 10, 30, 31, 20, 30])
        valid = jnp.ones((8,), bool)
        match = self.variant(ss.longest_match)
        np.testing.assert_array_equal(match(reply, valid, patterns), [2, 1, -1, 0, 3, -1, -1, -1])
        # a word with an id past the valid prefix is not said
        np.testing.assert_array_equal(match(reply, valid.at[5].set(False), patterns), [2, 1, -1, 0, -1, -1, -1, -1])
        best = match(reply, valid, patterns)
        first = self.variant(ss.first_label)
        assert [int(first(best, patterns.labels[:, c])) for c in range(3)] == [2, 7, 5]
        assert int(first(jnp.full((8,), -1), patterns.labels[:, 0])) == -1


# -------------------------------------------------------------------- the shop on multi-token tokenizers
def test_world_words_are_id_sequences_that_concatenate(shop):
    env, _ = shop
    tok, fmt = env.tokenizer, env.chat_format
    words = ss.world_words(env.config)
    seqs = {w: ss.word_sequence(tok, fmt, w, opens_message=False) for w in words}
    names = env.catalogue.names
    assert sum(len(seqs[n]) > 1 for n in names) > len(names) // 2, "most product names should be several ids"
    # Qwen's pre-tokenizer never merges across a space before a letter, and splits digits one by one: a text is
    # the concatenation of its words' sequences in any order (the first word without its space).
    for seed in range(3):
        order = random.Random(seed).sample(words, len(words))
        whole = fmt.content_ids(tok, " ".join(order))
        by_words = [*ss.word_sequence(tok, fmt, order[0], opens_message=True), *(t for w in order[1:] for t in seqs[w])]
        assert whole == by_words
    for price in ss.PRICES:
        assert [tok.decode([i]) for i in seqs[price]] == [" ", *price]


def test_contexts_customers_and_replies_are_the_embedded_texts_in_chat_form(shop, embedded):
    env, episodes = shop
    base_env, base_episodes = embedded
    tok, fmt = env.tokenizer, env.chat_format
    for name in POLICIES:
        got, want = episodes[name], base_episodes[name]
        for b in range(len(KEYS)):
            text = _content(base_env, want["context"][b], want["context_valid"][b])
            assert text.startswith("welcome to " + env.catalogue.store + " promo ")
            assert _ids(got["context"][b], got["context_valid"][b]) == fmt.context_ids(tok, text)
            for t in range(env.spec.max_turns):
                customer = _content(base_env, want["customer"][b, t], want["customer_valid"][b, t])
                expected = fmt.customer_ids(tok, customer) if want["customer_valid"][b, t].any() else []
                assert _ids(got["customer"][b, t], got["customer_valid"][b, t]) == expected
                reply = _content(base_env, want["reply"][b, t], want["reply_valid"][b, t])
                assert _ids(got["reply"][b, t], got["reply_valid"][b, t]) == fmt.reply_ids(tok, reply)
        assert (got["customer"][~got["customer_valid"]] == env.pad_id).all()
        assert (got["reply"][~got["reply_valid"]] == env.pad_id).all()


def test_context_and_customer_are_the_chat_template_rendering(shop):
    env, episodes = shop
    tok, fmt, ep = env.tokenizer, env.chat_format, episodes["reference"]
    context = _ids(ep["context"][0], ep["context_valid"][0])
    customer = _ids(ep["customer"][0, 0], ep["customer_valid"][0, 0])
    system = tok.decode(context[len(fmt.system_open):len(context) - len(fmt.system_close)])
    user = tok.decode(customer[len(fmt.user_open):len(customer) - len(fmt.user_close)])
    rendering = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                        tokenize=False, enable_thinking=False)
    # The "\n" after the user's <|im_end|> opens the next message (gopo_jax.models.chat_format).
    assert rendering == tok.decode(context + customer) + "\n"
    newline = tok.encode("\n", add_special_tokens=False)
    assert tok.encode(rendering, add_special_tokens=False) == context + customer + newline


def test_a_system_preamble_opens_the_context(shop, embedded):
    preamble = "You follow the shop's SOP.\n- greet: welcome the customer\n- close: ask for the order"
    for tok in (shop[0].tokenizer, embedded[0].tokenizer):
        env = ss.make_env(FITTED, tokenizer=tok, system_preamble=preamble)
        state, context, valid, _ = env.reset(jax.random.PRNGKey(3))
        text = f"welcome to {env.catalogue.store} promo {ss.PROMO_WORDS[int(state.promo)]}"
        assert _ids(context, valid) == env.chat_format.context_ids(tok, f"{preamble}\n\n{text}")
        assert env.context_len == int(valid.sum())  # -1: sized to hold it


def test_scripted_episodes_realise_their_strategies_and_match_the_embedded_signals(shop, embedded):
    _, episodes = shop
    _, base_episodes = embedded
    live = ~np.concatenate([np.zeros_like(episodes["reference"]["done"][:, :1]),
                            episodes["reference"]["done"][:, :-1]], axis=1)
    assert (episodes["reference"]["aligned"][live] == 1).all() and (episodes["reference"]["rel"][live] == 3).all()
    for name in POLICIES:
        for field in SIGNALS:
            np.testing.assert_array_equal(episodes[name][field], base_episodes[name][field], err_msg=f"{name} {field}")
    assert episodes["reference"]["outcome"].mean() > 0.9


def test_realise_reads_words_as_id_sequences(shop):
    env, _ = shop
    tok, fmt = env.tokenizer, env.chat_format
    k = env.spec.sop.strategy_index
    name, value = env.catalogue.names[5], ss.ATTRIBUTES[0][1][1]

    jitted = jax.jit(env.realise)

    def realise(ids):
        reply = np.full((env.reply_len,), env.pad_id, np.int32)
        reply[:len(ids)] = ids
        return tuple(int(x) for x in jitted(reply, np.arange(env.reply_len) < len(ids)))

    assert realise(fmt.content_ids(tok, f"the {name} in {value} has features")) == (k("explain"), 5, 1)
    assert realise(fmt.content_ids(tok, f"i recommend {name}")) == (k("recommend"), 5, -1)
    assert realise(fmt.content_ids(tok, "hello")) == (k("greet"), -1, -1)  # a cue that opens the reply
    assert realise(fmt.content_ids(tok, "the price is high")) == (UNRECOGNISED, -1, -1)
    product_ids = ss.word_sequence(tok, fmt, name, opens_message=False)
    if len(product_ids) > 1:  # half a product name is no product
        assert realise(fmt.content_ids(tok, "the") + list(product_ids[:-1]))[1] == -1


def test_lengths_too_short_name_the_field_and_the_length_needed(shop):
    env, _ = shop
    with pytest.raises(ValueError, match=rf"customer_len=16 is too short .* set customer_len >= {env.customer_len}"):
        ss.make_env(tokenizer=env.tokenizer)
    for field in ("customer_len", "reply_len", "context_len"):
        needed = getattr(env, field)
        with pytest.raises(ValueError, match=rf"{field}={needed - 1} is too short .* {field} >= {needed},"):
            ss.make_env(dataclasses.replace(FITTED, **{field: needed - 1}), tokenizer=env.tokenizer)


def test_a_tokenizer_that_merges_across_words_is_refused():
    with pytest.raises(ValueError, match="word by word.*cannot run on a tokenizer whose pre-tokenizer merges"):
        ss.make_env(FITTED, tokenizer=chatml_bpe(split_words=False))
