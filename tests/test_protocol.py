import msgspec
import pytest

from backend import protocol
from backend.protocol import (Cancel, ChatMessage, Fatal, Finished, Generate, Heartbeat, Ready, SamplingParams,
                              Tokens)


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
