"""GOPO on the real MG-ShopDial conversations (the Mgshop host world) instead of the embedded synthetic shop.

    python -m experiments.mgshop --config configs/mgshop_real.py --workdir runs/mgshop-real \
        [--config.env.data_dir=../shared/data/mgshopdial]

A short configuration that runs end to end on 2 CPU cores; the logged human wizard is the reference policy and the
demonstrator (with 30% random SOP-allowed deviations).
"""
from configs import mgshop


def get_config():
    c = mgshop.get_config()
    c.unlock()
    c.env.name = "mgshop"
    c.tokenizer.vocab_size = 1024
    c.layout.context_len = 32
    c.layout.customer_len = 48
    c.layout.reply_len = 48
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
    c.eval.seed = 0
    c.lock()
    return c
