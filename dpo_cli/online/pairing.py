"""From one prompt's scored samples to (chosen, rejected) pairs: pure functions over lists of rewards.

- `max-min` (default; RLHFlow's iterative DPO): the best sample against the worst.
- `max-random`: the best against one other sample drawn at random (seeded per prompt).
- `all`: every two samples whose rewards differ.

A pair needs chosen's reward above rejected's by more than nothing and by at least `min_margin`: an equal pair is a
tie (dropped and counted: it teaches nothing), a smaller difference is dropped as below the margin. A sample with no
reward (None: the reward had no opinion) takes no part. Among equal rewards the earliest sample wins, so the
result depends only on the rewards.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

PAIRINGS = ("max-min", "max-random", "all")


@dataclass
class PairingCounts:
    """What pairing kept and dropped, summed over prompts."""

    pairs: int = 0
    ties: int = 0
    below_margin: int = 0
    unscored: int = 0
    """Samples left out because a reward returned None."""
    prompts_without_pair: int = 0

    def add(self, other: PairingCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class PromptPairs:
    pairs: list[tuple[int, int]] = field(default_factory=list)
    """(chosen sample index, rejected sample index)."""
    counts: PairingCounts = field(default_factory=PairingCounts)


def pair_samples(
    rewards: Sequence[float | None], pairing: str = "max-min", min_margin: float = 0.0, seed: int = 0
) -> PromptPairs:
    """The pairs of one prompt's samples, by their rewards (index = sample number)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}")  # the command checks it first, with a line for people
    scored = [i for i, reward in enumerate(rewards) if reward is not None]
    result = PromptPairs()
    result.counts.unscored = len(rewards) - len(scored)
    if pairing == "all":
        candidates = [(i, j) for n, i in enumerate(scored) for j in scored[n + 1 :]]
        candidates = [(i, j) if rewards[i] >= rewards[j] else (j, i) for i, j in candidates]
    elif len(scored) < 2:
        candidates = []
    else:
        best = max(scored, key=lambda i: (rewards[i], -i))
        if pairing == "max-min":
            worst = min(scored, key=lambda i: (rewards[i], i))
            candidates = [(best, worst)] if worst != best else [(best, next(i for i in scored if i != best))]
        else:
            others = [i for i in scored if i != best]
            candidates = [(best, random.Random(seed).choice(others))]
    for chosen, rejected in candidates:
        margin = rewards[chosen] - rewards[rejected]
        if margin <= 0:
            result.counts.ties += 1
        elif margin < min_margin:
            result.counts.below_margin += 1
        else:
            result.pairs.append((chosen, rejected))
    result.counts.pairs = len(result.pairs)
    result.counts.prompts_without_pair = int(not result.pairs)
    return result
