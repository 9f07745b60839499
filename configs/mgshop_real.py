"""GOPO on the real MG-ShopDial conversations (the host world env.name="mg_shopdial") instead of the embedded synthetic shop.

    python -m experiments.mgshop --config configs/mgshop_real.py --workdir runs/mgshop-real \
        [--config.env.data_dir=../shared/data/mgshopdial]

A short configuration that runs end to end on 2 CPU cores; the logged human wizard is the reference policy and the
demonstrator (with 30% random SOP-allowed deviations).
"""
from configs.host_short import short_host_config


def get_config():
    return short_host_config("mg_shopdial", vocab_size=1024, context_len=32, customer_len=48, reply_len=48,
                             eval_episodes=64, eval_seed=0)
