"""Strategy and stage markers as tokens of a pretrained checkpoint's vocabulary.

The Expert picks strategy k by the logit of its marker token `<s:k>`, and every agent header ends with the stage
marker `<stage:σ>` (`gopo_jax.models.tokenizer.strategy_token/stage_token`). A pretrained tokenizer has neither, so
`add_markers` registers them as special tokens (never split), taking ids from, in order:

  (a) the tokenizer itself: markers it already has keep their ids (the embedded tokenizer; a run's saved tokenizer
      on resume);
  (b) its unused reserved special tokens (Llama-3's `<|reserved_special_token_N|>`, Gemma's `<unusedN>`), renamed
      to the markers, which keeps their ids and rows;
  (c) embedding rows past the tokenizer: a checkpoint pads its embedding (Qwen3: 151,936 rows for 151,669 tokens),
      and a newly added token gets the next id, len(tokenizer), which is such a row;
  (d) new rows: the vocabulary grows (to a multiple of 64) when the config allows it.

Rows of (b)-(d) were never trained; `grow_embeddings` sets them to the mean of the trained rows, so a marker starts
as an average token: existing tokens' logits are unchanged and the new ones start at no particular preference.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
import transformers
from flax import nnx

from gopo_jax.models.qwen3 import Qwen3

# Reserved special tokens a checkpoint ships unused: Llama-3's and Gemma's.
RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>|<unused\d+>")
# A grown vocabulary is rounded up to this many rows (what checkpoints pad to; it keeps tensor-parallel splits even).
ROW_MULTIPLE = 64
RESIZE_KEY = "model.resize_embeddings"


class MarkerError(ValueError):
    """The markers do not fit the checkpoint as configured; the message says how many ids are needed and the fix."""


@dataclasses.dataclass(frozen=True)
class MarkerPlan:
    """What `add_markers` decided: the tokenizer to use from now on and the embedding the model needs."""

    tokenizer: transformers.PreTrainedTokenizerFast  # a new tokenizer with every marker a special token
    ids: dict[str, int]  # marker -> id
    vocab_size: int  # embedding rows the model needs (>= the checkpoint's)
    new_rows: tuple[int, ...]  # marker ids the checkpoint has no trained row for: `grow_embeddings` sets them


def add_markers(tokenizer, tokens: Sequence[str], model_vocab_size: int, *, allow_resize: bool) -> MarkerPlan:
    """Registers `tokens` (the markers) in a copy of `tokenizer` for a model with `model_vocab_size` embedding rows,
    taking ids from the sources (a)-(d) of the module docstring. The input tokenizer is not modified.

    Raises MarkerError when the tokenizer has ids the model has no row for, or when the markers need more ids than
    the checkpoint has free and `allow_resize` is False."""
    tokens = list(dict.fromkeys(tokens))
    marker_set = set(tokens)
    vocab = tokenizer.get_vocab()
    last_other = max((i for t, i in vocab.items() if t not in marker_set), default=-1)
    if last_other >= model_vocab_size:
        raise MarkerError(f"the tokenizer has ids up to {last_other} but the checkpoint's embedding has "
                          f"{model_vocab_size} rows; use the tokenizer saved with this checkpoint")
    kept = {t: vocab[t] for t in tokens if t in vocab}  # (a)
    # A run's saved tokenizer after a resize holds markers past the base checkpoint's rows: they need rows again.
    kept_past_rows = [t for t, i in kept.items() if i >= model_vocab_size]
    missing = [t for t in tokens if t not in vocab]
    reserved = sorted((i, t) for t, i in vocab.items()
                      if RESERVED_TOKEN.fullmatch(t) and i < model_vocab_size and t not in marker_set)
    renames = {old: new for (_, old), new in zip(reserved, missing)}  # (b)
    appended = missing[len(renames):]  # (c), then (d)
    next_id = max(vocab.values()) + 1
    if next_id + len(appended) > model_vocab_size and not allow_resize:
        free_rows = max(model_vocab_size - next_id, 0)
        raise MarkerError(
            f"{len(missing) + len(kept_past_rows)} marker token(s) need embedding rows but the checkpoint has only "
            f"{len(reserved) + free_rows} free ({len(reserved)} unused reserved token(s), {free_rows} row(s) past "
            f"the tokenizer's {next_id} ids); set {RESIZE_KEY}=True to grow the embedding to "
            f"{_round_up(next_id + len(appended), ROW_MULTIPLE)} rows")

    # The JSON round trip of a renaming costs seconds on a 150k vocabulary: a plain copy does when nothing is renamed.
    marked = _renamed(tokenizer, renames) if renames else copy.deepcopy(tokenizer)
    marked.add_special_tokens({"additional_special_tokens": tokens}, replace_additional_special_tokens=False)
    ids = {t: marked.convert_tokens_to_ids(t) for t in tokens}
    expected = {**kept, **{new: vocab[old] for old, new in renames.items()},
                **{t: next_id + n for n, t in enumerate(appended)}}
    if ids != expected:  # the tokenizers library assigns added ids itself; new_rows and vocab_size rely on these
        raise RuntimeError(f"add_markers: the tokenizer gave the markers ids {ids}, not the planned {expected}")
    needed = max(ids.values(), default=-1) + 1
    vocab_size = model_vocab_size if needed <= model_vocab_size else _round_up(needed, ROW_MULTIPLE)
    new_rows = tuple(sorted(ids[t] for t in [*missing, *kept_past_rows]))
    return MarkerPlan(tokenizer=marked, ids=ids, vocab_size=vocab_size, new_rows=new_rows)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _renamed(tokenizer, renames: dict[str, str]) -> transformers.PreTrainedTokenizerFast:
    """A new tokenizer in which each added token `old` of `renames` is called `renames[old]`, with the same id.

    The backend's JSON is edited (its added tokens, and the model's own vocabulary where it lists them too, as BPE
    and WordLevel vocabularies may) and re-wrapped with the same special tokens and chat template."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for entry in data["added_tokens"]:
        if entry["content"] in renames:
            entry.update(content=renames[entry["content"]], special=True, normalized=False)
    model_vocab = data["model"].get("vocab")
    if isinstance(model_vocab, dict):
        for old, new in renames.items():
            if old in model_vocab:
                model_vocab[new] = model_vocab.pop(old)
    special = {k: renames.get(v, v) for k, v in tokenizer.special_tokens_map.items()
               if k != "additional_special_tokens"}
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(data)),
        additional_special_tokens=[renames.get(t, t) for t in tokenizer.additional_special_tokens],
        clean_up_tokenization_spaces=tokenizer.clean_up_tokenization_spaces,
        model_max_length=tokenizer.model_max_length, padding_side=tokenizer.padding_side,
        truncation_side=tokenizer.truncation_side, **special)
    wrapped.chat_template = tokenizer.chat_template
    return wrapped


