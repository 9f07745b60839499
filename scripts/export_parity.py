"""Export parity of a run: max |Δlogit| between our agents and transformers on the exported folders, over the valid
slots of the run's held-out evaluation rollout (4 dialogues, greedy).

    PYTHONPATH=. python scripts/export_parity.py RUN_DIR EXPORT_DIR
"""
import sys

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from gopo_jax import export

run = export.load_run(sys.argv[1])
c = run.components
traj = c.eval_rollout(run.params, c.world.eval_episodes(c.config.eval.seed, 4), jax.random.key(0))
for agent in ("expert", "cs"):
    gd = c.expert_gd if agent == "expert" else c.cs_gd
    model = nnx.merge(gd, run.params[agent])
    hf = transformers.AutoModelForCausalLM.from_pretrained(f"{sys.argv[2]}/{agent}", dtype=torch.float32).eval()
    worst = 0.0
    for i in range(4):
        valid = np.asarray(traj.valid[i])
        ids = np.asarray(traj.tokens[i])[valid][None]
        ours = np.asarray(model(ids, np.arange(ids.shape[1])[None], np.ones_like(ids, bool))[0][0])
        with torch.no_grad():
            theirs = hf(torch.as_tensor(ids, dtype=torch.long)).logits[0].numpy()
        worst = max(worst, float(np.abs(ours - theirs).max()))
    print(f"{agent}: max |Δlogit| = {worst:.3g} over {int(np.asarray(traj.valid[:4]).sum())} slots x "
          f"{theirs.shape[-1]} vocabulary columns")
