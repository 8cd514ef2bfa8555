"""Synchronous unit tests of the pure modules: degradation, key rate limits, the retry budget, the
admission gate and coalescing (driven by asyncio.run, no server), and the engine's batching policy
(a toy engine, no model)."""

import asyncio
import subprocess
import sys

import pytest

from backend.protocol import ChatMessage, Failed, Finished, Generate, SamplingParams, Tokens
from backend.scheduler import BatchEngine
from proxy.config import Tier
from proxy.errors import NoWorkerReady, Overloaded
from proxy.serving.coalesce import Coalescer
from proxy.serving.degrade import Degrader, Load
from proxy.serving.gate import Gate
from proxy.serving.generation import RetryBudget
from proxy.serving.ratelimit import KeyLimits, TokenBucket
from tests.conftest import ROOT


# --- degradation ------------------------------------------------------------------------------
def test_degrader_trips_on_any_threshold_and_recovers_below_all_with_hysteresis():
    d = Degrader(queue_depth=10, utilization=None, expected_wait_s=2.0, recover_ratio=0.5)
    assert not d.update(Load(9, 1.0, 1.9))
    assert d.update(Load(10, 0.0, 0.0))  # queue depth reached
    assert d.update(Load(6, 0.0, 0.0))  # above half the threshold: stays degraded
    assert d.update(Load(4, 0.0, 1.5))  # the wait is still above half its threshold
    assert not d.update(Load(4, 0.0, 0.9))  # all below half: back to the primary pool
    assert d.update(Load(0, 0.0, 2.0))


# --- rate limits ------------------------------------------------------------------------------
def test_token_bucket_waits_refills_and_lets_an_oversized_request_through_when_full():
    now = [0.0]
    bucket = TokenBucket(rate_per_s=2.0, burst=4.0, clock=lambda: now[0])
    assert bucket.take(3) == 0.0
    assert bucket.take(3) == pytest.approx(1.0)  # 1 left, 2 missing at 2/s
    now[0] = 1.0
    assert bucket.take(3) == 0.0
    now[0] = 100.0
    assert bucket.take(10) == 0.0  # bigger than the bucket, but it is full: goes into debt
    assert bucket.take(1) > 0


def test_key_limits_charge_both_buckets_or_neither_and_refund_unused_tokens():
    now = [0.0]
    limits = KeyLimits(rps=1.0, tpm=600, clock=lambda: now[0])  # 10 tokens/s, burst 600
    assert limits.admit(500) == 0.0
    assert limits.admit(50) > 0  # the request bucket is empty
    now[0] = 1.0
    assert limits.admit(200) > 0  # tokens short: the request token is given back...
    assert limits.requests.level == pytest.approx(1.0)
    limits.refund(400)  # ...and the first request used only 100 of its 500
    assert limits.admit(200) == 0.0


# --- retry budget -----------------------------------------------------------------------------
def test_retry_budget_scales_with_active_requests_above_a_minimum():
    active = [0]
    budget = RetryBudget(ratio=0.2, minimum=2, active=lambda: active[0])
    assert budget.try_take() and budget.try_take() and not budget.try_take()
    active[0] = 20  # 20% of 20 = 4
    assert budget.try_take() and budget.try_take() and not budget.try_take()
    budget.give_back()
    assert budget.try_take()


# --- admission gate ---------------------------------------------------------------------------
TIERS = [Tier(name="hi", pool="p", weight=3, max_concurrent=8, max_queue=2, queue_timeout_s=5.0),
         Tier(name="lo", pool="p", weight=1, max_concurrent=8, max_queue=2, queue_timeout_s=0.2)]


def test_gate_admits_queues_wakes_on_release_and_refuses_fast():
    async def scenario():
        gate = Gate(TIERS, ["p"])
        with pytest.raises(NoWorkerReady):  # no capacity pushed yet: no worker ready
            await gate.acquire("p", "hi", "k", 1)
        gate.set_capacity("p", 1, 1000)
        first = await gate.acquire("p", "hi", "k", 1)
        waiting = asyncio.create_task(gate.acquire("p", "hi", "k", 1))
        await asyncio.sleep(0)
        assert gate.queue_depth("p") == 1
        gate.release(first)
        second = await asyncio.wait_for(waiting, 5)
        assert second.queued_s >= 0.0 and gate.queue_depth("p") == 0
        with pytest.raises(Overloaded):  # the low tier's deadline passes while the slot is held
            await gate.acquire("p", "lo", "k", 1)
        gate.set_capacity("p", 2, 1000)  # capacity grew: a waiter is admitted at once
        third = await asyncio.wait_for(gate.acquire("p", "lo", "k", 1), 5)
        for ticket in (second, third, third):  # releasing twice changes nothing
            gate.release(ticket)
        assert gate.admissions["p"].active == 0

    asyncio.run(scenario())


