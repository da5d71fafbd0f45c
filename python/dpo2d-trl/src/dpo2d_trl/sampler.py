"""dpo2d's data order (crates/dpo2d-train/src/sampler.rs): the held-out split
and the per-epoch order of the training pairs, derived from the seed with
SplitMix64, so the bridge trains on the pairs in the order `dpo2d train` does.

Under data parallelism the order is global: the sampler yields it whole and
accelerate hands the ranks consecutive per-device batches in turn, so one
global micro-batch of ``world_size x per_device_train_batch_size`` pairs is
the same set of pairs as one micro-batch of that size in `dpo2d train`.
"""

from __future__ import annotations

from typing import Iterator

import torch.utils.data

_MASK = (1 << 64) - 1


class SplitMix:
    """SplitMix64: the whole state is one 64-bit number."""

    def __init__(self, state: int):
        self.state = state & _MASK

    def next_u64(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def shuffle(self, v: list) -> None:
        """Fisher-Yates, as dpo2d."""
        for i in range(len(v) - 1, 0, -1):
            j = self.next_u64() % (i + 1)
            v[i], v[j] = v[j], v[i]


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """dpo2d's order of ``n`` training pairs in ``epoch`` (``random`` strategy)."""
    v = list(range(n))
    SplitMix(seed ^ ((epoch * 0xA24BAED4963EE407) & _MASK)).shuffle(v)
    return v


def split_held_out(items: list, share: float, seed: int) -> tuple[list, list]:
    """dpo2d's ``eval_split``: hold out ``round(share * n)`` (at least one)
    items chosen by the seed; both parts keep file order."""
    n_eval = max(round_half_away(len(items) * share), 1)
    if n_eval >= len(items):
        raise ValueError(f"eval_split {share} leaves no training pairs")
    order = list(range(len(items)))
    SplitMix(seed ^ 0x5EEDE7A1).shuffle(order)
    held = set(order[:n_eval])
    train = [x for i, x in enumerate(items) if i not in held]
    evals = [x for i, x in enumerate(items) if i in held]
    return train, evals


def round_half_away(x: float) -> int:
    """Rust's ``f64::round`` (halves away from zero), not Python's banker's rounding."""
    import math

    return int(math.floor(x + 0.5)) if x >= 0 else -int(math.floor(-x + 0.5))


class Dpo2dSampler(torch.utils.data.Sampler[int]):
    """Yields one epoch of dpo2d's order; ``set_epoch`` (called by the
    trainer at every epoch) selects the epoch. The order is a function of
    seed and epoch only, so a resumed run sees the same data."""

    def __init__(self, n: int, seed: int, strategy: str = "random"):
        if strategy not in ("random", "sequential"):
            raise ValueError(f"unknown train_sampling_strategy `{strategy}` (expected random or sequential)")
        self.n, self.seed, self.strategy, self.epoch = n, seed, strategy, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if self.strategy == "sequential":
            return iter(range(self.n))
        return iter(epoch_order(self.n, self.seed, self.epoch))
