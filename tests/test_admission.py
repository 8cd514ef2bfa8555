"""Admission (pure logic): bounded queues, per-tier limits, weighted shares."""

import pytest

from proxy.serving.admission import Admission, Decision, TierPolicy


def make(capacity=2, weights=(6, 3, 1), max_queue=100, max_concurrent=100):
    names = ["premium", "standard", "batch"]
    adm = Admission([TierPolicy(n, w, max_concurrent, max_queue, 10.0) for n, w in zip(names, weights)],
                    clock=lambda: 0.0)
    adm.set_capacity(capacity, 10_000)
    return adm


def test_admits_up_to_capacity_then_queues_then_rejects():
    adm = make(capacity=2, max_queue=1)
    assert adm.arrive("standard")[0] == Decision.ADMIT
    assert adm.arrive("standard")[0] == Decision.ADMIT
    assert adm.arrive("standard")[0] == Decision.QUEUE
    assert adm.arrive("standard")[0] == Decision.REJECT
    assert adm.arrive("premium")[0] == Decision.QUEUE  # queues are per tier


def test_release_hands_the_slot_to_a_waiter():
    adm = make(capacity=1)
    adm.arrive("batch")
    _, waiter, _ = adm.arrive("batch")
    assert adm.release("batch") == [waiter] and waiter.admitted
    assert adm.active == 1


def test_saturated_tiers_share_by_weight_and_nobody_starves():
    adm = make(capacity=1, max_queue=200)  # every tier's queue holds its arrivals: nobody is pushed out
    adm.arrive("batch")  # holds the only slot
    for _ in range(200):
        for tier in ("premium", "standard", "batch"):
            adm.arrive(tier)
    served = {"premium": 0, "standard": 0, "batch": 0}
    running = "batch"
    for _ in range(100):
        (nxt,) = adm.release(running)
        served[nxt.tier] += 1
        running = nxt.tier
    # 6:3:1 (the batch request that held the slot first already counts against batch's share)
    assert abs(served["premium"] - 60) <= 1 and served["standard"] == 30 and abs(served["batch"] - 10) <= 1


def test_higher_tier_first_when_it_arrives_later():
    adm = make(capacity=1)
    adm.arrive("batch")
    adm.arrive("batch")
    _, premium, _ = adm.arrive("premium")
    assert adm.release("batch") == [premium]


def test_per_tier_concurrency_limit():
    adm = make(capacity=10, max_concurrent=1)
    assert adm.arrive("premium")[0] == Decision.ADMIT
    assert adm.arrive("premium")[0] == Decision.QUEUE
    assert adm.arrive("standard")[0] == Decision.QUEUE  # FIFO across tiers while anyone waits
    admitted = adm.dispatch()
    assert [w.tier for w in admitted] == ["standard"]


def test_abandoned_waiter_leaves_the_queue():
    adm = make(capacity=1)
    adm.arrive("standard")
    _, waiter, _ = adm.arrive("standard")
    adm.abandon(waiter)
    assert adm.queued() == 0 and adm.release("standard") == []


def test_capacity_growth_admits_waiters():
    adm = make(capacity=0)
    waiters = [adm.arrive("standard")[1] for _ in range(3)]
    assert adm.set_capacity(2, 10_000) == waiters[:2]


def test_one_key_flooding_its_tier_does_not_starve_other_keys():
    adm = make(capacity=1)
    adm.arrive("standard", "flooder")
    for _ in range(50):
        adm.arrive("standard", "flooder")
    _, polite, _ = adm.arrive("standard", "polite")
    (nxt,) = adm.release("standard")
    assert nxt is polite  # flooder already used a slot recently; polite has no usage


def test_key_usage_decays_over_time():
    now = [0.0]
    adm = Admission([TierPolicy("t", 1, 10, 10, 10.0)], clock=lambda: now[0], usage_half_life_s=10)
    adm.set_capacity(10, 10_000)
    adm.arrive("t", "k", cost=100)
    assert adm.usage("k") == 100
    now[0] = 10.0
    assert abs(adm.usage("k") - 50) < 1e-9


def test_token_budget_makes_admission_cost_aware():
    adm = make(capacity=10)
    adm.set_capacity(10, 1000)
    assert adm.arrive("standard", "a", cost=900)[0] == Decision.ADMIT
    decision, small, _ = adm.arrive("standard", "b", cost=200)
    assert decision == Decision.QUEUE  # 900 + 200 > 1000 although request slots are free
    assert adm.release("standard", 900) == [small]


def test_request_bigger_than_the_budget_runs_alone():
    adm = make(capacity=10)
    adm.set_capacity(10, 1000)
    assert adm.arrive("premium", "a", cost=5000)[0] == Decision.ADMIT
    assert adm.arrive("premium", "a", cost=1)[0] == Decision.QUEUE


def test_cost_counts_in_tier_shares():
    # Two equal-weight tiers: one sends requests 10x as expensive; slots follow cost, not count.
    adm = Admission([TierPolicy("big", 1, 100, 1000, 10.0), TierPolicy("small", 1, 100, 1000, 10.0)],
                    clock=lambda: 0.0)
    adm.set_capacity(1, 10_000)
    adm.arrive("small", "s", cost=10)
    for _ in range(100):
        adm.arrive("big", "b", cost=100)
        adm.arrive("small", "s", cost=10)
    served = {"big": 0, "small": 0}
    running, cost = "small", 10
    for _ in range(110):
        (nxt,) = adm.release(running, cost)
        served[nxt.tier] += 1
        running, cost = nxt.tier, nxt.cost
    assert served["small"] >= 9 * served["big"]


def test_a_full_higher_tier_pushes_out_the_newest_lowest_tier_waiter():
    adm = make(capacity=1, max_queue=2)
    adm.arrive("premium")  # holds the slot
    _, std, _ = adm.arrive("standard")
    _, old_batch, _ = adm.arrive("batch")
    _, new_batch, _ = adm.arrive("batch")
    adm.arrive("premium")
    adm.arrive("premium")  # premium's queue is now full
    decision, waiter, evicted = adm.arrive("premium")
    assert decision == Decision.QUEUE and evicted == [new_batch] and new_batch.evicted
    assert adm.arrive("premium")[2] == [old_batch]  # the lowest tier goes first...
    assert adm.arrive("premium")[2] == [std]  # ...then the next one up
    assert adm.arrive("premium")[:2] == (Decision.REJECT, None)  # nothing lower is queued
    assert adm.arrive("batch")[0] == Decision.QUEUE  # batch's own queue has room again
    assert adm.queued("premium") == 5 and adm.queued("standard") == 0


def test_a_lower_tier_never_pushes_out_a_higher_one():
    adm = make(capacity=1, max_queue=1)
    adm.arrive("batch")
    adm.arrive("premium")
    adm.arrive("batch")
    assert adm.arrive("batch")[:2] == (Decision.REJECT, None)
    assert adm.queued("premium") == 1


def test_an_arrival_that_would_outwait_its_deadline_is_refused_at_once():
    now = [0.0]
    adm = Admission([TierPolicy("premium", 6, 100, 1000, 10.0), TierPolicy("batch", 1, 100, 1000, 2.0)],
                    clock=lambda: now[0])
    adm.set_capacity(1, 10_000)
    assert adm.finish_rate() is None
    adm.arrive("batch")
    for _ in range(20):  # one request finishes every 0.5 s: 2 per second
        adm.arrive("batch")
        now[0] += 0.5
        adm.release("batch")
    assert adm.finish_rate() == pytest.approx(2.0, rel=0.1)
    for _ in range(3):
        assert adm.arrive("batch")[0] == Decision.QUEUE
    assert adm.queued("batch") == 3
    assert adm.arrive("batch")[0] == Decision.QUEUE  # 4th in line at ~2.1/s: 1.9 s, inside 2 s
    assert adm.arrive("batch")[:2] == (Decision.REJECT, None)  # 5th in line: 2.4 s > 2 s
    assert adm.arrive("premium")[0] == Decision.QUEUE  # premium waits behind no batch request
