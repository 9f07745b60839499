"""Hugging Face checkpoints <-> our NNX Qwen3, both ways, plus the tokenizer that goes with them.

`from_pretrained` reads a local `Qwen3ForCausalLM` folder (config.json + model.safetensors, or shards listed in
model.safetensors.index.json). Names map through a regex table with a per-key transform (HF Linear weights are
[out, in], ours [in, out]; norms and the embedding are stored as is). Our decoder layers are stacked
(`qwen3.stacked_layers`): HF's `model.layers.{i}.X` is slice i of our `layers.X` [num_layers, ...], both ways.
The model is built abstractly (`nnx.eval_shape`, no memory) and filled one parameter at a time (a stacked one
assembled on the host from its num_layers tensors) with `jax.device_put(host_array, sharding)`, so a sharded
model never passes through a single device. `save_pretrained` writes a folder that
`transformers.Qwen3ForCausalLM.from_pretrained` loads.

LoRA: `from_pretrained(..., config_overrides={"lora_rank": r, ...})` builds the model with adapters, fills its base
from the checkpoint and starts the adapters afresh (`lora.fresh_adapter`: A random, B and the row deltas of
`trainable_rows` zero, so the loaded model computes the checkpoint's function). `save_pretrained` of a model with
adapters writes the merged plain model (`lora.merged_model`): what Hugging Face loads is the function the adapted
model computes.

Every problem a person can cause (wrong folder, other architecture, a shape or name mismatch, a tokenizer with
more ids than the model) raises one `HFModelError` naming the file/tensor and what to do.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from gopo_jax.models import lora
from gopo_jax.models.qwen3 import Qwen3, Qwen3Config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MESH_AXES = ("data", "fsdp", "tensor")


class HFModelError(ValueError):
    """A Hugging Face model or tokenizer folder that cannot be used as asked; the message says why and what to do.
    (Not `gopo_jax.train.checkpoint.CheckpointError`, which is about the trainer's own orbax checkpoints.)"""


def _same(x):
    return x


def _transpose(x):
    return x.T


# HF tensor name -> (our dotted parameter path as a match template, transform). Applied at load time. A pattern
# with a `layer` group names slice `layer` of a stacked parameter (`qwen3.stacked_layers`: [num_layers, ...]).
_HF_TO_OURS = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed_tokens.embedding", _same),
    (re.compile(r"^model\.norm\.weight$"), "norm.scale", _same),
    (re.compile(r"^lm_head\.weight$"), "lm_head.kernel", _transpose),
    (re.compile(r"^model\.layers\.(?P<layer>\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.weight$"),
     r"layers.\2.kernel", _transpose),
    (re.compile(r"^model\.layers\.(?P<layer>\d+)\.(self_attn\.[qk]_norm|input_layernorm|post_attention_layernorm)"
                r"\.weight$"),
     r"layers.\2.scale", _same),
]
# Our path (+ layer for stacked ones) -> HF name, the inverse table used when saving.
_OURS_TO_HF = [
    (re.compile(r"^embed_tokens\.embedding$"), "model.embed_tokens.weight", _same),
    (re.compile(r"^norm\.scale$"), "model.norm.weight", _same),
    (re.compile(r"^lm_head\.kernel$"), "lm_head.weight", _transpose),
    (re.compile(r"^layers\.(.+)\.kernel$"), r"model.layers.{layer}.\1.weight", _transpose),
    (re.compile(r"^layers\.(.+)\.scale$"), r"model.layers.{layer}.\1.weight", _same),
]
# Buffers some exporters write that carry no parameters.
_IGNORED_HF = re.compile(r"rotary_emb\.inv_freq$")


def _is_stacked(path: str) -> bool:
    """Parameters of the stacked decoder layers carry a leading layer axis."""
    return path.startswith("layers.")


def hf_to_ours(name: str):
    """(our dotted path, layer index or None, transform) for an HF tensor name; (None, None, None) if it is not a
    Qwen3 weight. `model.layers.{i}.X` is slice i of our stacked `layers.X`."""
    for pattern, template, transform in _HF_TO_OURS:
        m = pattern.match(name)
        if m:
            layer = m.groupdict().get("layer")
            return m.expand(template), None if layer is None else int(layer), transform
    return None, None, None


