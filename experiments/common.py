"""What the experiment drivers share: reading a config file named inside another config (a comparison's run
configs, a sweep's base) and applying overrides to it, the way the command line reads and overrides `--config`.

A config file is loaded by ml_collections' own config-file parser (`get_config()`, locked), and overrides go through
`ConfigDict.update_from_flattened_dict`, so a key the run config lacks (a typo) or a value of the wrong type is an
error naming the key, never a silently new key.
"""
from __future__ import annotations

import pathlib
from typing import Any

import ml_collections
from ml_collections.config_flags import config_flags

from configs import CONFIGS_DIR
from gopo_jax.train.checkpoint import flatten_json


class ConfigError(ValueError):
    """A config that cannot be used as written; the message names the key or file and the fix."""


def config_file(path: str | pathlib.Path, *, where: str) -> pathlib.Path:
    """The file `path` names: as given (relative to the current directory, or absolute) when it exists, else
    `configs/<name>` is the installed configs package's file, so a config that names another works from any
    directory."""
    given = pathlib.Path(path)
    if given.is_file():
        return given
    if given.parts[:1] == ("configs",) and CONFIGS_DIR.joinpath(*given.parts[1:]).is_file():
        return CONFIGS_DIR.joinpath(*given.parts[1:])
    raise ConfigError(f"{where}: config file {path} does not exist (a path relative to the current directory, "
                      f"absolute, or configs/<name> of the installed configs in {CONFIGS_DIR})")


def load_config_file(path: str | pathlib.Path, *, where: str) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `path` (see `config_file`), locked, as `--config` would load it."""
    return config_flags.ConfigFileFlagParser(name="run", lock_config=True).parse(str(config_file(path, where=where)))


def flattened(overrides: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{"gopo": {"use_expert": False}} -> {"gopo.use_expert": False}, in the order the keys were written."""
    return flatten_json(overrides.to_dict() if isinstance(overrides, ml_collections.ConfigDict) else overrides)


def apply_overrides(config: ml_collections.ConfigDict, overrides: ml_collections.ConfigDict | dict, *,
                    where: str) -> None:
    """Sets each override (`configs.overrides`) in the locked `config`; `where` names them in an error."""
    for key, value in flattened(overrides).items():
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError:
            raise ConfigError(f"{where}: the run config has no key {key!r}; check the spelling against "
                              "configs/mgshop.py") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {key}={value!r} has the wrong type ({e})") from None
