"""A GOPO hyper-parameter grid on the embedded synthetic shop: β_pref × group size, 2 seeds, short training.

    python -m experiments.sweep --config configs/sweeps/gopo_hparams.py --workdir runs/sweep_gopo

`grid` maps flattened keys of configs/mgshop.py to the values each takes (a tuple); every combination is one
setting, trained for `seeds` seeds after the `fixed` overrides (`configs.overrides`). Each is a command-line flag
of this config, e.g. `--config.grid.gopo.beta_pref="(0.5, 2.0)"`.
"""
import ml_collections

from configs import overrides
from configs.compare import SHORT


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = "configs/mgshop.py"
    c.fixed = overrides(SHORT | {"method": "gopo"})
    c.grid = overrides({"gopo.beta_pref": (0.2, 1.0, 5.0), "train.group_size": (2, 4)})
    c.seeds = 2
    # The seeds of a setting train together, vmapped in one process (gopo_jax.train.driver.train_seeds), where the world
    # is pure JAX; False, or a host world, trains them one after another.
    c.vmap_seeds = True
    c.lock()
    return c
