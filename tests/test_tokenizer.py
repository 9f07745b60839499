"""Tests for gopo_jax/models/tokenizer.py: the embedded byte-level BPE and its checkpoint-style save/load."""
import pytest
import transformers

from gopo_jax.models import tokenizer as tl

CORPUS = ["hello and welcome how can i help you today", "i recommend the velora in red for 149",
          "i am looking for a laptop", "redder apples are nice", "ünïcödé and emoji 🙂 work too"] * 20
SPECIALS = [tl.strategy_token("greet"), tl.strategy_token("recommend"), tl.stage_token("opening")]
WORDS = ["recommend", "velora", "red", "laptop", "a", "am", "149"]


@pytest.fixture(scope="module")
def tok():
    return tl.train_tokenizer(CORPUS, vocab_size=300, special_tokens=SPECIALS, added_words=WORDS)


def test_round_trip(tok):
    for text in [*CORPUS[:5], "<|customer|> i am a red laptop<|eot|>", "<s:greet> unseen wörds xyz<|eot|><|pad|>",
                 " leading and trailing spaces  "]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_tokens_are_single_ids(tok):
    ids = tl.special_ids(tok)
    for t in [*tl.ROLE_TOKENS, *SPECIALS]:
        assert tok.encode(t, add_special_tokens=False) == [ids[t]]
    # Role tokens come first, in a fixed order.
    assert [ids[t] for t in tl.ROLE_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.pad_token_id == ids[tl.PAD] and tok.eos_token_id == ids[tl.EOT]
    # A special token glued to text still splits out.
    assert tok.encode("x<s:greet>y", add_special_tokens=False)[1] == ids["<s:greet>"]


def test_added_words_are_single_ids_and_compose(tok):
    ids = [tl.word_id(tok, w) for w in WORDS]
    assert len(set(ids)) == len(WORDS)
    # " a" and " am" are both entries: the longest match wins, and a sentence is the concatenation of its words.
    sentence = " ".join(WORDS)
    assert tok.encode(" " + sentence, add_special_tokens=False) == ids
    with pytest.raises(ValueError, match="not one"):
        tl.word_id(tok, "unseenword")


def test_bad_added_word_is_a_clear_error():
    with pytest.raises(ValueError, match="single non-empty words"):
        tl.train_tokenizer(CORPUS, vocab_size=300, special_tokens=[], added_words=["two words"])


def test_save_load_equality(tok, tmp_path):
    tl.save_tokenizer(tok, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    assert "chat_template" in (tmp_path / "tok" / "tokenizer_config.json").read_text()
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "tok"))
    assert loaded.get_vocab() == tok.get_vocab()
    assert tl.special_ids(loaded) == tl.special_ids(tok)
    for text in ["<|context|> store<|customer|> i am a red laptop<|eot|>", "<s:recommend> velora 149<|eot|>"]:
        assert loaded.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert tl.load_tokenizer(tmp_path / "tok").get_vocab() == tok.get_vocab()


def test_chat_template(tok):
    text = tok.apply_chat_template([{"role": "system", "content": " shop"}, {"role": "user", "content": " hi"},
                                    {"role": "assistant", "content": " hello"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|context|> shop<|customer|> hi<|eot|><|agent|> hello<|eot|><|agent|>"


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_tokenizer"):
        tl.load_tokenizer(tmp_path / "nothing")