# --- coalescing -------------------------------------------------------------------------------
def test_flight_replays_from_the_start_to_late_joiners_and_is_cancelled_when_all_leave():
    async def scenario():
        coalescer = Coalescer()
        release = asyncio.Event()
        cancelled = asyncio.Event()

        async def run(flight):
            flight.publish([Tokens(id=0, token_ids=[1], text="a")])
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            flight.publish([Finished(id=0, finish_reason="stop", prompt_tokens=1, completion_tokens=2)])

        flight = coalescer.start("k", run)
        coalescer.join(flight)
        coalescer.join(flight)
        assert coalescer.get("k") is flight
        early = flight.follow(keepalive_s=5)
        assert (await early.__anext__())[0].text == "a"
        release.set()
        late = [f async for batch in flight.follow(keepalive_s=5) for f in batch]
        assert [type(f) for f in late] == [Tokens, Finished]
        assert coalescer.get("k") is None  # a finished flight takes no new joiners

        # A flight everyone left is cancelled.
        release.clear()
        other = coalescer.start("k2", run)
        coalescer.join(other)
        await asyncio.sleep(0)
        coalescer.leave(other)
        await asyncio.wait_for(cancelled.wait(), 5)
        await coalescer.close()

    asyncio.run(scenario())


# --- the engine's batching policy (toy engine: token = position, EOS = 99) ---------------------
class ToyEngine(BatchEngine):
    def __init__(self, max_batch_size=2, context_length=16):
        super().__init__(max_batch_size, context_length, eos_ids=[99])
        self.frames = []
        self.emit = self.frames.extend

    def encode(self, req):
        return [1] * len(req.messages[0].content)

    def detokenize(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def prefill(self, seqs):
        return [len(s.generated) for s in seqs]

    def decode(self, seqs):
        return [99 if s.req.params.stop == ["eos"] and len(s.generated) == 2 else len(s.generated) for s in seqs]


def gen(rid, prompt="hi", max_tokens=3, stop=()):
    return Generate(id=rid, params=SamplingParams(max_tokens=max_tokens, stop=list(stop)),
                    messages=[ChatMessage("user", prompt)])


def finished(engine):
    return {f.id: f for f in engine.frames if isinstance(f, (Finished, Failed))}


def test_batch_is_bounded_and_waiting_requests_join_as_others_finish():
    engine = ToyEngine(max_batch_size=2)
    for rid in (1, 2, 3):
        engine.submit(gen(rid))
    engine.step()
    assert engine.load == (2, 1)
    while len(finished(engine)) < 3:
        engine.step()
    done = finished(engine)
    assert all(done[r].finish_reason == "length" and done[r].completion_tokens == 3 for r in (1, 2, 3))
    assert engine.load == (0, 0)


def test_cancel_eos_and_context_limit():
    engine = ToyEngine(max_batch_size=4, context_length=12)
    engine.submit(gen(1, max_tokens=5))
    engine.submit(gen(2, prompt="x" * 10, max_tokens=5))  # 10 + 5 > 12: refused
    engine.submit(gen(3, max_tokens=9, stop=["eos"]))  # the toy emits EOS as its third token
    engine.step()
    engine.cancel(1)
    for _ in range(5):
        engine.step()
    done = finished(engine)
    assert 1 not in done  # cancelled: no more frames
    assert done[2].code == "invalid_request" and "maximum context length" in done[2].message
    assert done[3].finish_reason == "stop" and done[3].completion_tokens == 3


def test_settling_the_heap_freezes_what_exists_and_collects_the_young_less_often():
    code = ("import gc; from backend.heap import settle_the_heap, GC_YOUNG_THRESHOLD; "
            "before = gc.get_threshold(); settle_the_heap(); after = gc.get_threshold(); "
            "assert gc.get_freeze_count() > 1000, gc.get_freeze_count(); "
            "assert after == (GC_YOUNG_THRESHOLD, before[1], before[2]), (before, after); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr
