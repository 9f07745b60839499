"""GOPO on the TmallBrand stand-in (brand after-sales service on ABCD's guidelines and knowledge base).

    python -m experiments.tmallbrand --config configs/tmallbrand.py --workdir runs/tmallbrand \
        [--config.env.data_dir=../shared/data/abcd]

A short configuration that runs end to end on 2 CPU cores.
"""
from configs import mgshop


def get_config():
    c = mgshop.get_config()
    c.unlock()
    c.env.name = "tmallbrand"
    c.tokenizer.vocab_size = 768
    c.layout.context_len = 32
    c.layout.customer_len = 32
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
    c.eval.episodes = 55
    c.eval.seed = 100_000
    c.lock()
    return c
