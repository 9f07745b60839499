"""The pretrained path end to end on 2 CPU cores: a tiny random Qwen3 saved with the real 151,669-token Qwen3
tokenizer and chat template (`python -m tests.hf_fixtures --out DIR`) post-trained on the synthetic shop (which runs
on any tokenizer: its words become id sequences of that tokenizer). Nothing learns much at this size; it shows that
SFT -> GOPO -> evaluation -> export -> chat run on a real vocabulary, and what they cost.

    python -m tests.hf_fixtures --out /tmp/tiny-qwen3
    python -m experiments.mgshop --config configs/qwen3/smoke.py --config.model.init_from=/tmp/tiny-qwen3 \\
        --workdir /tmp/runs/qwen3-smoke
"""
from configs import mgshop


def get_config():
    c = mgshop.get_config()
    c.unlock()
    c.layout.reply_len = 24  # the shop's reply slot for a checkpoint's tokenizer (its templates need 15)
    c.model.dtype = "float32"
    c.model.logits_chunk = 512  # rows of [rows, 151,936] fp32 logits at a time (~311 MB)
    c.sft.episodes = 256
    c.sft.steps = 60
    c.sft.batch_size = 16
    c.train.steps = 4
    c.train.groups = 4
    c.train.group_size = 4
    c.train.minibatches = 2
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.episodes = 32
    c.lock()
    return c
