"""The one command-line convention of every gopo-jax entry point: absl flags, and ml_collections config flags where a
config file applies.

An entry module defines `define_flags()` (its absl flags; only its `cli()` calls it, so importing the module
defines nothing), `main(argv)` (the absl main) and `cli()`, which is `command_line.run(define_flags, main)` (define
the flags, then `app.run(main)`): the console script's target, also called by the module's
`if __name__ == "__main__": cli()`. An error meant for people is one line `error: ...` on stderr and exit status 2,
without a traceback: `fail(message)` in a main, and `run`'s flag parsing for an unknown flag, a value of the wrong
type, a config override of a key the config lacks and a config file that does not exist.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from typing import Callable, Iterator, NoReturn

from absl import app, flags
from ml_collections.config_flags import config_flags

import configs

USAGE_ERROR = 2  # the exit status of an error meant for people (argparse's, for a wrong command line)


def quiet_logging() -> None:
    """Progress at INFO on the console, without orbax's line for every checkpoint save and restore (absl INFO)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def _override_of_missing_key(argv: list[str], error: Exception) -> str | None:
    """The message for an override of a key the config lacks: ml_collections says only "'stpes' Did you mean
    "steps" instead of "stpes"?", so the flag that names the key is looked up in `argv`. None when no override
    names it (then the error is not about the command line)."""
    text = str(error)
    suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    words = re.findall(r"\w+", text)
    name = suggestion.group(2) if suggestion else (words[0] if words else None)
    flag = next((arg.split("=", 1)[0] for arg in argv[1:]
                 if arg.startswith("-") and name in arg.split("=", 1)[0].lstrip("-").split(".")[1:]), None)
    if flag is None:
        return None
    hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
    return f"{flag}: the config has no key {name!r}{hint}; an override must name an existing key"


@contextlib.contextmanager
def _flag_errors(argv: list[str]) -> Iterator[None]:
    """Flag errors as one `error:` line; ml_collections raises AttributeError or KeyError for an override of a key
    the config lacks and TypeError for a value its field does not take, not flags.Error."""
    try:
        yield
    except flags.Error as e:
        fail(str(e))
    except (AttributeError, KeyError) as e:
        message = _override_of_missing_key(argv, e)
        if message is None:
            raise
        fail(message)
    except TypeError as e:
        fail(" ".join(str(e).split()))
    except OSError as e:  # config_flags: overrides of a config file that could not be loaded
        missing = re.search(r"No such file or directory: '([^']+)'", str(e))
        fail(_no_config_file(missing.group(1)) if missing else " ".join(str(e).split()))


def _no_config_file(path: str) -> str:
    return (f"no such config file {path} (a path relative to the current directory, or absolute; the installed "
            f"configs are in {configs.CONFIGS_DIR})")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run`'s `flags_parser`) with its errors as one `error:` line, exit status 2."""
    with _flag_errors(argv):
        remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if config_flags.is_config_flag(flag):
            # config_flags defers a missing file's error to the config's first use, as a traceback.
            path = config_flags.get_config_filename(flag).split(":", 1)[0]
            if not os.path.isfile(path):
                fail(f"--{name}: {_no_config_file(path)}")
    return remaining


def run(define_flags: Callable[[], None], main: Callable[[list[str]], None]) -> None:
    """Defines the entry's flags and runs `main` with `app.run`, flag errors as one line (ml_collections applies
    `--config.KEY=VALUE` overrides already when the config flag is defined). `--help` shows the entry module's
    docstring and flags also when the program is a console script, whose `__main__` is pip's wrapper."""
    with _flag_errors(sys.argv):
        define_flags()
    entry = sys.modules[main.__module__]
    program = sys.modules["__main__"]
    if program is not entry:
        if not program.__doc__:
            program.__doc__ = entry.__doc__
        # absl's --help lists the key flags of the module named by sys.argv[0]: make the entry's flags theirs.
        for flag in flags.FLAGS.get_key_flags_for_module(entry.__name__):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main, flags_parser=parse_flags)
