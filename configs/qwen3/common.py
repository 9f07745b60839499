"""GOPO post-training published Qwen3 checkpoints on MG-ShopDial on one 8 x H100 80 GB host.

Each size's file (qwen3_0_6b.py ... qwen3_14b.py) picks the mesh, full fine-tune or LoRA, the batch and the remat
policy that `python -m gopo_jax.plan --config configs/qwen3/<size>.py` says fit 80 GB per GPU (README "Post-train a
pretrained Qwen3"). The weights come from a local Hugging Face folder:

    python -m experiments.mgshop --config configs/qwen3/qwen3_1_7b.py \\
        --config.model.init_from=/models/Qwen3-1.7B --workdir runs/qwen3-1.7b

Without `model.init_from` the run would train the preset's architecture from random weights over the embedded
tokenizer: set it. Both agents load the folder (`model.expert_init_from` / `model.cs_init_from` give each its own,
e.g. a 0.6B Expert beside a 1.7B CS of the same family).
"""
from configs import mgshop


def qwen3_config(preset: str, *, lora_rank: int, learning_rate: float, sft_learning_rate: float):
    c = mgshop.get_config()
    c.unlock()
    # MG-ShopDial's real conversations; the warm start reads the logged wizards' turns.
    c.env.name = "mg_shopdial"
    c.sft.source = "logged"
    c.sft.episodes = 512
    c.sft.steps = 200
    c.sft.batch_size = 16
    c.sft.noise = 0.0
    c.sft.noise_kind = "random"
    c.sft.learning_rate = sft_learning_rate
    # The SOP and the business context in the system message; customer and reply slots for real sentences.
    c.layout.sop_in_system = True
    c.layout.context_len = 512
    c.layout.customer_len = 96
    c.layout.reply_len = 96
    c.layout.max_turns = 12
    c.model.preset = preset
    c.model.vocab_size = 151_936  # the checkpoint's (what the planner sizes when no init_from is given)
    c.model.dtype = "bfloat16"
    # Full fine-tune: fp32 master weights and AdamW state. LoRA: the checkpoint's bf16 base, frozen (adapters fp32).
    c.model.param_dtype = "float32" if lora_rank == 0 else "bfloat16"
    c.model.remat = "full"
    c.model.scan_unroll = 1
    c.model.lora.rank = lora_rank
    c.model.lora.alpha = 2.0 * lora_rank if lora_rank else 16.0
    c.sampling.temperature = 1.0
    c.train.steps = 200
    c.train.groups = 16
    c.train.group_size = 4
    c.train.minibatches = 4
    c.train.epochs = 1
    c.train.lr_expert = learning_rate
    c.train.lr_cs = learning_rate
    c.train.eval_every = 20
    c.train.checkpoint_every = 10
    c.eval.episodes = 64
    c.eval.seed = 0
    # 8 GPUs: parameters, optimizer state and the batch split 8 ways (FSDP); no tensor parallelism below 14B.
    c.mesh.data = 1
    c.mesh.fsdp = 8
    c.mesh.tensor = 1
    c.lock()
    return c
