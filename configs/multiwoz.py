"""GOPO on MultiWOZ (host environment: real test goals, databases, agenda-based user simulator).

    python -m experiments.multiwoz --config configs/multiwoz.py --workdir runs/multiwoz \
        [--config.env.data_dir=../shared/data/multiwoz]

A short configuration (tiny models, few iterations) that runs end to end on 2 CPU cores; scale `train.steps`,
`sft.steps`, `model.*` for real experiments.
"""
from configs import mgshop


def get_config():
    c = mgshop.get_config()
    c.unlock()
    c.env.name = "multiwoz"
    c.env.max_turns = 12
    c.tokenizer.vocab_size = 768
    c.layout.context_len = 24
    c.layout.customer_len = 40
    c.layout.reply_len = 32
    c.layout.max_turns = 12
    c.sft.noise = 0.3
    c.sft.noise_kind = "random"
    c.sft.episodes = 128
    c.sft.steps = 60
    c.sft.batch_size = 16
    c.train.steps = 4
    c.train.groups = 4
    c.train.group_size = 4
    c.train.eval_every = 2
    c.train.checkpoint_every = 2
    c.eval.episodes = 64
    c.eval.seed = 0  # goal indices 0..63 of the test split (training draws random goals from the same split)
    c.lock()
    return c
