"""The continuous-batching loop's admission policy (backend/scheduler.py), on the fake engine
stepped in this process (no model: the policy is the engine's, not the model's)."""

import time

from backend.fake import FakeEngine
from backend.protocol import Generate, SamplingParams, WorkerSettings


def fake_engine(prefill_wait_ms: float, slots: int = 8, token_ms: float = 0.0) -> FakeEngine:
    engine = FakeEngine(WorkerSettings(engine="fake", model_name="fake", max_batch_size=slots, fake_token_latency_ms=token_ms,
                                       fake_output_tokens=10_000, fake_context_length=100_000,
                                       prefill_wait_ms=prefill_wait_ms))
    engine.emit = lambda frames: None
    return engine


def arrive(engine: FakeEngine, *ids: int) -> None:
    for i in ids:
        engine.submit(Generate(id=i, prompt=f"request {i}", params=SamplingParams(max_tokens=90_000, ignore_eos=True)))


def test_arrivals_wait_for_company_while_rows_decode():
    """With prefill_wait_ms, an arrival joins the running batch when enough others have come to be
    prefilled with it, when they fill the free slots, or once it has waited that long - and at
    once when nothing is running."""
    engine = fake_engine(prefill_wait_ms=60_000)  # longer than the test: only company admits here
    engine.admit_together = 3
    arrive(engine, 1)
    engine.step()
    assert engine.load == (1, 0)  # nothing was running: admitted at once
    arrive(engine, 2)
    engine.step()
    arrive(engine, 3)
    engine.step()
    assert engine.load == (1, 2)  # two waiting, three wanted: they wait, decoding goes on
    arrive(engine, 4)
    engine.step()
    assert engine.load == (4, 0)  # three together
    engine.admit_together = 16
    arrive(engine, 5, 6, 7, 8)  # fill the four free slots
    engine.step()
    assert engine.load == (8, 0)


def test_a_lone_arrival_is_admitted_after_the_wait():
    # a decode step of 1 ms: the first request cannot run out of tokens while the second waits
    engine = fake_engine(prefill_wait_ms=500, token_ms=1.0)
    arrive(engine, 1)
    engine.step()
    arrived = time.monotonic()
    arrive(engine, 2)
    engine.step()
    assert engine.load == (1, 1)
    deadline = arrived + 30
    while engine.load[1]:
        assert time.monotonic() < deadline, "the lone arrival was never admitted"
        engine.step()
    assert time.monotonic() - arrived >= 0.5
    assert engine.load == (2, 0)  # the first one still decoding: the wait, not an idle batch, admitted it


def test_without_a_wait_every_arrival_is_admitted_at_the_next_step():
    engine = fake_engine(prefill_wait_ms=0)
    arrive(engine, 1)
    engine.step()
    arrive(engine, 2)
    engine.step()
    assert engine.load == (2, 0)
