"""Warm starts computed once and shared by every run that would compute the same one.

A comparison trains many methods per seed, and each one starts with the same SFT phase: on the embedded default
that phase is most of a short run's time. The warm start is a function of the config keys below (and of whether
the Expert acts, which changes the demonstrations), not of the method that follows it: the SFT optimizer only
moves the two agents (`Run` gives a method's extra parameters a zero step), every random draw of the phase is a
function of (seed, phase, step), and the tokenizer is part of the checkpoint's fingerprint. So a run with
`sft.cache_dir` set reads the agents and the phase's metric lines from `<cache_dir>/<key>/` when another run wrote
them, and writes them there when it computed them itself.

The key keeps every config section except those only read after the warm start. A key that is too wide only
costs sharing; one too narrow would hand a run someone else's agents, hence exclusion, not inclusion.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Any

import ml_collections

from gopo_jax.train import checkpoint

_log = logging.getLogger(__name__)
# Read only after the warm start (or, for `train` and `gopo`, except the keys kept in `_KEEP`).
_AFTER_WARM_START = ("method", "sampling", "business", "eval", "baselines", "log", "distributed")
_KEEP = {"train": ("clip_norm",), "gopo": ("sop_mask",)}
_METRICS = "metrics.jsonl"
_FORMAT = 2  # bump when what a warm start is changes, so old cache entries are not read


def warm_start_key(config: ml_collections.ConfigDict, *, use_expert: bool) -> str:
    """Hex digest naming the warm start `config` leads to (pure function of the config)."""
    d = config.to_dict()
    for section in _AFTER_WARM_START:
        d.pop(section, None)
    for section, keep in _KEEP.items():
        d[section] = {k: d[section][k] for k in keep}
    d["sft"] = {k: v for k, v in d["sft"].items() if k != "cache_dir"}
    d["use_expert"] = bool(use_expert)
    d["format"] = _FORMAT
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:24]


def tokenizer_digest(tokenizer) -> str:
    """The token ids a warm start was trained with (a retrained tokenizer must not reuse it)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:24]


class WarmStartCache:
    """One entry: `<cache_dir>/<key>/{checkpoint steps, metrics.jsonl}`; the checkpoint is written last, so an
    entry with a checkpoint is complete."""

    def __init__(self, cache_dir: str | pathlib.Path, key: str, fingerprint: dict[str, Any]):
        self.dir = pathlib.Path(cache_dir) / key
        self.fingerprint = fingerprint

    def load(self, agents_target: dict) -> tuple[dict, list[dict]] | None:
        """(agents {"expert", "cs"} with `agents_target`'s structure and shardings, the phase's metric records),
        or None when no run has written this warm start yet."""
        try:
            restored = checkpoint.restore_checkpoint(self.dir / "checkpoints", agents_target,
                                                     expected_metadata=self.fingerprint)
            if restored is None:
                return None
            records = [json.loads(line) for line in (self.dir / _METRICS).read_text().splitlines() if line.strip()]
        except (checkpoint.CheckpointCorruptError, json.JSONDecodeError, FileNotFoundError) as e:
            # A cache entry can always be recomputed: a damaged one is set aside (kept for inspection) and this run
            # computes the warm start and writes a fresh entry, instead of stopping.
            aside = self.dir.with_name(f"{self.dir.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
            _log.warning("warm-start cache entry %s is damaged (%s); set aside as %s, computing it again", self.dir,
                         " ".join(str(e).split())[:300], aside)
            self.dir.rename(aside)
            return None
        _log.info("warm start read from %s", self.dir)
        return restored[0], records

    def store(self, step: int, agents: dict, records: list[dict]) -> None:
        """Writes the entry unless it exists (a concurrent run with the same key writes the same agents)."""
        if checkpoint.latest_step(self.dir / "checkpoints") is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{_METRICS}.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.dir / _METRICS)
        checkpoint.save_checkpoint(self.dir / "checkpoints", step, agents, metadata=self.fingerprint, keep=1)
        _log.info("warm start written to %s", self.dir)
