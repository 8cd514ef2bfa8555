"""Graceful degradation with hysteresis (pure logic): should this tier's requests go to its
fallback pool right now?"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Load:
    queue_depth: int
    utilization: float  # active / capacity of the primary pool (1.0 when it has no capacity)
    expected_wait_s: float


class Degrader:
    def __init__(self, queue_depth: int | None, utilization: float | None, expected_wait_s: float | None,
                 recover_ratio: float) -> None:
        self.settings = (queue_depth, utilization, expected_wait_s, recover_ratio)
        self.limits = {"queue_depth": queue_depth, "utilization": utilization, "expected_wait_s": expected_wait_s}
        self.recover_ratio = recover_ratio
        self.degraded = False

    def update(self, load: Load) -> bool:
        values = {"queue_depth": load.queue_depth, "utilization": load.utilization,
                  "expected_wait_s": load.expected_wait_s}
        set_limits = {k: v for k, v in self.limits.items() if v is not None}
        if not self.degraded:
            self.degraded = any(values[k] >= v for k, v in set_limits.items())
        else:
            self.degraded = not all(values[k] < v * self.recover_ratio for k, v in set_limits.items())
        return self.degraded
