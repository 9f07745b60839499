"""The short run shared by the host (real-data) worlds: tiny agents, 60 SFT steps on 128 demonstrations of the
world's reference policy with 30% random SOP-allowed deviations, 4 GOPO iterations of 4 groups × 4. It shows the
pipeline end to end in minutes on 2 CPU cores; scale `sft.*`, `train.*`, `model.*` for real experiments."""
from configs import mgshop


def short_host_config(env_name: str, *, vocab_size: int, context_len: int, customer_len: int, reply_len: int,
                      eval_episodes: int, eval_seed: int, max_turns: int = -1):
    c = mgshop.get_config()
    c.unlock()
    c.env.name = env_name
    c.env.max_turns = max_turns
    c.tokenizer.vocab_size = vocab_size
    c.layout.context_len = context_len
    c.layout.customer_len = customer_len
    c.layout.reply_len = reply_len
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
    c.eval.episodes = eval_episodes
    c.eval.seed = eval_seed
    c.lock()
    return c