def grow_embeddings(model: Qwen3, vocab_size: int, new_rows: Sequence[int]) -> Qwen3:
    """`model` with `vocab_size` embedding rows (and head columns when untied): rows past the old size and the
    listed `new_rows` (free rows that were never trained) hold the mean of the other rows; every other parameter is
    the same array. Each grown table keeps its sharding; only the grown array itself is new."""
    old_size = model.config.vocab_size
    rows = np.asarray(sorted(set(new_rows)), np.int32)
    if vocab_size < old_size or (rows.size and (rows[0] < 0 or rows[-1] >= vocab_size)):
        raise MarkerError(f"grow_embeddings: vocab_size {vocab_size} must be >= the model's {old_size} and new rows "
                          f"{rows.tolist()} must lie in [0, {vocab_size})")
    if vocab_size == old_size and not rows.size:
        return model
    config = model.config.replace(vocab_size=vocab_size)
    table = model.embed_tokens.embedding[...]
    mesh = getattr(table.sharding, "mesh", None)
    # Built under the model's mesh, the abstract parameters carry the same sharding metadata as the model's.
    with jax.set_mesh(mesh) if isinstance(mesh, jax.sharding.Mesh) else contextlib.nullcontext():
        abstract = nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    current = {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
    row_axis = {"embed_tokens.embedding": 0, "lm_head.kernel": 1}  # the vocabulary axis of each table
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        value = current[_dotted(path)]
        if _dotted(path) in row_axis:
            value = _grown(value, rows, vocab_size=vocab_size, axis=row_axis[_dotted(path)])
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _grown(table: jax.Array, rows: np.ndarray, *, vocab_size: int, axis: int) -> jax.Array:
    """`table` grown to `vocab_size` along `axis`, on the sharding it had."""
    grow = functools.partial(_grow_table, vocab_size=vocab_size, axis=axis)
    return jax.jit(grow, out_shardings=table.sharding)(table, jnp.asarray(rows))


def _grow_table(table: jax.Array, rows: jax.Array, *, vocab_size: int, axis: int) -> jax.Array:
    """`table` grown to `vocab_size` along `axis`; the new entries and `rows` hold the mean of the other entries."""
    old_size = table.shape[axis]
    trained = jnp.ones(old_size, table.dtype).at[rows].set(0, mode="drop")  # rows past old_size are dropped
    # A masked sum as a matmul accumulating in float32 (no [V, D] temporary), then the mean in the table's dtype.
    total = jnp.tensordot(trained, table, axes=([0], [axis]), preferred_element_type=jnp.float32)
    mean = jnp.expand_dims((total / jnp.sum(trained, dtype=jnp.float32)).astype(table.dtype), axis)
    extra = list(table.shape)
    extra[axis] = vocab_size - old_size
    grown = jnp.concatenate([table, jnp.broadcast_to(mean, extra)], axis=axis)
    return grown.at[(slice(None),) * axis + (rows,)].set(mean)
