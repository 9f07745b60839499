"""Qwen3 decoder-only language model in Flax NNX, with a fixed-size KV cache.

This is the policy network for both agents (Expert and Customer-Service). It mirrors Hugging Face's
`Qwen3ForCausalLM` numerically (per-head q/k RMSNorm before RoPE, SwiGLU MLP, GQA, tied or untied head) so
checkpoints move both ways through `gopo_jax.models.hf_io`; submodule names follow HF so that mapping is a
regex table.

Forward contract (used by sampling, rollouts and every loss):

    logits, cache = model(tokens[B, L], positions[B, L], token_valid[B, L], cache=None)

* `token_valid=False` marks PAD slots anywhere in the sequence (dialogue buffers have fixed-size slots per
  turn with padding in the middle). A pad is never attended to as a key. Its own output is garbage and must
  be ignored by the caller. Positions come from the caller (normally `cumsum(valid) - 1`) so that pads do not
  shift RoPE positions; a padded sequence therefore gives the same logits at its valid slots as the compacted
  sequence.
* Without a cache the L tokens attend causally (by slot order) to each other.
* With a cache the L new keys/values are written at slots `[index, index + L)` and the queries attend to
  every cache slot `s <= index + i` whose `valid` flag is set. Only the written prefix is read (in blocks of
  `kv_block` slots), so a decode step costs O(index), not O(cache size).

Layers. The `num_layers` decoder layers are ONE `DecoderLayer` module whose parameters carry a leading layer
axis (`stacked_layers`), run by one `lax.scan` (`run_layers`): compile time does not grow with depth
(`scan_unroll` trades it back for speed), `remat` picks a `jax.checkpoint` policy for the scanned body.
Attention kernels (XLA dense mask / cuDNN on packed valid tokens / blocked prefix attention with a cache) live
in `gopo_jax.models.attention`.

Sharding scheme. Every parameter carries an `out_sharding` annotation (nnx's partitioning metadata) with the
logical axis names "fsdp" and "tensor", which are also the mesh axis names used by `gopo_jax.parallel`
(mesh axes "data", "fsdp", "tensor"):

    embed_tokens.embedding  [V, D]         ("tensor", "fsdp")         vocab split by tensor, so the tied
                                                                      head's logits come out vocab-sharded
    q/k/v_proj.kernel       [NL, D, H*hd]  (None, "fsdp", "tensor")   Megatron column split over heads
    o_proj.kernel           [NL, H*hd, D]  (None, "tensor", "fsdp")   Megatron row split
    gate/up_proj.kernel     [NL, D, I]     (None, "fsdp", "tensor")
    down_proj.kernel        [NL, I, D]     (None, "tensor", "fsdp")
    lm_head.kernel          [D, V]         ("fsdp", "tensor")
    layer RMSNorm scales    [NL, D/hd]     (None, None)               replicated
    final norm scale        [D]            (None,)
    *.lora_a (LoRA A)       [NL, in, r]    (None, kernel's in-axis name, None)
    *.lora_b (LoRA B)       [NL, r, out]   (None, None, kernel's out-axis name)
    row_delta, head_row_delta [n, D]       (None, "fsdp")             like the embedding's D axis

(NL = num_layers: the stacked layer axis is never sharded.)

LoRA (`lora_rank > 0`): the projections named in `lora_targets` are `LoRALinear`s, x W + (alpha / r) (x A) B with
A, B `nnx.LoRAParam`s; `gopo_jax.models.lora` has the functions over their parameters (adapters off, merging).
Under LoRA the embedding and the head are frozen, yet the agents' marker tokens start with identical rows (a
checkpoint's new rows all hold the mean row, `gopo_jax.models.markers`): the vocabulary ids in `trainable_rows` get a
`row_delta` [n, D] (and, for an untied head, a `head_row_delta` [n, D]), `nnx.LoRAParam`s starting at zero. The
effective table is the embedding (head) with row trainable_rows[i] replaced by `rows_plus_delta` of it and delta i:
the input lookup and every head (`head_embedding`) use it without building the edited [V, D] table.

The annotations are applied eagerly only when a mesh is active (`with jax.set_mesh(mesh):`) at construction;
outside a mesh the model is built unsharded and the metadata is still there for `nnx.get_partition_spec`.

Dtype policy: parameters are stored in `param_dtype` (master weights, e.g. float32), matmuls run in `dtype`
(compute, e.g. bfloat16), RMSNorm statistics, attention scores/softmax and the returned logits are float32
(the head matmul accumulates in float32), hidden states and the KV cache are in the compute dtype.

Using the model under `jax.jit` / `lax.scan`: split once (`graphdef, state = nnx.split(model)`), pass `state`
through the transformation and `nnx.merge(graphdef, state)` inside; see `gopo_jax.sampling`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopo_jax.models import attention, heads

_DTYPES = ("float32", "bfloat16", "float16")

# config.json keys whose values we do not model; a checkpoint that sets them differently is not a plain Qwen3.
_HF_UNSUPPORTED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "rope_scaling": None,
}


# Qwen3Config.remat -> what `jax.checkpoint` keeps of a layer's forward for the backward pass. "full" keeps
# nothing but the layer's input (least memory, one extra forward); "dots" keeps every matmul output; "dots_no_batch"
# keeps the matmuls without batch dimensions (the projections/MLP, not attention's q·k and p·v).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# The decoder projections a LoRA adapter can sit on (`Qwen3Config.lora_targets`), by short name.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Architecture and dtype policy of a Qwen3 decoder (field names are ours; `to_hf_dict` gives HF's)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Activation rematerialisation of each scanned decoder layer in the backward pass (see `REMAT_POLICIES`).
    remat: str = "none"
    # `unroll=` of the layer scan: 1 keeps compile time flat in depth; num_layers compiles like a Python loop.
    scan_unroll: int = 1
    # "xla" | "cudnn" | "auto" (cuDNN on a GPU with bf16/fp16 compute, else XLA); see `gopo_jax.models.attention`.
    attention: str = "auto"
    # KV-cache slots per block of the decode-time attention over the used prefix.
    kv_block: int = 128
    # Rows of hidden states turned into full-vocabulary logits at a time by the chunked heads
    # (`gopo_jax.models.heads`): bounds the fp32 [rows, V] buffer, never [B, L, V].
    logits_chunk: int = 4096
    # LoRA adapters (`LoRALinear`) on the decoder projections named in `lora_targets` (short names of
    # `LORA_TARGETS`); their output is scaled by lora_alpha / lora_rank. lora_rank = 0: no adapters, the plain model.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    # Storage dtype of the adapters, float32 by default whatever param_dtype is: on a bf16 base, bf16 adapters would
    # round away AdamW's small updates (a step of 1e-5 on an entry of 0.02 is below bf16's resolution).
    lora_param_dtype: str = "float32"
    # Vocabulary ids whose embedding rows (and untied head columns) train with the adapters (lora_rank > 0): the
    # marker tokens. Ignored without adapters, where every row trains anyway.
    trainable_rows: tuple[int, ...] = ()

    def __post_init__(self):
        if isinstance(self.remat, bool):  # the field was a bool before the policies existed
            object.__setattr__(self, "remat", "full" if self.remat else "none")
        # Configs (ml_collections, JSON) hand sequences over as lists; the config must stay hashable (it is static
        # metadata of the model's graphdef).
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "trainable_rows", tuple(self.trainable_rows))
        self._validate_lora()
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Qwen3Config.remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention not in attention.IMPLEMENTATIONS:
            raise ValueError(f"Qwen3Config.attention must be one of {attention.IMPLEMENTATIONS}, "
                             f"got {self.attention!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings", "logits_chunk", "scan_unroll",
                     "kv_block"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Qwen3Config.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"Qwen3Config.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"Qwen3Config.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("dtype", "param_dtype", "lora_param_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"Qwen3Config.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        self._validate_trainable_rows()

    def _validate_lora(self):
        rank, alpha, targets = self.lora_rank, self.lora_alpha, self.lora_targets
        if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank < 0:
            raise ValueError(f"Qwen3Config.lora_rank must be an int >= 0 (0 = no adapters), got {rank!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
                or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"Qwen3Config.lora_alpha must be a finite number > 0 (the adapter scale is "
                             f"lora_alpha / lora_rank), got {alpha!r}")
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if not targets or unknown or len(set(targets)) != len(targets):
            raise ValueError(f"Qwen3Config.lora_targets must be distinct names from {LORA_TARGETS}, at least one; "
                             f"got {targets!r}")

    def _validate_trainable_rows(self):
        rows = self.trainable_rows
        bad = [r for r in rows if not isinstance(r, (int, np.integer)) or isinstance(r, bool)
               or not 0 <= r < self.vocab_size]
        if bad or len(set(rows)) != len(rows):
            raise ValueError(f"Qwen3Config.trainable_rows must be distinct vocabulary ids in [0, {self.vocab_size}); "
                             f"got {rows!r}")
        # Plain ints: the config is compared, hashed and written to JSON.
        object.__setattr__(self, "trainable_rows", tuple(int(r) for r in rows))

    @property
    def has_row_deltas(self) -> bool:
        """Whether the model holds `row_delta` (and `head_row_delta`): adapters and rows to train."""
        return bool(self.lora_rank and self.trainable_rows)

    @property
    def lora_scale(self) -> float:
        """alpha / r: what the adapter's x A B is multiplied by (0.0 without adapters)."""
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def replace(self, **overrides: Any) -> "Qwen3Config":
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown Qwen3Config field(s) {sorted(unknown)}; valid: "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of the equivalent `transformers.Qwen3ForCausalLM`."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": float(self.rope_theta),
            "rms_norm_eps": float(self.rms_norm_eps),
            "tie_word_embeddings": bool(self.tie_word_embeddings),
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": self.param_dtype,
            "attention_dropout": 0.0,
            **_HF_UNSUPPORTED,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **overrides: Any) -> "Qwen3Config":
        """Reads a Qwen3ForCausalLM config.json dict; `overrides` set our own fields (dtype, remat, ...)."""
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"Qwen3 config.json lacks required key(s) {missing}")
        for key, supported in _HF_UNSUPPORTED.items():
            if d.get(key, supported) != supported:
                raise ValueError(f"Qwen3 config.json sets {key}={d[key]!r}; only {supported!r} is supported")
        kwargs = dict(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=int(d["num_attention_heads"]),
            num_kv_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]),
            rope_theta=float(d.get("rope_theta", 1e6)),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            # HF's Qwen3Config defaults tie_word_embeddings to False.
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def _published(hidden, intermediate, layers, heads, tie):
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                       num_heads=heads, num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=tie, max_position_embeddings=40960, param_dtype="bfloat16",
                       dtype="bfloat16")


