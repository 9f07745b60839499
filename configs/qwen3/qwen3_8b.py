"""qwen3-8b on 8 x H100: LoRA rank 16 (configs/qwen3/common.py; the plan: python -m gopo_jax.plan --config configs/qwen3/qwen3_8b.py)."""
from configs.qwen3.common import qwen3_config


def get_config():
    return qwen3_config("qwen3-8b", lora_rank=16, learning_rate=1e-4, sft_learning_rate=2e-4)