def ours_to_hf(path: str, layer: int | None = None):
    """(HF tensor name, transform) for our dotted parameter path; `layer` picks the slice of a stacked one."""
    if _is_stacked(path) != (layer is not None):
        raise HFModelError(f"parameter {path!r}: a layer index is needed exactly for the stacked layers.* "
                           f"parameters, got layer={layer!r}")
    for pattern, template, transform in _OURS_TO_HF:
        m = pattern.match(path)
        if m:
            return m.expand(template).format(layer=layer), transform
    raise HFModelError(f"parameter {path!r} has no Hugging Face name in hf_io._OURS_TO_HF")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


# config.json's integer fields (from_hf_dict converts with int(), which would take 1.7, "64" or true); null
# num_key_value_heads / head_dim mean "as many as the attention heads" / "hidden_size / heads".
_CONFIG_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings")
_CONFIG_OPTIONAL = frozenset({"num_key_value_heads", "head_dim"})


def _read_config(folder: pathlib.Path) -> dict:
    if not folder.is_dir():
        raise HFModelError(
            f"checkpoint folder {folder} does not exist; pass a local Hugging Face model folder containing "
            f"config.json and {SINGLE_FILE} (or {INDEX_FILE} with its shards)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise HFModelError(f"{config_file} not found; a Hugging Face model folder needs its config.json")
    hf = _read_json(config_file)
    if not isinstance(hf, dict):
        raise HFModelError(f"{config_file}: expected a JSON object of model settings, got {type(hf).__name__}")
    arch = hf.get("architectures") or []
    if hf.get("model_type") != "qwen3" or not isinstance(arch, list) or (arch and "Qwen3ForCausalLM" not in arch):
        raise HFModelError(
            f"{config_file} describes model_type={hf.get('model_type')!r:.40}, architectures={arch!r:.80}; only "
            f"Qwen3ForCausalLM (model_type 'qwen3') checkpoints can be loaded")
    for key in _CONFIG_INTS:
        value = hf.get(key)
        if (key in hf and not (key in _CONFIG_OPTIONAL and value is None)
                and (not isinstance(value, int) or isinstance(value, bool) or value <= 0)):
            raise HFModelError(f"{config_file}: {key} must be a positive integer, got {value!r:.40}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = hf.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise HFModelError(f"{config_file}: {key} must be a positive finite number, got {value!r:.40}")
    if not isinstance(hf.get("tie_word_embeddings", False), bool):
        raise HFModelError(f"{config_file}: tie_word_embeddings must be true or false, got "
                           f"{hf['tie_word_embeddings']!r:.40}")
    return hf


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:
        # ValueError: bad JSON, bad UTF-8 and integers past Python's digit limit; RecursionError: nesting past the
        # interpreter's limit.
        raise HFModelError(f"{path} is not valid JSON ({e})") from None


def checkpoint_config(path) -> Qwen3Config:
    """The architecture in a Hugging Face folder's config.json (no weights read)."""
    folder = pathlib.Path(path)
    hf = _read_config(folder)
    try:
        return Qwen3Config.from_hf_dict(hf)
    except ValueError as e:
        raise HFModelError(f"{folder / 'config.json'}: {e}") from None


def _is_file(path: pathlib.Path) -> bool:
    """Whether `path` is a file; False for a name the file system cannot hold (over 255 bytes: OSError)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it."""
    single, index = folder / SINGLE_FILE, folder / INDEX_FILE
    if index.is_file():
        contents = _read_json(index)
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFModelError(f"{index} is not a safetensors index: it needs a 'weight_map' object of tensor name "
                               "-> shard file")
        bad = next((name for name, file in weight_map.items() if not isinstance(file, str)
                    or pathlib.PurePath(file).name != file or file in ("", ".", "..")), None)
        if bad is not None:
            raise HFModelError(f"{index}: weight_map[{bad!r}] = {weight_map[bad]!r:.60} is not the name of a shard "
                               "file in the checkpoint folder")
        files = {name: folder / file for name, file in weight_map.items()}
        absent = sorted({str(f) for f in files.values() if not _is_file(f)})
        if absent:
            raise HFModelError(f"{index} lists shard file(s) that are missing: {absent}")
        return files
    if single.is_file():
        with safe_open(single, framework="np") as f:
            return {name: single for name in f.keys()}
    raise HFModelError(
        f"no weights in {folder}: looked for {SINGLE_FILE} and {INDEX_FILE} (.bin PyTorch pickles are not read: "
        f"re-save them with safetensors)")


# Qwen3Config fields a checkpoint fixes (config.json); `from_pretrained`'s config_overrides may set the others.
_CHECKPOINT_FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
    "rope_theta", "rms_norm_eps", "tie_word_embeddings"})


