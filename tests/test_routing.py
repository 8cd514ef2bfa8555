import random
from dataclasses import dataclass

from proxy.fleet.routing import pick


@dataclass
class W:
    name: str
    inflight: int
    capacity: int = 4
    weight: float = 1.0
    inflight_tokens: int = 0


def test_full_workers_are_never_picked():
    assert pick([W("a", 4), W("b", 4)]) is None
    assert pick([W("a", 4), W("b", 3)]).name == "b"


def test_two_choices_prefers_less_loaded():
    rng = random.Random(1)
    workers = [W("idle", 0, 100), W("busy", 50, 100)]
    assert all(pick(workers, rng).name == "idle" for _ in range(20))


def test_low_weight_worker_gets_less():
    rng = random.Random(2)
    workers = [W("warm", 2, 100, 1.0), W("ramping", 1, 100, 0.1)]
    assert sum(pick(workers, rng).name == "warm" for _ in range(20)) == 20


def test_tokens_in_flight_count_as_load():
    rng = random.Random(3)
    workers = [W("long", 1, 100, inflight_tokens=8000), W("short", 2, 100, inflight_tokens=20)]
    assert all(pick(workers, rng).name == "short" for _ in range(20))


def test_the_two_choices_are_two_distinct_workers_drawn_uniformly():
    """With three workers of distinct loads, uniformly drawn distinct pairs make the least loaded
    win two pairs of three, the middle one one, and the most loaded none (it would win whenever
    it were drawn twice)."""
    rng = random.Random(4)
    workers = [W("least", 0, 100), W("middle", 1, 100), W("most", 2, 100)]
    wins = {"least": 0, "middle": 0, "most": 0}
    for _ in range(3000):
        wins[pick(workers, rng).name] += 1
    assert wins["most"] == 0
    assert 1800 <= wins["least"] <= 2200 and 800 <= wins["middle"] <= 1200