PRESETS: dict[str, Qwen3Config] = {
    # For unit tests: compiles in seconds on CPU.
    "tiny": Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=2048),
    # ~1.3M parameters: trainable on CPU for the small end-to-end experiments.
    "small": Qwen3Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=32, tie_word_embeddings=True, max_position_embeddings=4096),
    # Published Qwen3 checkpoints (values from their config.json; stored in bf16).
    "qwen3-0.6b": _published(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _published(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _published(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _published(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _published(5120, 17408, 40, 40, tie=False),
}


def get_config(name: str, **overrides: Any) -> Qwen3Config:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen3 preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@flax.struct.dataclass
class KVCache:
    """Fixed-size key/value cache. Slots `[0, index)` are written; `valid` hides pad slots from attention."""

    k: jax.Array  # [num_layers, B, S, num_kv_heads, head_dim], post-RoPE keys
    v: jax.Array  # [num_layers, B, S, num_kv_heads, head_dim]
    valid: jax.Array  # bool[B, S]
    index: jax.Array  # int32 scalar: next slot to write

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: Qwen3Config, batch: int, max_len: int, dtype=None) -> KVCache:
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))


def _partitioned(init, names: tuple[str | None, ...]):
    # Eager sharding needs a mesh in context; without one we keep the annotation only, so the model can be
    # built on a single device and placed later from `nnx.get_partition_spec`.
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.with_partitioning(init, names, eager_sharding=eager)


