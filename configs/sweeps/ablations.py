"""GOPO's ablations (GOPO.md §4) as a sweep: each switch off in turn, 3 seeds, short training.

    python -m experiments.sweep --config configs/sweeps/ablations.py --workdir runs/sweep_ablations
"""
import ml_collections

from configs import overrides
from configs.compare import SHORT


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = "configs/mgshop.py"
    c.fixed = overrides(SHORT | {"method": "gopo"})
    c.grid = overrides({"gopo.use_expert": (True, False), "gopo.use_esndcg": (True, False),
                        "gopo.sop_mask": (True, False), "gopo.constraint": (True, False)})
    c.seeds = 3
    # The seeds of a setting train together, vmapped in one process (gopo_jax.train.driver.train_seeds), where the world
    # is pure JAX; False, or a host world, trains them one after another.
    c.vmap_seeds = True
    c.lock()
    return c
