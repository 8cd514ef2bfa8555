import random

from proxy.fleet.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerPolicy


def make(**kw):
    now = [0.0]
    b = Breaker(BreakerPolicy(jitter=0.0, **kw), clock=lambda: now[0], rng=random.Random(0))
    return b, now


def test_opens_after_consecutive_connection_errors_and_probes_after_cooldown():
    b, now = make(consecutive_errors=5, base_eject_s=30)
    for _ in range(4):
        assert not b.record_failure(internal=False, may_eject=True)
    assert b.record_failure(internal=False, may_eject=True)
    assert b.state == OPEN and not b.available()
    now[0] = 30.0
    assert b.available() and b.state == HALF_OPEN
    b.on_dispatch()
    assert not b.available()  # one probe at a time
    b.record_success()
    assert b.state == CLOSED and b.available() and b.times_ejected == 0


def test_three_internal_errors_open_and_a_success_in_between_resets():
    b, _ = make(consecutive_5xx=3)
    b.record_failure(True, True)
    b.record_failure(True, True)
    b.record_success()
    assert not b.record_failure(True, True)
    b.record_failure(True, True)
    assert b.record_failure(True, True) and b.state == OPEN


def test_failed_probe_ejects_for_longer_up_to_the_cap():
    b, now = make(consecutive_5xx=1, base_eject_s=30, max_eject_s=70)
    b.record_failure(True, True)
    assert b.open_until == 30
    now[0] = 30
    assert b.available()
    b.on_dispatch()
    b.record_failure(True, True)
    assert b.state == OPEN and b.open_until == 30 + 60
    now[0] = 90
    b.available()
    b.on_dispatch()
    b.record_failure(True, True)
    assert b.open_until == 90 + 70  # capped


def test_not_ejected_when_the_pool_may_not_lose_more():
    b, _ = make(consecutive_5xx=1)
    assert not b.record_failure(True, may_eject=False)
    assert b.state == CLOSED and b.available()