def lora_a_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """A LoRA down-projection A [..., in, r]: normal with variance 1/in, so x A keeps x's scale whatever the width
    (leading axes, e.g. the stacked layer axis, are batch)."""
    return (jax.random.normal(key, shape, jnp.float32) * shape[-2] ** -0.5).astype(dtype)


class LoRALinear(nnx.Linear):
    """A bias-free `nnx.Linear` plus a low-rank adapter: y = x W + scale · (x A) B, in the compute dtype.

    A [in, r] starts random (drawn from the `lora` stream of `rngs`, so the kernel's draw from `params` is the one a
    plain `nnx.Linear` makes), B [r, out] starts at zero: a fresh adapter leaves the layer's output unchanged. A and B
    are `nnx.LoRAParam`s (an `nnx.Param`) stored in `adapter_dtype`, annotated like the kernel along the axis they
    share with it."""

    def __init__(self, d_in: int, d_out: int, *, rank: int, scale: float, adapter_dtype, names, rngs: nnx.Rngs,
                 **linear_kwargs):
        super().__init__(d_in, d_out, rngs=rngs, **linear_kwargs)
        self.lora_scale = scale
        self.lora_a = nnx.LoRAParam(_partitioned(lora_a_init, (names[0], None))(rngs.lora(), (d_in, rank),
                                                                                 adapter_dtype))
        self.lora_b = nnx.LoRAParam(_partitioned(nnx.initializers.zeros, (None, names[1]))(None, (rank, d_out),
                                                                                           adapter_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        x, a, b = self.promote_dtype((x, self.lora_a[...], self.lora_b[...]), dtype=self.dtype)
        return y + self.lora_scale * ((x @ a) @ b)


def rows_plus_delta(rows: jax.Array, delta: jax.Array) -> jax.Array:
    """rows [n, D] + delta [n, D], added in float32 and stored in rows' dtype: a trained row as the model uses it and
    as merging it writes it into the table (`gopo_jax.models.lora`), the same numbers both ways."""
    return (rows.astype(jnp.float32) + delta.astype(jnp.float32)).astype(rows.dtype)


def _row_delta(cfg: Qwen3Config) -> nnx.LoRAParam:
    """A zero [len(trainable_rows), D] delta of table rows, split along D like the embedding."""
    init = _partitioned(nnx.initializers.zeros, (None, "fsdp"))
    return nnx.LoRAParam(init(None, (len(cfg.trainable_rows), cfg.hidden_size), jnp.dtype(cfg.lora_param_dtype)))


def _linear(cfg: Qwen3Config, d_in: int, d_out: int, names, rngs: nnx.Rngs,
            lora_target: str | None = None) -> nnx.Linear:
    """The projection `lora_target` (a `LORA_TARGETS` name; None for the head): a `LoRALinear` when the config puts an
    adapter on it, else a plain `nnx.Linear`, so lora_rank = 0 builds exactly the model without LoRA."""
    kwargs = {"use_bias": False, "dtype": jnp.dtype(cfg.dtype), "param_dtype": jnp.dtype(cfg.param_dtype),
              "kernel_init": _partitioned(nnx.initializers.normal(0.02), names), "rngs": rngs}
    if cfg.lora_rank and lora_target in cfg.lora_targets:
        return LoRALinear(d_in, d_out, rank=cfg.lora_rank, scale=cfg.lora_scale,
                          adapter_dtype=jnp.dtype(cfg.lora_param_dtype), names=names, **kwargs)
    return nnx.Linear(d_in, d_out, **kwargs)


class RMSNorm(nnx.Module):
    """HF Qwen3RMSNorm: statistics in float32, cast back to the input dtype, then scaled."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(_partitioned(nnx.initializers.ones, (None,))(None, (dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * x32.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in HF's rotate-half layout. x: [B, L, N, hd], positions: int[B, L]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, hd/2]
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None, :]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, ("fsdp", "tensor"), rngs, "q")
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("fsdp", "tensor"), rngs, "k")
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, ("fsdp", "tensor"), rngs, "v")
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, ("tensor", "fsdp"), rngs, "o")
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, pdt)

    def __call__(self, x, positions, attend):
        """x: [B, L, D]; attend(q, k, v) -> [B, L, N, hd] is the kernel (no cache / cached, see `run_layers`).
        Returns (output [B, L, D], this chunk's post-RoPE (k, v) [B, L, K, hd] for the cache)."""
        cfg = self.cfg
        b, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, length, cfg.num_heads, cfg.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, length, cfg.num_kv_heads, cfg.head_dim))
        v = self.v_proj(x).reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, cfg.rope_theta)
        k = apply_rope(k, positions, cfg.rope_theta)
        out = attend(q, k, v)
        return self.o_proj(out.reshape(b, length, cfg.num_heads * cfg.head_dim)), (k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("fsdp", "tensor"), rngs, "gate")
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, ("fsdp", "tensor"), rngs, "up")
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, ("tensor", "fsdp"), rngs, "down")

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One pre-norm block. Built `num_layers` times at once by `stacked_layers` (parameters [num_layers, ...])."""

    def __init__(self, cfg: Qwen3Config, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pdt)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, attend):
        attn, new_kv = self.self_attn(self.input_layernorm(x), positions, attend)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


# Keys a `DecoderLayer` draws from its stream when built: the q, k, v, o, gate, up and down kernels (the norm scales
# start at one and draw none). `stacked_layers` relies on it; tests/test_qwen3.py checks it against a real build.
# A layer's LoRA A matrices draw from their own `lora` stream (at most one per projection, so as many again).
KEY_DRAWS_PER_LAYER = 7
# The adapters' stream key is the parameter stream's key folded with this (far beyond the counts a model's parameter
# stream reaches), so adding adapters leaves every base weight's key where it was.
_LORA_STREAM_TAG = 0x4C6F5241


def stacked_layers(cfg: Qwen3Config, rngs: nnx.Rngs) -> DecoderLayer:
    """`cfg.num_layers` decoder layers as ONE `DecoderLayer` whose parameters have a leading layer axis. Partition
    annotations gain a leading None: layers are not sharded, their weights are. Run them with `run_layers`.

    Layer i draws its keys where building the layers one after another from `rngs` would (the stream's key folded
    with counts start + i * KEY_DRAWS_PER_LAYER, ...), and `rngs` advances past them: a seed gives the same initial
    weights as a Python list of layers, so runs from before the layers were stacked stay comparable. LoRA A matrices
    (lora_rank > 0) draw from a separate stream (`_LORA_STREAM_TAG`): the base weights are the same with or without
    adapters."""
    stream = rngs.params
    base_key, start = stream.key[...], stream.count[...]
    layer_index = jnp.arange(cfg.num_layers, dtype=start.dtype)
    counts = start + KEY_DRAWS_PER_LAYER * layer_index
    lora_key = jax.random.fold_in(base_key, _LORA_STREAM_TAG)

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
    def build(count, lora_count):
        if cfg.lora_rank:
            layer_rngs = nnx.Rngs(params=base_key, lora=lora_key)
            layer_rngs.lora.count[...] = lora_count
        else:
            layer_rngs = nnx.Rngs(params=base_key)
        layer_rngs.params.count[...] = count
        return DecoderLayer(cfg, layer_rngs)

    layers = build(counts, KEY_DRAWS_PER_LAYER * layer_index)
    stream.count[...] = start + KEY_DRAWS_PER_LAYER * cfg.num_layers
    return layers


# The mesh axes a batch is split over (`gopo_jax.parallel.BATCH_AXES`; the model names mesh axes directly, as its
# parameter annotations do).
_BATCH_AXES = ("data", "fsdp")


def _batch_split(x: jax.Array) -> jax.Array:
    """x [B, ...] kept split over the batch axes of the active mesh (`with jax.set_mesh(mesh)`). Without it, under
    fsdp GSPMD follows the all-gathered weights and may replicate the layer scan's activations and its saved
    residuals on every device; outside a mesh, or when B does not divide, x is left to propagation."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in _BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def run_layers(cfg: Qwen3Config, layers: DecoderLayer, x: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """(x after every layer [B, L, D], updated cache): one `lax.scan` over the stacked layers (compile time does not
    grow with depth), each step rematerialised by `cfg.remat`, unrolled `cfg.scan_unroll` layers at a time.

    Without a cache the L tokens attend causally to the valid ones among them (`attention.self_attention`). With
    one, queries at slots `[index, index + L)` attend to the valid written prefix and to each other
    (`attention.cached_attention`, cost O(index)); the scan collects each layer's new keys/values (its ys) and
    they are written into the cache once, after the scan, at `[index, index + L)`.
    """
    chex.assert_rank(x, 3)
    chex.assert_shape([positions, token_valid], x.shape[:2])
    graphdef, state = nnx.split(layers)
    scale = cfg.head_dim ** -0.5
    if cache is None:
        implementation = attention.resolve_implementation(cfg.attention, cfg.dtype)

        def attend(q, k, v, layer):
            del layer
            return attention.self_attention(q, k, v, token_valid, scale=scale, implementation=implementation)
    else:
        chex.assert_shape(cache.k, (cfg.num_layers, x.shape[0], None, cfg.num_kv_heads, cfg.head_dim))
        index = jnp.asarray(cache.index, jnp.int32)

        def attend(q, k, v, layer):
            # Round-trip through the cache dtype so the chunk's own keys are what later steps read back.
            return attention.cached_attention(
                q, k.astype(cache.k.dtype), v.astype(cache.v.dtype), token_valid, cache.k, cache.v, cache.valid,
                index, layer, scale=scale, block=cfg.kv_block)

    def body(x, per_layer):
        layer_state, layer_index = per_layer
        layer = nnx.merge(graphdef, layer_state)
        x, (k, v) = layer(_batch_split(x), positions, lambda q, k, v: attend(q, k, v, layer_index))
        x = _batch_split(x)
        new_kv = None if cache is None else (k.astype(cache.k.dtype), v.astype(cache.v.dtype))
        return x, new_kv

    policy = REMAT_POLICIES[cfg.remat]
    if cfg.remat != "none":
        # Under scan XLA cannot CSE the recomputation away anyway, so the optimisation barriers prevent_cse adds
        # would only cost fusion (jax.checkpoint's documentation).
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, new_kv = jax.lax.scan(body, x, (state, jnp.arange(cfg.num_layers, dtype=jnp.int32)),
                             unroll=cfg.scan_unroll)
    if cache is None:
        return x, None
    zero = jnp.zeros((), jnp.int32)
    at = (zero, zero, index, zero, zero)
    return x, KVCache(k=jax.lax.dynamic_update_slice(cache.k, new_kv[0], at),
                      v=jax.lax.dynamic_update_slice(cache.v, new_kv[1], at),
                      valid=jax.lax.dynamic_update_slice(cache.valid, token_valid, (zero, index)),
                      index=index + x.shape[1])


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM. Attribute names mirror HF (`model.` prefix dropped) for the hf_io key table; `layers` is
    the stacked `DecoderLayer` (HF's `model.layers.{i}` is slice i of its parameters)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs):
        self.config = config
        cfg = config
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=_partitioned(nnx.initializers.normal(0.02), ("tensor", "fsdp")), rngs=rngs)
        self.layers = stacked_layers(cfg, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, jnp.dtype(cfg.param_dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, ("fsdp", "tensor"), rngs)
        if cfg.has_row_deltas:
            # Zeros draw no key: every other parameter is what it is without them.
            self.row_delta = _row_delta(cfg)
            if not cfg.tie_word_embeddings:
                self.head_row_delta = _row_delta(cfg)

    def __call__(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
                 cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """(float32 logits [B, L, V], cache): `logits(hidden(...))`. Only for callers that need every vocabulary
        column at every slot (tests, HF parity); the hot paths take `hidden` and the rows they use."""
        h, cache = self.hidden(tokens, positions, token_valid, cache)
        return self.logits(h), cache

    def hidden(self, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
        """(final-norm hidden states [B, L, D] in the compute dtype, cache). Token i's logits are
        `h[..., i, :] @ output_embedding().T`; see `gopo_jax.models.heads` for the used-rows-only heads."""
        chex.assert_rank([tokens, positions, token_valid], 2)
        chex.assert_equal_shape([tokens, positions, token_valid])
        chex.assert_type([tokens, positions], int)
        chex.assert_type(token_valid, bool)
        if cache is not None:
            chex.assert_shape(cache.valid, (tokens.shape[0], None))
        x, cache = run_layers(self.config, self.layers, self.input_embeddings(tokens), positions, token_valid, cache)
        return self.norm(x), cache

    def input_embeddings(self, tokens: jax.Array) -> jax.Array:
        """[..., D] in the compute dtype: the embedding rows of `tokens`, trained rows included."""
        x = self.embed_tokens(tokens)
        if not self.config.has_row_deltas:
            return x
        return heads.replace_rows(x, tokens, self.config.trainable_rows, self._trained_rows(
            self.embed_tokens.embedding[...], self.row_delta))

    def head_embedding(self) -> heads.EditedEmbedding:
        """The output embedding as `gopo_jax.models.heads` takes it: the table (the tied input embedding, or the
        untied head's kernel transposed) and the trained rows that replace some of its rows, so no edited [V, D]
        copy is built."""
        cfg = self.config
        tied = cfg.tie_word_embeddings
        table = self.embed_tokens.embedding[...] if tied else self.lm_head.kernel[...].T
        if not cfg.has_row_deltas:
            return heads.EditedEmbedding.unedited(table)
        delta = self.row_delta if tied else self.head_row_delta
        return heads.EditedEmbedding(table=table, rows=self._trained_rows(table, delta), row_ids=cfg.trainable_rows)

    def _trained_rows(self, table: jax.Array, delta: nnx.LoRAParam) -> jax.Array:
        """[n, D] in the table's dtype: rows trainable_rows of `table` [V, D] with the delta added."""
        return rows_plus_delta(table[np.asarray(self.config.trainable_rows, np.int32)], delta[...])

    def output_embedding(self) -> jax.Array:
        """[V, D]: row v is token v's output embedding, trained rows included. With trained rows this builds the
        edited table (a [V, D] copy per call): heads take `head_embedding()` instead."""
        return self.head_embedding().dense()

    def logits(self, h: jax.Array) -> jax.Array:
        """float32 [..., V] from hidden states: every vocabulary column (what sampling a token needs). The matmul
        runs in the compute dtype and accumulates into float32 (no bf16 rounding of the logits)."""
        return heads.all_logits(h.astype(jnp.dtype(self.config.dtype)), self.head_embedding())


def positions_from_valid(valid: jax.Array) -> jax.Array:
    """RoPE positions that skip pads: the i-th valid slot of a row gets position i (pads repeat the previous one)."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def previous_valid_slot(valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(prev int32[B, L], has_prev bool[B, L]): the slot whose output predicts slot i — the closest valid slot
    before it (not i - 1, which may be a pad). `has_prev` is False for pads and for a row's first valid slot."""
    b, length = valid.shape
    slot = jnp.arange(length)
    last_valid_upto = jax.lax.cummax(jnp.where(valid, slot[None, :], -1), axis=1)
    prev = jnp.concatenate([jnp.full((b, 1), -1, last_valid_upto.dtype), last_valid_upto[:, :-1]], axis=1)
    return jnp.maximum(prev, 0), (prev >= 0) & valid


def forward_logprobs(model: Qwen3, tokens: jax.Array, positions: jax.Array, token_valid: jax.Array) -> jax.Array:
    """float32[B, L]: log p(tokens[:, i] | valid tokens before slot i), 0.0 where undefined.

    With pads inside the sequence, token i is predicted by the logits of the closest *valid* slot before it
    (not slot i - 1, which may be a pad). Slots that are pads themselves, or have no valid slot before them
    (slot 0, leading pads, the first valid token), get 0.0.
    """
    logits, _ = model(tokens, positions, token_valid)
    prev, has_prev = previous_valid_slot(token_valid)
    rows = jnp.arange(tokens.shape[0])[:, None]
    # Gather target logits rather than a full [B, L, V] log-softmax copy.
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, L]
    target = logits[rows, prev, tokens]
    return jnp.where(has_prev, target - lse[rows, prev], 0.0)


def count_params(model: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
