"""A tokenizer's chat template as the id pieces the fixed-slot dialogue buffer is assembled from.

A dialogue is rendered as chat messages: one system message (the SOP and the business context), the customer's
turns as user messages and the agent's as assistant messages whose content is `<stage:σ><s:k>reply`. The buffer
assembles that rendering turn by turn, by appending ids (token-in-token-out), so the template is cut once into
pieces that are the same for every turn:

    context  = system_open + content + system_close
    customer = user_open + content + user_close
    header   = assistant_open + <stage:σ>        (then the Expert's <s:k> and the CS reply)
    reply    = content + eot

A message's close ends at its first special token; whatever a template writes after it (Qwen's "\\n" after
<|im_end|>) opens the next message instead, so every piece is the same on every turn. `assistant_open` is the
template's generation prompt: for Qwen3 with `enable_thinking=False` it holds an empty think block
(`<think>\\n\\n</think>\\n\\n`), which is what the model sees when it writes each reply. That is the one place where
the record is not the template applied to the whole conversation: Qwen3's template drops the think blocks of
assistant turns before the last user message when it re-renders a history, so a re-rendered prompt would not be a
prefix of the next turn's. The record keeps what each reply was generated after (tests/test_chat_format.py checks
both: equality with the whole-conversation template where the template is append-only, and equality up to those
dropped think blocks for Qwen3's).

The embedded tokenizer (`gopo_jax.models.tokenizer`) encodes contents with a leading space (" red" is one id in
running text); a checkpoint's contents are encoded as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from gopo_jax.models import tokenizer as tokenizer_lib

_SENTINELS = ("\x00SYS\x00", "\x00USR\x00", "\x00AST\x00", "\x00USR2\x00")


class ChatFormatError(ValueError):
    """A tokenizer whose chat template cannot be cut into per-turn pieces; the message says why."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Id pieces of one tokenizer's chat template (see the module docstring). Hashable: static under jit."""

    system_open: tuple[int, ...]
    system_close: tuple[int, ...]
    user_open: tuple[int, ...]
    user_close: tuple[int, ...]
    assistant_open: tuple[int, ...]  # the generation prompt, before the stage marker
    eot: int  # closes an assistant message: the CS stops on it
    pad: int  # fills unused slots (never seen by the model: pads are masked)
    content_space: bool  # content is encoded with a leading space (the template's piece ended in one)

    @property
    def header_len(self) -> int:
        """Slots of the agent header: the generation prompt and the stage marker."""
        return len(self.assistant_open) + 1

    def content_ids(self, tokenizer, text: str) -> list[int]:
        text = " " + text if self.content_space else text
        return list(tokenizer.encode(text, add_special_tokens=False))

    def context_ids(self, tokenizer, text: str) -> list[int]:
        return [*self.system_open, *self.content_ids(tokenizer, text), *self.system_close]

    def customer_ids(self, tokenizer, text: str) -> list[int]:
        return [*self.user_open, *self.content_ids(tokenizer, text), *self.user_close]

    def reply_ids(self, tokenizer, text: str) -> list[int]:
        return [*self.content_ids(tokenizer, text), self.eot]

    def content_text(self, tokenizer, ids, role: str) -> str:
        """The text of one message's content from its slot's valid ids ("system" | "user" | "assistant"): the
        template's opening and closing pieces cut, special tokens (markers) dropped."""
        opening, closing = {"system": (self.system_open, self.system_close), "user": (self.user_open, self.user_close),
                            "assistant": ((), (self.eot,))}[role]
        ids = [int(i) for i in ids]
        if opening and ids[:len(opening)] == list(opening):
            ids = ids[len(opening):]
        if closing and ids[len(ids) - len(closing):] == list(closing):
            ids = ids[:len(ids) - len(closing)]
        return tokenizer.decode(ids, skip_special_tokens=True).strip()

    @classmethod
    def from_tokenizer(cls, tokenizer, *, template_kwargs: dict[str, Any] | None = None) -> "ChatFormat":
        """Cuts `tokenizer.chat_template` into pieces by rendering a probe conversation with sentinel contents.

        `template_kwargs` go to `apply_chat_template` (default `enable_thinking=False`: Qwen3's non-thinking mode)."""
        if not getattr(tokenizer, "chat_template", None):
            raise ChatFormatError("the tokenizer has no chat_template; use a checkpoint folder whose "
                                  "tokenizer_config.json (or chat_template.jinja) holds one")
        kwargs = {"enable_thinking": False, **(template_kwargs or {})}
        sys_s, usr_s, ast_s, usr2_s = _SENTINELS

        def render(messages, generation_prompt=False) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 **kwargs)

        convo = [{"role": "system", "content": sys_s}, {"role": "user", "content": usr_s},
                 {"role": "assistant", "content": ast_s}, {"role": "user", "content": usr2_s}]
        whole = render(convo, generation_prompt=True)
        if any(whole.count(s) != 1 for s in _SENTINELS):
            raise ChatFormatError("the chat template does not render each message's content exactly once; it "
                                  "cannot be assembled turn by turn")
        specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)

        def close_of(messages) -> str:
            """The close of the last message: what follows its content, up to and including the first special
            token (the rest, like Qwen's "\n", opens the next message)."""
            after = render(messages).split(messages[-1]["content"])[1]
            hits = [(after.find(s), s) for s in specials if after.find(s) >= 0]
            if not hits:
                return ""
            pos, tok = min(hits, key=lambda h: (h[0], -len(h[1])))
            return after[:pos + len(tok)]

        def opening(between: str, close: str, what: str) -> str:
            if not between.startswith(close):
                raise ChatFormatError(f"the chat template closes a {what} message with {close!r} at the end of a "
                                      f"conversation but not inside one ({between!r})")
            return between[len(close):]

        sys_open, rest = whole.split(sys_s)
        after_sys, rest = rest.split(usr_s)
        after_usr, rest = rest.split(ast_s)
        after_ast, after_usr2 = rest.split(usr2_s)
        sys_close, user_close = close_of(convo[:1]), close_of(convo[:2])
        ast_close = close_of(convo[:3])
        user_open = opening(after_sys, sys_close, "system")
        history_ast_open = opening(after_usr, user_close, "user")
        user_open2 = opening(after_ast, ast_close, "assistant")
        gen_prompt = opening(after_usr2, user_close, "user")
        if user_open2 != user_open:
            raise ChatFormatError(f"the chat template opens a user message differently after a system message "
                                  f"({user_open!r}) and after an assistant message ({user_open2!r})")
        # The generation prompt opens every assistant turn of the record. A template may render assistant turns of
        # the history with less (Qwen3 drops their empty think blocks): the module docstring's one exception.
        if not gen_prompt.startswith(history_ast_open):
            raise ChatFormatError(f"the generation prompt {gen_prompt!r} does not start like the assistant "
                                  f"messages of the history ({history_ast_open!r})")
        eot_ids = _ids(tokenizer, ast_close)
        if len(eot_ids) != 1:
            raise ChatFormatError(f"an assistant message must end with exactly one special token the CS can stop "
                                  f"on; this template ends it with {ast_close!r} ({eot_ids})")
        # The embedded tokenizer writes every word of running text with its leading space (" red" is one id, which
        # the pure-JAX shop relies on); a checkpoint's template puts contents right after its opening.
        content_space = tokenizer_lib.is_embedded(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_ids[0]
        return cls(system_open=tuple(_ids(tokenizer, sys_open)),
                   system_close=tuple(_ids(tokenizer, sys_close)),
                   user_open=tuple(_ids(tokenizer, user_open)), user_close=tuple(_ids(tokenizer, user_close)),
                   assistant_open=tuple(_ids(tokenizer, gen_prompt)), eot=eot_ids[0], pad=int(pad),
                   content_space=content_space)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []
