"""Hyper-parameters of the baseline methods (GOPO.md §4), as a `c.baselines` sub-dict of a run config.

`add_baseline_config(c)` is called by each run config before it locks; `config.method` picks which block is read
(`gopo_jax.train.baselines`). The on-policy single-agent baselines (PPO, GRPO) train the CS with `c.train.lr_cs`, so
a comparison changes the objective only, not the step size. DPO is an offline, supervised-style loss and has its own
step size `dpo.lr` (see there).
"""
import ml_collections


def add_baseline_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    b = ml_collections.ConfigDict()

    b.grpo = ml_collections.ConfigDict()
    b.grpo.clip_eps = 0.2
    b.grpo.beta = 0.02  # k3 KL to the SFT reference; 0 skips the reference forward pass
    b.grpo.kl_clamp = 10.0
    b.grpo.aggregation = "seq-mean-token-mean"  # as in DeepSeekMath's GRPO

    b.ppo = ml_collections.ConfigDict()
    b.ppo.clip_eps = 0.2
    b.ppo.beta = 0.02
    b.ppo.kl_clamp = 10.0
    b.ppo.aggregation = "token-mean"
    b.ppo.gamma = 1.0  # over reply tokens; the dialogue is short enough that no discount is needed
    b.ppo.lam = 0.95
    b.ppo.shaping = 1.0  # per-turn shaping: shaping · g_t (task progress) on each turn's last reply token
    b.ppo.vf_coef = 0.5
    b.ppo.value_clip = 0.2
    b.ppo.lr_value = 1e-3
    b.ppo.value_layers = 1  # the value model's own Qwen3 layers (same width as the policy)
    b.ppo.normalize_advantages = True

    b.dpo = ml_collections.ConfigDict()
    b.dpo.beta = 0.1  # Rafailov et al. 2023 use 0.1-0.5
    b.dpo.margin = 0.0  # a pair (i, j) needs R_B(i) > R_B(j) + margin: equal R_B (ties) never make a pair
    # DPO is run at a far smaller step than its SFT (Rafailov et al. 2023: 1e-6; Zephyr: 5e-7, 40x below its SFT
    # step): the pairs come from the frozen SFT policy, so nothing corrects a drift away from it the way fresh
    # on-policy samples do. Here 1/10 of train.lr_cs (5e-4), 1/60 of the SFT step (3e-3). Measured (synthetic shop,
    # SHORT, seed 0): at 5e-4 without RPO the chosen replies' NLL rose 0.26 -> 1.10 and SOP validity fell to 0.59.
    b.dpo.lr = 5e-5
    # RPO (Pang et al. 2024): + rpo_alpha · NLL(chosen)/|chosen| per pair; they use 1.0. 0 is plain DPO.
    b.dpo.rpo_alpha = 1.0

    b.memento = ml_collections.ConfigDict()
    b.memento.bank_size = 1024  # ring buffer of cases; must hold one minibatch's turns
    b.memento.top_k = 8
    b.memento.retrieval_temperature = 0.1  # softmax over cosine similarities of the retrieved cases
    # KL weight / soft-Q temperature: π(k|s) ∝ π_SFT(k|s) · exp(Q(s, k) / α) over SOP-allowed strategies. Returns are
    # O(1) (R_B + shaping), so α = 0.5 lets a Q gap of 1 reweight a strategy by e² while Q estimates from a few
    # hundred cases stay noisy; α → 0 trusts Q alone, α → ∞ is the SFT Expert.
    b.memento.alpha = 0.5
    b.memento.gamma = 1.0  # over agent turns
    b.memento.shaping = 1.0  # per-turn reward shaping · g_t, R_B on the last turn (as PPO)
    b.memento.hidden = 64
    b.memento.lr_q = 1e-2  # the Q-MLP starts at Q ≡ 0 and gets ~80 Adam steps: 1e-3 cannot reach returns of O(1)

    # A prompted chat model as the CS (host worlds; nothing trained): an OpenAI-compatible endpoint, the key read
    # from the environment variable `api_key_env` (a local server needs none).
    b.prompted = ml_collections.ConfigDict()
    b.prompted.base_url = ""  # e.g. http://127.0.0.1:8000 (python -m gopo_jax.serve) or a provider's API
    b.prompted.model = ""
    b.prompted.api_key_env = "OPENAI_API_KEY"
    b.prompted.temperature = 0.0
    b.prompted.max_tokens = 128
    b.prompted.timeout = 60.0
    b.prompted.max_retries = 4
    b.prompted.max_concurrency = 8  # episodes in flight at once (each a dialogue with the endpoint)

    c.baselines = b
    return c
