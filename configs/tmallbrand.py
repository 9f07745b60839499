"""GOPO on the TmallBrand stand-in (brand after-sales service on ABCD's guidelines and knowledge base).

    python -m experiments.tmallbrand --config configs/tmallbrand.py --workdir runs/tmallbrand \
        [--config.env.data_dir=../shared/data/abcd]

A short configuration that runs end to end on 2 CPU cores.
"""
from configs.host_short import short_host_config


def get_config():
    return short_host_config("tmallbrand", vocab_size=768, context_len=32, customer_len=32, reply_len=32,
                             eval_episodes=55, eval_seed=0)  # each of the 55 subflows once, as held-out customers
