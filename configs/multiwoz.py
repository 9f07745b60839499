"""GOPO on MultiWOZ (host environment: real test goals, databases, agenda-based user simulator).

    python -m experiments.multiwoz --config configs/multiwoz.py --workdir runs/multiwoz \
        [--config.env.data_dir=../shared/data/multiwoz]

A short configuration (tiny models, few iterations) that runs end to end on 2 CPU cores; scale `train.steps`,
`sft.steps`, `model.*` for real experiments.
"""
from configs.host_short import short_host_config


def get_config():
    # eval episodes 0..63 = the first 64 goals of eval.split: the official test goals ("test") or the val goals at
    # odd positions ("validation"); training plays the val goals at even positions (gopo_jax/envs/multiwoz.py)
    return short_host_config("multiwoz", vocab_size=768, context_len=24, customer_len=40, reply_len=32,
                             eval_episodes=64, eval_seed=0, max_turns=12)
