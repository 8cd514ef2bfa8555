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