def from_pretrained(path, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
                    param_dtype: str | None = None, config_overrides: Mapping[str, Any] | None = None,
                    adapter_key: jax.Array | None = None) -> Qwen3:
    """Loads a local Qwen3ForCausalLM folder. With `mesh` (axes "data", "fsdp", "tensor") every parameter is
    placed straight onto its NamedSharding from the model's partition annotations.

    param_dtype defaults to the checkpoint's torch_dtype (float32 if it is something else); dtype (compute)
    defaults to param_dtype. `config_overrides` sets Qwen3Config fields the checkpoint does not fix (remat,
    scan_unroll, attention, lora_rank, lora_alpha, lora_targets, trainable_rows, ...). With lora_rank > 0 the
    adapters are not in the checkpoint: they start afresh from `adapter_key` (default `jax.random.key(0)`), B and the
    row deltas zero.
    """
    folder = pathlib.Path(path)
    hf = _read_config(folder)
    overrides = dict(config_overrides or {})
    fields = {f.name for f in dataclasses.fields(Qwen3Config)}
    fixed = sorted(set(overrides) & _CHECKPOINT_FIELDS)
    unknown = sorted(set(overrides) - fields)
    if fixed or unknown or {"dtype", "param_dtype"} & set(overrides):
        raise HFModelError(
            f"from_pretrained config_overrides: {fixed} are fixed by {folder / 'config.json'}, {unknown} are not "
            f"Qwen3Config fields (dtype / param_dtype are arguments of their own); overridable: "
            f"{sorted(fields - _CHECKPOINT_FIELDS - {'dtype', 'param_dtype'})}")
    stored = hf.get("torch_dtype") or hf.get("dtype")
    param_dtype = param_dtype or (stored if stored in ("float32", "bfloat16", "float16") else "float32")
    try:
        config = Qwen3Config.from_hf_dict(hf, dtype=dtype or param_dtype, param_dtype=param_dtype, **overrides)
    except ValueError as e:
        raise HFModelError(f"{folder / 'config.json'}: {e}") from None
    if mesh is not None and not set(MESH_AXES) <= set(mesh.axis_names):
        raise HFModelError(f"mesh axes {mesh.axis_names} must include {MESH_AXES} (see gopo_jax.parallel)")
    files = _weight_files(folder)

    def build():
        return Qwen3(config, rngs=nnx.Rngs(0))

    if mesh is None:
        abstract = nnx.eval_shape(build)
    else:
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(build)
    graphdef, abs_state = nnx.split(abstract)
    targets = {_dotted(p): (p, v) for p, v in nnx.to_flat_state(abs_state)}
    specs = {_dotted(p): v.get_value() for p, v in nnx.to_flat_state(nnx.get_partition_spec(abs_state))}

    # The LoRA adapters are ours alone: no checkpoint tensor fills them.
    adapters = {ours for ours, (p, _) in targets.items() if lora.is_adapter(p)}
    # One slot per HF tensor: (our path, None) or, for the stacked layers, (our path, layer index).
    slots = {(ours, i): var.shape[1:] for ours, (_, var) in targets.items() if _is_stacked(ours)
             and ours not in adapters for i in range(var.shape[0])}
    slots.update({(ours, None): var.shape for ours, (_, var) in targets.items() if not _is_stacked(ours)
                  and ours not in adapters})
    plan, unexpected = {}, []
    for name in sorted(files):
        ours, layer, transform = hf_to_ours(name)
        if ours is None and _IGNORED_HF.search(name):
            continue
        if ours == "lm_head.kernel" and config.tie_word_embeddings:
            continue  # some exports store the tied head too; the embedding is the source of truth
        if ours is None or (ours, layer) not in slots:
            unexpected.append(name)
        else:
            plan[(ours, layer)] = (name, transform)
    missing = sorted(ours_to_hf(*slot)[0] for slot in slots if slot not in plan)
    if missing or unexpected:
        raise HFModelError(
            f"{folder} does not match its config.json ({config.num_layers} layers, tie_word_embeddings="
            f"{config.tie_word_embeddings}): missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")

    # Check every shape from the file headers before moving any data.
    for (ours, layer), shape in slots.items():
        name, transform = plan[(ours, layer)]
        want = tuple(shape[::-1]) if transform is _transpose else tuple(shape)
        with safe_open(files[name], framework="np") as f:
            got = tuple(f.get_slice(name).get_shape())
        if got != want:
            raise HFModelError(
                f"tensor {name} in {files[name]} has shape {got} but config.json implies {want} (our {ours}"
                f"{'' if layer is None else f'[{layer}]'} is {tuple(shape)}); the weights and config.json come "
                f"from different models")

    target_dtype = jnp.dtype(config.param_dtype)  # bfloat16 is ml_dtypes', numpy-compatible

    def read(ours, layer):
        name, transform = plan[(ours, layer)]
        with safe_open(files[name], framework="np") as f:
            return transform(f.get_tensor(name)).astype(target_dtype)

    adapter_key = jax.random.key(0) if adapter_key is None else adapter_key
    flat = []
    for ours, (path, var) in targets.items():
        if ours in adapters:
            host = np.asarray(lora.fresh_adapter(tuple(map(str, path)), var.shape, var.dtype, adapter_key))
        elif _is_stacked(ours):
            # One stacked parameter at a time is assembled on the host ([num_layers, ...] of one kind).
            host = np.empty(var.shape, target_dtype)
            for layer in range(var.shape[0]):
                host[layer] = read(ours, layer)
        else:
            host = np.ascontiguousarray(read(ours, None))
        if mesh is None:
            value = jax.device_put(host)
        else:
            value = jax.device_put(host, jax.sharding.NamedSharding(mesh, specs[ours]))
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model: Qwen3, path, *, max_shard_bytes: int = 4 * 2**30) -> None:
    """Writes config.json and model.safetensors (or numbered shards + index above max_shard_bytes).

    Older weight files of ours in the folder (model.safetensors, model-*-of-*.safetensors, the index) are removed
    first so a loader never mixes two saves. Parameters are fetched to host one at a time. A model with LoRA
    adapters is saved merged (`lora.merged_model`, which holds a merged copy of the adapted kernels meanwhile).
    """
    folder = pathlib.Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model = lora.merged_model(model)
    config = model.config
    entries = []  # (HF name, transform, our value, layer slice or None, bytes)
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path, value = _dotted(p), var.get_value()
        layers = range(value.shape[0]) if _is_stacked(path) else [None]
        for layer in layers:
            name, transform = ours_to_hf(path, layer)
            shape = value.shape if layer is None else value.shape[1:]
            entries.append((name, transform, value, layer, int(np.prod(shape)) * value.dtype.itemsize))

    shards, current, size = [], [], 0
    for entry in entries:
        if current and size + entry[4] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry[4]
    shards.append(current)

    for old in [folder / SINGLE_FILE, folder / INDEX_FILE, *folder.glob("model-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # A stacked parameter is sliced on device, so only one layer's tensor is fetched to host at a time.
        tensors = {name: np.ascontiguousarray(transform(np.asarray(jax.device_get(
                       value if layer is None else value[layer]))))
                   for name, transform, value, layer, _ in shard}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(e[4] for e in entries)}, "weight_map": weight_map}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def load_tokenizer(path):
    """The checkpoint's tokenizer (tokenizer.json + tokenizer_config.json, chat_template included)."""
    from transformers import PreTrainedTokenizerFast

    folder = pathlib.Path(path)
    if not (folder / "tokenizer.json").is_file():
        raise HFModelError(
            f"{folder / 'tokenizer.json'} not found; the tokenizer folder needs tokenizer.json and "
            f"tokenizer_config.json (as written by PreTrainedTokenizerFast.save_pretrained)")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise HFModelError(f"cannot load the tokenizer in {folder}: {e}") from None


def check_vocab(tokenizer, config: Qwen3Config) -> None:
    """Raises HFModelError when some tokenizer id has no embedding row in the model."""
    max_id = max(max(tokenizer.get_vocab().values()), len(tokenizer) - 1)
    if max_id >= config.vocab_size:
        raise HFModelError(
            f"tokenizer ids go up to {max_id} but the model's vocab_size is {config.vocab_size}: ids >= "
            f"{config.vocab_size} have no embedding row. Use the tokenizer saved with this checkpoint, or build "
            f"the model with vocab_size >= {max_id + 1}")
