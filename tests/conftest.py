"""Test set-up: 8 fake CPU devices (set before JAX starts) and a persistent compilation cache under the checkout."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hypothesis.strategies  # noqa: E402, F401  (see below)
import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

# hypothesis is a pytest plugin, so pytest's assertion rewriter parses each of its modules when it is first imported.
# Imported lazily from deep inside a test, `ast.parse` can then fail with "SystemError: AST constructor recursion
# depth mismatch" (a CPython 3.11 bug in the AST recursion bookkeeping); seen here once in test_chat/test_checkpoint.
# Importing the strategies (which pull in the whole engine) here parses them at a shallow stack, once.

from tests.helpers import tiny_run_config, world_and_agents  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

# One cache directory per xdist worker (and per worker's subprocesses, which read JAX_COMPILATION_CACHE_DIR): two
# workers writing and reading the same entries at once crashed a worker inside JAX's cache I/O twice on CI (an abort
# in put_executable_and_time, a segfault in get_executable_and_time), each time in a test that passes alone.
COMPILATION_CACHE = REPO_ROOT / ".jax_cache" / os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)
jax.config.update("jax_compilation_cache_dir", str(COMPILATION_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real public data folder (../shared/data); tests needing it are skipped only if it is absent."""
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """(world, expert graphdef, cs graphdef, params) of the synthetic shop with tiny agents."""
    return world_and_agents(tiny_run_config(), tmp_path_factory.mktemp("world"))
