"""GOPO on MultiWOZ (host environment: real test goals, databases, agenda-based user simulator).

    python -m experiments.multiwoz --config configs/multiwoz.py --workdir runs/multiwoz \
        [--config.env.data_dir=../shared/data/multiwoz]

A short configuration (tiny models, few iterations) that runs end to end on 2 CPU cores; scale `train.steps`,
`sft.steps`, `model.*` for real experiments.
"""
from configs.host_short import short_host_config


def get_config():
    # eval seeds 0..63 = test goals 0..63 (training draws random goals from the same split)
    return short_host_config("multiwoz", vocab_size=768, context_len=24, customer_len=40, reply_len=32,
                             eval_episodes=64, eval_seed=0, max_turns=12)
