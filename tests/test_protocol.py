import msgspec
import pytest

from backend import protocol
from backend.protocol import (Cancel, ChatMessage, Failed, Fatal, Finished, Generate, Heartbeat, Ready,
                              SamplingParams, TokenBatch, TokenLogprob, Tokens)


def test_round_trip_both_directions_split_at_every_byte():
    to_worker = [Generate(id=1, params=SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"]),
                          messages=[ChatMessage("user", "héllo")]),
                 Generate(id=2, params=SamplingParams(seed=7), prompt="abc", resume_token_ids=[1, 2]),
                 Cancel(id=1)]
    data = protocol.encode_many(to_worker)
    decoder = protocol.worker_decoder()
    got = []
    for i in range(len(data)):  # one byte at a time: frames split anywhere still decode
        got += decoder.feed(data[i:i + 1])
    assert got == to_worker

    from_worker = [Ready(pid=1, model="m", device="cpu", engine="fake", max_batch_size=4, context_length=99),
                   Heartbeat(running=2), Tokens(id=1, token_ids=[5], text="x"),
                   Finished(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1),
                   Fatal(message="boom", at_boot=True)]
    assert protocol.proxy_decoder().feed(protocol.encode_many(from_worker)) == from_worker


def test_a_steps_plain_tokens_travel_as_one_batch_and_every_request_keeps_its_order():
    with_logprobs = Tokens(id=4, token_ids=[9], text="z", logprobs=[TokenLogprob(token=b"z", logprob=-0.5)])
    step = [Tokens(id=1, token_ids=[5], text="a"), with_logprobs, Tokens(id=2, token_ids=[6, 7], text="bc"),
            Finished(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1),
            Tokens(id=3, token_ids=[8], text=""), Failed(id=2, code="internal", message="x")]
    wire = protocol.proxy_decoder().feed(protocol.encode_many(protocol.batch_tokens(step)))
    assert wire == [TokenBatch(ids=[1, 2, 3], token_ids=[[5], [6, 7], [8]], texts=["a", "bc", ""]), with_logprobs,
                    Finished(id=1, finish_reason="stop", prompt_tokens=3, completion_tokens=1),
                    Failed(id=2, code="internal", message="x")]

    def per_request(frames):
        out = {}
        for f in frames:
            if isinstance(f, TokenBatch):
                for rid, ids, text in zip(f.ids, f.token_ids, f.texts):
                    out.setdefault(rid, []).append(Tokens(id=rid, token_ids=ids, text=text))
            else:
                out.setdefault(f.id, []).append(f)
        return out
    assert per_request(wire) == per_request(step)
    assert protocol.batch_tokens([with_logprobs]) == [with_logprobs]  # nothing to gather
    assert protocol.batch_tokens([]) == []


def test_direction_is_typed():
    with pytest.raises(protocol.FrameError):
        protocol.worker_decoder().feed(protocol.encode(Heartbeat()))


def test_oversized_frame_is_refused_before_buffering():
    header = (protocol.MAX_FRAME_BYTES + 1).to_bytes(4, "big")
    with pytest.raises(protocol.FrameError):
        protocol.proxy_decoder().feed(header)


def test_worker_settings_forbid_unknown_fields():
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"engine":"fake","model_name":"m","bogus":1}', type=protocol.WorkerSettings)
