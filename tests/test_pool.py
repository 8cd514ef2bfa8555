"""PoolState (pure): outlier ejection never takes more than half a pool, the least-bad worker is
still tried, and a worker ejected again and again is sent for a restart."""

from backend.protocol import Ready
from proxy.fleet.breaker import Breaker, BreakerPolicy
from proxy.fleet.pool import Outcome, PoolState, Replica


def make_pool(n, **policy):
    now = [0.0]
    pools = PoolState(clock=lambda: now[0], restart_after_ejections=2)
    for i in range(n):
        w = Replica(f"p-{i}", "p", "m", "cpu", 10, breaker=Breaker(BreakerPolicy(jitter=0.0, **policy), lambda: now[0]))
        pools.add(w)
        pools.starting(w, 100 + i, conn=None)
        pools.became_ready(w, Ready(pid=1, model="m", device="cpu", engine="fake", max_batch_size=1, context_length=9))
    return pools, now


def fail(pools, worker, outcome=Outcome.INTERNAL, times=1):
    """The verdicts PoolState returned (an Ejection or None per failure)."""
    verdicts = []
    for _ in range(times):
        epoch = pools.acquire(worker, 1)
        verdicts.append(pools.release(worker, epoch, 1, outcome))
    return verdicts


def test_never_more_than_half_the_pool_is_ejected():
    pools, _ = make_pool(4, consecutive_5xx=1)
    for w in pools.workers.values():
        fail(pools, w)
    assert sum(w.breaker.ejected for w in pools.workers.values()) == 2


def test_ejected_worker_gets_no_traffic_until_its_probe():
    pools, now = make_pool(2, consecutive_5xx=1, base_eject_s=30)
    bad = pools.workers["p-0"]
    fail(pools, bad)
    assert {pools.pick("p").id for _ in range(20)} == {"p-1"}
    now[0] = 31
    picks = [pools.pick("p").id for _ in range(20)]
    assert picks.count("p-0") == 1  # one probe while half-open


def test_least_bad_worker_is_tried_when_all_are_ejected():
    pools, now = make_pool(2, consecutive_5xx=1, base_eject_s=30)
    pools.workers["p-0"].breaker.record_failure(True, True)
    now[0] = 5
    pools.workers["p-1"].breaker.record_failure(True, True)
    assert pools.pick("p").id == "p-0"  # its ejection ends first


def test_repeatedly_ejected_worker_is_sent_for_restart():
    pools, now = make_pool(2, consecutive_5xx=1, base_eject_s=1)
    w = pools.workers["p-0"]
    (first,) = fail(pools, w)
    assert first.replica is w and not first.restart
    now[0] = 10
    w.breaker.available()
    (second,) = fail(pools, w)
    assert second.replica is w and second.restart


def test_connection_errors_need_five_in_a_row():
    pools, _ = make_pool(2)
    w = pools.workers["p-0"]
    fail(pools, w, Outcome.GONE, times=4)
    assert not w.breaker.ejected
    fail(pools, w, Outcome.GONE)
    assert w.breaker.ejected


def test_slow_start_ramps_a_new_worker_and_a_reload_can_switch_it_off():
    now = [100.0]
    pools = PoolState(clock=lambda: now[0], slow_start_s=10.0)
    for i in range(2):
        w = Replica(f"p-{i}", "p", "m", "cpu", 10, breaker=Breaker(BreakerPolicy(jitter=0.0), lambda: now[0]))
        pools.add(w)
        pools.starting(w, 100 + i, conn=None)
        pools.became_ready(w, Ready(pid=1, model="m", device="cpu", engine="fake", max_batch_size=1, context_length=9))
    old, new = pools.workers["p-0"], pools.workers["p-1"]
    old.ready_since = 0.0  # ready long ago; p-1 just now
    pools.pick("p")
    assert old.weight == 1.0 and new.weight < 0.2
    now[0] += 5.0
    pools.pick("p")
    assert 0.5 < new.weight < 0.6  # 10% + 90% of half the ramp
    pools.reconfigure(slow_start_s=0.0, restart_after_ejections=3)
    assert new.weight == 1.0 and pools.restart_after_ejections == 3
    pools.pick("p")
    assert new.weight == 1.0
