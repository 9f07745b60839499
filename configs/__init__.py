"""The ml_collections configs of gopo-jax: run configs (mgshop.py, multiwoz.py, ...), the comparison (compare.py)
and sweeps (sweeps/*.py), each file a `get_config()` that returns a locked ConfigDict.

They are installed as this package, so an entry point's default config file (`config_path`) is found from any
directory; a `--config` path given on the command line stays relative to the current directory.
"""
from __future__ import annotations

import pathlib
from typing import Any, Mapping

import ml_collections

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent


def config_path(name: str) -> str:
    """The installed config file `name` ("mgshop.py", "sweeps/ablations.py") as an absolute path."""
    return str(CONFIGS_DIR / name)


def overrides(flat: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Overrides of a run config written with its flattened keys, {"method": "gopo", "gopo.use_expert": False},
    held nested (method: gopo, gopo: {use_expert: False}) so that each one is also a command-line flag of the
    config that holds them (`--config.variants.gopo_no_ea.gopo.use_expert=True`). Keys keep the order written
    (a sweep's labels follow it). `experiments.common.apply_overrides` applies them to a locked run config."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    def config_dict(node: dict) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({k: config_dict(v) if isinstance(v, dict) else v for k, v in node.items()},
                                         sort_keys=False)

    return config_dict(tree)
