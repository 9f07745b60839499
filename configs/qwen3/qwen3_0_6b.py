"""qwen3-0.6b on 8 x H100: full fine-tune (configs/qwen3/common.py; the plan: python -m gopo_jax.plan --config configs/qwen3/qwen3_0_6b.py)."""
from configs.qwen3.common import qwen3_config


def get_config():
    return qwen3_config("qwen3-0.6b", lora_rank=0, learning_rate=1e-6, sft_learning_rate=1e-5)
