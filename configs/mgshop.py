"""GOPO on the e-commerce world: by default the embedded synthetic shop (no files), tiny models, minutes on 2 CPU
cores. `--config.env.name=mg_shopdial --config.env.data_dir=PATH` runs on the real MG-ShopDial conversations.

Every key here is read by `gopo_jax.train` (build, phases, driver); a typo in a command-line override is an error (locked config).
"""
import ml_collections

from configs.baselines import add_baseline_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "gopo"

    c.env = ml_collections.ConfigDict()
    c.env.name = "synthetic_shop"
    c.env.data_dir = ""  # only for data-backed worlds (mg_shopdial, multiwoz, tmallbrand)
    c.env.max_relevance = -1  # -1: the environment's own R
    c.env.max_turns = -1  # -1: the environment's own T_max

    # Slot sizes of the dialogue buffer for text (host) worlds; the synthetic shop sets its own.
    c.layout = ml_collections.ConfigDict()
    c.layout.context_len = 32
    c.layout.customer_len = 40
    c.layout.reply_len = 40
    c.layout.max_turns = 12
    # The system message holds the SOP (strategies, their descriptions, the allowed ones per stage) before the
    # business context: what a pretrained agent needs to read (raise context_len); host worlds only.
    c.layout.sop_in_system = False

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.vocab_size = 512

    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny"  # both agents; see gopo_jax.models.qwen3.PRESETS
    # A local Hugging Face Qwen3 folder (config.json, safetensors, tokenizer with its chat template) both agents
    # start from; "" = the preset, randomly initialised, over the world's embedded tokenizer. The per-agent keys
    # override it (e.g. a 0.6B Expert and a 1.7B CS of one family: they must share the tokenizer).
    c.model.init_from = ""
    c.model.expert_init_from = ""
    c.model.cs_init_from = ""
    # Marker tokens (<s:NAME>, <stage:NAME>) take a checkpoint's reserved tokens or free embedding rows; when there
    # are too few, True grows the embedding (new rows = the mean row), False stops with an error.
    c.model.resize_embeddings = True
    # LoRA adapters on the decoder projections of the agents named in `agents` (rank 0: full fine-tune). The
    # reference policy of a LoRA agent is its base with the adapters off (no copy kept); the warm start's adapters
    # are merged into the base before the method starts, so that base is the SFT policy.
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 16.0
    c.model.lora.targets = "q,k,v,o,gate,up,down"
    c.model.lora.agents = "expert,cs"
    # -1: the preset's own size.
    c.model.hidden_size = -1
    c.model.num_layers = -1
    c.model.intermediate_size = -1
    c.model.vocab_size = -1  # -1: the tokenizer's size rounded up to 64; or an embedding this large (>= tokenizer)
    # dtype policy: matmuls, activations and KV caches in `dtype`; master weights and the optimizer state in
    # `param_dtype` (bfloat16 compute with float32 masters is the accelerator setting).
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.model.remat = "none"  # recompute policy of the scanned layers: none | full | dots | dots_no_batch
    # Layers per step of the layer scan: 1 keeps compile time flat in depth (real models); the tiny 2-layer agents
    # run ~25% faster on CPU unrolled (`benchmarks.compile_time` measures the trade).
    c.model.scan_unroll = 2
    c.model.attention = "auto"  # auto (cuDNN on GPU in bf16/fp16, else XLA) | xla | cudnn
    # Rows of full-vocabulary logits per chunk in the CS heads, never [B, L, V]: 4,096 x Qwen3's 151,936 fp32 is
    # 2.5 GB over the whole batch (split over its devices); the tiny shop vocabulary takes one chunk.
    c.model.logits_chunk = 4096

    c.sampling = ml_collections.ConfigDict()
    c.sampling.temperature = 1.0
    c.sampling.top_k = 0
    c.sampling.top_p = 1.0
    c.sampling.expert_temperature = 1.0  # the Expert samples softmax(masked logits / T_E); > 0

    c.sft = ml_collections.ConfigDict()
    # "rollout": the world's demonstrator plays the episodes (below); "logged": the world's logged human dialogues
    # (MG-ShopDial's wizards, MultiWOZ's and ABCD's agents) rendered with the run's chat template.
    c.sft.source = "rollout"
    c.sft.episodes = 512  # demonstrations (scripted "logged" agent)
    # The demonstrations are "logged agents": the reference policy, except that on a share `noise` of turns they
    # follow a habit ("habit": the myopic shortcuts of synthetic_shop.habit_strategy; "random": any allowed move).
    c.sft.noise = 0.6
    c.sft.noise_kind = "habit"
    c.sft.steps = 300
    c.sft.batch_size = 32
    c.sft.learning_rate = 3e-3
    c.sft.heldout_fraction = 0.125
    # A directory shared by runs whose warm starts are equal (gopo_jax.train.warm_start); "" computes it here.
    c.sft.cache_dir = ""

    c.gopo = ml_collections.ConfigDict()
    c.gopo.expert_loss = "preference"
    c.gopo.beta_pref = 0.3
    c.gopo.pref_margin = 0.0
    c.gopo.expert_reference = True
    c.gopo.beta_expert = 0.0
    c.gopo.clip_eps = 0.2
    c.gopo.lambda_b = 1.0
    c.gopo.lambda_s = 1.0
    c.gopo.alpha = 1.0
    c.gopo.beta_cs = 0.05
    c.gopo.kl_clamp = 10.0
    c.gopo.aggregation = "token-mean"
    c.gopo.constraint = True
    c.gopo.mu_init = 0.0
    c.gopo.mu_lr = 0.1
    c.gopo.delta = 0.05
    c.gopo.use_esndcg = True
    c.gopo.esndcg_p = 0.8
    c.gopo.sop_mask = True
    c.gopo.use_expert = True

    c.business = ml_collections.ConfigDict()
    c.business.w_o = 1.0
    c.business.w_sat = 0.5
    c.business.w_fcr = 0.5
    c.business.w_sop = 1.0
    c.business.w_len = 0.1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 40  # GOPO iterations (rollout + updates)
    c.train.groups = 16
    c.train.group_size = 4
    c.train.epochs = 2
    c.train.minibatches = 2
    c.train.lr_expert = 1e-3
    c.train.lr_cs = 5e-4
    c.train.clip_norm = 1.0
    c.train.eval_every = 10
    c.train.checkpoint_every = 5
    c.train.keep_checkpoints = 3
    # The run stops after this many consecutive non-finite (skipped) updates, in the warm start or the method's
    # iterations (gopo_jax.train.step's guard skips each one); 0 never stops.
    c.train.max_nonfinite_updates = 20

    c.eval = ml_collections.ConfigDict()
    c.eval.episodes = 256
    # Held-out customers, disjoint from the training ones and from each other's split: tune methods on
    # "validation", report "test" (gopo_jax/envs/customers.py; the synthetic shop draws each split's customers from
    # its own key stream).
    c.eval.split = "test"
    c.eval.seed = 10_000  # the first held-out customer (host worlds: the index in the split's items)
    c.eval.judge_dialogues = 8  # held-out dialogues whose turns are written as G-Eval samples (judge_samples.jsonl)
    # The deployment-time filter (GOPO.md §1), in evaluation only (training draws one reply): the CS draws
    # n_candidates replies per turn and keeps the first aligned, SOP-valid one, else the most likely. Candidate 0 is
    # the greedy reply; the others are sampled at candidate_temperature. Pure-JAX worlds only (synthetic_shop).
    c.eval.n_candidates = 1
    c.eval.candidate_temperature = 0.7

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Multi-process runs (jax.distributed): a process whose peer has not answered for this long (killed, its machine
    # gone) exits with one line naming the peer and the step, even from inside a collective that never returns.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.peer_timeout_s = 300

    # Metrics always go to workdir/metrics.jsonl and TensorBoard (workdir/tb); `wandb` also logs them, with this
    # config, to a Weights & Biases run (pip install wandb) whose id is kept in the workdir, so a resumed run goes on
    # logging to it.
    c.log = ml_collections.ConfigDict()
    c.log.wandb = False
    c.log.wandb_project = "gopo-jax"
    c.log.wandb_entity = ""  # "" = the account's default entity
    c.log.wandb_mode = "online"  # online | offline (kept under workdir/wandb until `wandb sync`)

    add_baseline_config(c)
    c.lock()
    return c
