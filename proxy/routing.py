"""Choosing a worker: power of two choices on outstanding work, respecting capacity (pure logic)."""

from __future__ import annotations

import random
from typing import Protocol, Sequence


class Candidate(Protocol):
    inflight: int
    capacity: int
    weight: float  # 0 < weight <= 1 (slow start ramps it up)


def pick(candidates: Sequence[Candidate], rng: random.Random = random._inst) -> Candidate | None:
    """Two random workers with room; the one with less outstanding work per unit of weight wins."""
    open_ = [c for c in candidates if c.inflight < c.capacity]
    if not open_:
        return None
    if len(open_) == 1:
        return open_[0]
    a, b = rng.sample(open_, 2)
    return a if (a.inflight + 1) / a.weight <= (b.inflight + 1) / b.weight else b
