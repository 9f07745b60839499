"""Who a host world's customers are: TRAINING customers (the method's rollouts and the warm start's
demonstrations) and the held-out VALIDATION and TEST customers (evaluation), three disjoint sets in every world.

A host world's episode is its reset seed, an int. Seeds in [0, HELD_OUT_SEED0) are training customers: the world
draws one of its training items (conversation, goal, customer facts) from the seed, as the training loop's seeds
(`HostWorld.episodes`, below 2**31 - 1) ask. `held_out_seeds(split, start, n)` are the seeds at and above
HELD_OUT_SEED0 that name the customers `start, ..., start + n - 1` of an evaluation split; the world plays the
split's item `index % len(items)` for customer `index` (evaluation cycles through the split when it asks for more
episodes than the split holds). Methods are tuned on "validation" and reported on "test" (config key eval.split).
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import numpy as np

EVAL_SPLITS = ("validation", "test")
TRAIN = "train"
HELD_OUT_SEED0 = 2**31  # the first held-out seed: every training seed lies below it
_SPLIT_STRIDE = 2**30  # held-out customers per evaluation split that a seed can name

Item = TypeVar("Item")


def check_split(split: str) -> None:
    if split not in EVAL_SPLITS:
        raise ValueError(f"unknown evaluation split {split!r}; use one of {EVAL_SPLITS} (eval.split)")


def held_out_seeds(split: str, start: int, n: int) -> np.ndarray:
    """int64[n]: the reset seeds of customers start .. start + n - 1 of evaluation split `split`."""
    check_split(split)
    if start < 0 or n < 0 or start + n > _SPLIT_STRIDE:
        raise ValueError(f"held-out customers {start}..{start + n - 1} of {split!r}: the first must be >= 0 and the "
                         f"last < {_SPLIT_STRIDE} (eval.seed is the first)")
    return HELD_OUT_SEED0 + EVAL_SPLITS.index(split) * _SPLIT_STRIDE + start + np.arange(n, dtype=np.int64)


def customer(seed: int) -> tuple[str, int]:
    """(split, index) of reset seed `seed`: ("train", seed) below HELD_OUT_SEED0, else the evaluation split and the
    customer's index in it."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"reset seed {seed} is negative; training seeds are >= 0 and held-out ones come from "
                         "customers.held_out_seeds")
    if seed < HELD_OUT_SEED0:
        return TRAIN, seed
    split, index = divmod(seed - HELD_OUT_SEED0, _SPLIT_STRIDE)
    if split >= len(EVAL_SPLITS):
        raise ValueError(f"reset seed {seed} names no customer (past the last evaluation split)")
    return EVAL_SPLITS[split], index


def halves(items: Sequence[Item], key: Callable[[Item], Hashable]) -> tuple[list[Item], list[Item]]:
    """(even, odd): the items sorted by `key` (an id) dealt alternately into two halves, a deterministic function of
    the ids whose sizes differ by at most one (e.g. a world's held-out items into validation and test)."""
    ordered = sorted(items, key=key)
    return ordered[0::2], ordered[1::2]
