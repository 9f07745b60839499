"""The embedded default's tokenizer: a small byte-level BPE trained in seconds on an environment's corpus.

It is returned as a `transformers.PreTrainedTokenizerFast`, saved like a checkpoint's tokenizer (tokenizer.json +
tokenizer_config.json with a simple chat template) and loaded back with
`PreTrainedTokenizerFast.from_pretrained(path)`, so the embedded world and a Hugging Face checkpoint go through the
same code.

Two kinds of guaranteed single tokens:
* special tokens (roles, `<s:NAME>` strategy tokens, `<stage:NAME>` stage tokens, ...): never split, never merged;
* `added_words`: plain words that must each be ONE id when they appear as a word in running text, i.e. preceded by
  a space (" red"). A pure-JAX realisation check reads strategy cues and product names by id, and a pure-JAX
  customer fills its utterance templates from id tables; both rely on it. They are added-vocabulary entries whose
  content carries the leading space, so `encode(" a b")` is the concatenation of `encode(" a")` and `encode(" b")`
  — which is what makes appending ids per turn equal to encoding the whole dialogue at once.
"""
from __future__ import annotations

import pathlib
from typing import Iterable, Sequence

import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

CONTEXT, CUSTOMER, AGENT, EOT, PAD = "<|context|>", "<|customer|>", "<|agent|>", "<|eot|>", "<|pad|>"
ROLE_TOKENS = (CONTEXT, CUSTOMER, AGENT, EOT, PAD)

# Renders a list of {"role", "content"} messages the way the dialogue buffers lay them out; the agent's reply
# ends with <|eot|> like every other turn, so a generation prompt is just the role token.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}" + CONTEXT + "{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + CUSTOMER + "{{ m['content'] }}" + EOT +
    "{% else %}" + AGENT + "{{ m['content'] }}" + EOT + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + AGENT + "{% endif %}"
)


def strategy_token(name: str) -> str:
    return f"<s:{name}>"


def stage_token(name: str) -> str:
    return f"<stage:{name}>"


def train_tokenizer(corpus: Iterable[str], *, vocab_size: int, special_tokens: Sequence[str],
                    added_words: Sequence[str] = ()) -> transformers.PreTrainedTokenizerFast:
    """Trains a byte-level BPE on `corpus` and wraps it for `transformers`.

    Args:
      corpus: training texts.
      vocab_size: size of the BPE vocabulary (special tokens included, added words on top).
      special_tokens: extra special tokens; the role tokens (`ROLE_TOKENS`) always come first, with ids 0..4.
      added_words: words (letters/digits, no spaces) that get one id each when preceded by a space.
    """
    bad = [w for w in added_words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"train_tokenizer: added_words must be single non-empty words without spaces, got {bad}")
    specials = list(dict.fromkeys([*ROLE_TOKENS, *special_tokens]))
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer=trainer)
    # normalized=False: match the raw text, so the leading space is part of the added entry, not a separate token.
    tok.add_tokens([tokenizers.AddedToken(" " + w, normalized=False) for w in dict.fromkeys(added_words)])
    return _wrap(tok, specials)


def _wrap(tok: tokenizers.Tokenizer, specials: Sequence[str]) -> transformers.PreTrainedTokenizerFast:
    extra = [s for s in specials if s not in (EOT, PAD)]
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOT, pad_token=PAD, additional_special_tokens=extra,
        clean_up_tokenization_spaces=False, model_max_length=1 << 20)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok: transformers.PreTrainedTokenizerFast, path: str | pathlib.Path) -> None:
    """Writes tokenizer.json + tokenizer_config.json (with the chat template) like a checkpoint folder."""
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    # The chat template inside tokenizer_config.json (older, widely read layout) rather than a separate .jinja file.
    tok.save_pretrained(str(path), save_jinja_files=False)


def load_tokenizer(path: str | pathlib.Path) -> transformers.PreTrainedTokenizerFast:
    path = pathlib.Path(path)
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {path}: save one with save_tokenizer(tok, {str(path)!r}) or "
                                "point at a checkpoint folder that has one")
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


def special_ids(tok: transformers.PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of every special token (roles, strategy/stage tokens, ...), by token string."""
    return {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}


def word_id(tok: transformers.PreTrainedTokenizerFast, word: str) -> int:
    """The single id of `word` in running text (" word"); raises if it is not one token."""
    ids = tok.encode(" " + word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"word {word!r} is {len(ids)} tokens {ids}, not one; pass it in added_words when training")
    return ids[0]


def is_embedded(tok) -> bool:
    """Whether `tok` is this module's BPE (its role tokens), whose running-text words carry a leading space."""
    return CUSTOMER in tok.get_vocab()
