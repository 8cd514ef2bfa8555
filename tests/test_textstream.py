from backend.textstream import IncrementalDetokenizer, StopMatcher

# A toy byte-level tokenizer: token i is byte i, so multi-byte characters span several tokens.


def decode(ids):
    return bytes(ids).decode("utf-8", errors="replace")


def push(detok: IncrementalDetokenizer, token_ids) -> str:
    """What the scheduler does per step: append the ids, decode both windows, take the delta."""
    detok.ids.extend(token_ids)
    prefix, full = detok.windows()
    return detok.accept(detok._decode(prefix), detok._decode(full))

def test_detokenizer_holds_back_incomplete_utf8():
    detok = IncrementalDetokenizer(decode)
    out = [push(detok, [b]) for b in "aé€b".encode()]
    assert "".join(out) + detok.flush() == "aé€b"
    assert out[1] == ""  # first byte of 'é' alone is held back


def test_detokenizer_resumes_after_already_sent_tokens():
    already = list("hello ".encode())
    detok = IncrementalDetokenizer(decode, already)
    assert push(detok, list(b"w")) == "w"


def test_stop_matcher_holds_prefixes_and_cuts_at_stop():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)


def test_stop_matcher_releases_false_alarm():
    m = StopMatcher(["END"])
    assert m.push("EN") == ("", False)
    assert m.push("X") == ("ENX", False)
    assert m.flush() == ""


def test_no_stops_passes_through():
    assert StopMatcher([]).push("anything") == ("anything", False)
