"""The transformers engine on the tiny random model, driven step by step in this process."""

import pytest

torch = pytest.importorskip("torch")

from backend.engine import BootError, TransformersEngine  # noqa: E402
from backend.scheduler import RequestError  # noqa: E402
from backend.protocol import ChatMessage, Failed, Finished, Generate, SamplingParams, Tokens, WorkerSettings  # noqa: E402


@pytest.fixture(scope="module")
def engine(tiny_model):
    return TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                             max_batch_size=4))


def run(engine, requests, cancel_after=None, max_steps=2000):
    """Submit requests, step until all end. Returns {id: (token ids, text, end frame)}."""
    frames = []
    engine.emit = frames.extend
    for r in requests:
        engine.submit(r)
    results = {r.id: ([], [], None) for r in requests}
    open_ids = set(results)
    for _ in range(max_steps):
        if not open_ids:
            break
        engine.step()
        for f in frames:
            ids, text, _ = results[f.id]
            if isinstance(f, Tokens):
                ids.extend(f.token_ids)
                text.append(f.text)
                if cancel_after and f.id in cancel_after and len(ids) == cancel_after[f.id]:
                    engine.cancel(f.id)
                    open_ids.discard(f.id)
            else:
                results[f.id] = (ids, text, f)
                open_ids.discard(f.id)
        frames.clear()
    assert not open_ids, "requests never finished"
    return {k: (ids, "".join(text), end) for k, (ids, text, end) in results.items()}


PROMPTS = ["Hello there", "What is the capital of France? Answer in one word.", "1 2 3 4 5 6 7 8 9 10 11 12",
           "Tell me a story about a dragon who"]


def hf_greedy(engine, prompt, n):
    ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
    out = engine.model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def test_greedy_matches_hf_generate_with_joins_and_leaves(engine):
    # Different lengths and max_tokens: rows join the running batch (prefill merged) and leave it
    # (rows dropped) while the others continue; the output must not notice.
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    reqs.append(Generate(id=99, prompt="A late arrival", params=SamplingParams(max_tokens=9, temperature=0.0,
                                                                               ignore_eos=True)))
    got = run(engine, reqs)
    for r in reqs:
        ids, _, end = got[r.id]
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


def test_padded_prefill_matches_hf_generate_with_joins_and_leaves(tiny_model):
    """Small prefills padded to (rows, width) buckets - as captured graphs on CUDA, eagerly here:
    filler rows (3 prompts in a bucket of 4 rows, more than the engine's 3 slots) write only the
    scratch slot, and each prompt's padding only its own slot past the prompt, where decode steps
    write before they read; rows joining and leaving still give HF generate's greedy output."""
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               max_batch_size=3), padded_prefill=True)
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 5 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    reqs.append(Generate(id=99, prompt="A late arrival", params=SamplingParams(max_tokens=9, temperature=0.0,
                                                                               ignore_eos=True)))
    got = run(engine, reqs)
    assert (4, 32) in engine._prefill_graphs  # three prompts together, padded to four rows
    for r in reqs:
        ids, _, end = got[r.id]
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
    assert engine.load == (0, 0) and sorted(engine._free) == [0, 1, 2]


def test_padded_prefill_writes_what_the_plain_prefill_writes_and_nothing_else(tiny_model):
    """A running sequence in slot 0, then three prompts prefilled together in a bucket of four
    rows: every prompt's keys and values are the plain prefill's, and the filler row touched no
    slot a sequence owns (it writes the scratch slot)."""
    def prefilled(padded: bool):
        engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny",
                                                   model_path=str(tiny_model), max_batch_size=4),
                                    padded_prefill=padded)
        first = engine._start(Generate(id=0, prompt=PROMPTS[3], params=SamplingParams(max_tokens=2)))
        group = [engine._start(Generate(id=1 + i, prompt=p, params=SamplingParams(max_tokens=2)))
                 for i, p in enumerate(PROMPTS[:3])]
        with torch.inference_mode():
            engine.prefill([first])
            engine.prefill(group)
        return engine, [first] + group

    padded, seqs = prefilled(True)
    plain, plain_seqs = prefilled(False)
    assert (4, 32) in padded._prefill_graphs
    for s, p in zip(seqs, plain_seqs):
        assert s.slot == p.slot
        n = len(s.all_ids)
        for layer in range(len(padded.k)):
            for ours, theirs in ((padded.k, plain.k), (padded.v, plain.v)):
                assert torch.allclose(ours[layer][s.slot, :, :n], theirs[layer][p.slot, :, :n], atol=1e-5)


def test_prompts_encoded_together_are_encoded_as_one_by_one(engine, monkeypatch):
    """Admission tokenizes arriving prompts in one call (plain prompts together, conversations
    without tools through the batched chat template); the ids are what encoding each alone gives,
    and a conversation the template refuses fails alone."""
    def chat(*contents, system=None):
        messages = [ChatMessage("system", system)] if system else []
        roles = ("user", "assistant")
        return messages + [ChatMessage(roles[i % 2], c) for i, c in enumerate(contents)]

    reqs = [Generate(id=1, prompt="Hello there", params=SamplingParams()),
            Generate(id=2, prompt="", params=SamplingParams()),
            Generate(id=3, messages=chat("hi"), params=SamplingParams()),
            Generate(id=4, messages=chat("Ünïcödé ✓ 你好 🙂", "an answer", "and a follow-up"), params=SamplingParams()),
            Generate(id=5, prompt=" word" * 100, params=SamplingParams()),
            Generate(id=6, messages=chat("weather?", system="Be brief."), params=SamplingParams()),
            Generate(id=7, messages=chat("call a tool"), params=SamplingParams(),
                     tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])]
    one_by_one = [engine.encode(r) for r in reqs]
    alone = []
    encode = engine.encode
    monkeypatch.setattr(engine, "encode", lambda req, **kw: alone.append(req.id) or encode(req, **kw))
    assert engine.encode_many(reqs) == one_by_one
    assert alone == [7]  # only the request with tools was encoded alone
    template = engine.tokenizer.chat_template
    monkeypatch.setattr(engine.tokenizer, "chat_template",
                        "{% for m in messages %}{% if m['content'] == 'bad' %}{{ raise_exception('no') }}{% endif %}"
                        "{% endfor %}" + template)
    mixed = [reqs[2], Generate(id=8, messages=chat("bad"), params=SamplingParams()), reqs[5]]
    got = engine.encode_many(mixed)
    assert got[0] == engine.encode(reqs[2]) and got[2] == engine.encode(reqs[5])
    assert isinstance(got[1], RequestError) and got[1].param == "messages"


def test_more_requests_than_batch_size_all_complete(engine):
    reqs = [Generate(id=i, prompt=f"count {i}", params=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
            for i in range(10)]
    got = run(engine, reqs)
    assert all(len(got[i][0]) == 5 for i in range(10))


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    def sample(seed):
        r = Generate(id=seed, prompt="Once upon a time",
                     params=SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed, ignore_eos=True))
        return run(engine, [r])[seed][0]
    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_sampled_rows_upload_their_parameters_through_pinned_memory(engine, monkeypatch):
    """On CUDA host values go to the device from pinned memory; the sampler's per-row parameters
    are a numpy array, which torch.tensor(..., pin_memory=True) refuses - that crashed every worker
    serving a sampled request on the GPU. Here pinning is stood in for (the CPU has no pinned
    allocator), so the sampler's upload runs the path the GPU runs."""
    from types import SimpleNamespace

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self)
    monkeypatch.setattr(engine, "_pinned", True)
    rows = [SimpleNamespace(params=SamplingParams(temperature=t, top_p=p), seed=seed, generated=[])
            for seed, (t, p) in enumerate([(0.7, 1.0), (1.0, 0.9), (0.0, 1.0)])]
    logits = torch.randn(3, engine.vocab_size)
    chosen = engine._sample_on_device(logits, rows, 0)
    assert pinned == [(3, 3)]  # temperatures, top-p values and uniforms, one pinned upload
    assert chosen.shape == (3,) and chosen[2] == logits[2].argmax()  # temperature 0: the argmax


def test_stop_sequence_cuts_text_and_reports_stop(engine):
    r = Generate(id=1, prompt="x", params=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    full = run(engine, [r])[1][1]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    r2 = Generate(id=2, prompt="x", params=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    _, text, end = run(engine, [r2])[2]
    assert end.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_cancel_frees_the_row_mid_generation(engine):
    reqs = [Generate(id=i, prompt="abc", params=SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
            for i in (1, 2)]
    got = run(engine, reqs, cancel_after={1: 3})
    assert len(got[1][0]) == 3 and got[1][2] is None
    assert len(got[2][0]) == 50
    assert engine.load == (0, 0) and sorted(engine._free) == list(range(engine.max_batch_size))


def test_chat_template_is_applied(engine):
    r = Generate(id=1, messages=[ChatMessage("user", "hi")], params=SamplingParams(max_tokens=2, temperature=0.0))
    end = run(engine, [r])[1][2]
    assert isinstance(end, Finished)
    expected = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                    tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]
    assert end.prompt_tokens == len(expected)


def test_request_beyond_context_is_refused_not_fatal(engine):
    r = Generate(id=1, prompt="word " * 300, params=SamplingParams(max_tokens=10))
    _, _, end = run(engine, [r])[1]
    assert isinstance(end, Failed) and end.code == "invalid_request" and "maximum context length" in end.message
    ok = run(engine, [Generate(id=2, prompt="hi", params=SamplingParams(max_tokens=2, temperature=0.0))])[2][2]
    assert isinstance(ok, Finished)


def test_resume_continues_token_exact(engine):
    p = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full_ids, full_text, _ = run(engine, [Generate(id=1, prompt="resume me", params=p)])[1]
    ids, text, end = run(engine, [Generate(id=2, prompt="resume me", params=p, resume_token_ids=full_ids[:8])])[2]
    assert full_ids[:8] + ids == full_ids
    assert end.completion_tokens == 20


def test_seeded_resume_continues_exactly(engine):
    p = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    full_ids = run(engine, [Generate(id=1, prompt="sample me", params=p)])[1][0]
    ids = run(engine, [Generate(id=2, prompt="sample me", params=p, resume_token_ids=full_ids[:6])])[2][0]
    assert full_ids[:6] + ids == full_ids


def test_tampered_model_is_refused_naming_the_file(tiny_model, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    with open(bad / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(BootError, match="config.json"):
        TransformersEngine(WorkerSettings(engine="transformers", model_name="t", model_path=str(bad)))


def test_pipelined_steps_match_hf_generate(engine, monkeypatch):
    """The next step is launched from the device's tokens before the host has them (pipelining);
    the output must still be HF's, with a row leaving mid-batch (EOS is not ignored for it) and a
    sampled row in the same batch."""
    launched = []
    original = engine.launch_next

    def counting(step, seqs):
        nxt = original(step, seqs)
        launched.append(nxt is not None)
        return nxt

    monkeypatch.setattr(engine, "launch_next", counting)
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:2])]
    reqs.append(Generate(id=7, prompt=PROMPTS[2], params=SamplingParams(max_tokens=12, temperature=0.8, seed=5)))
    out = run(engine, reqs)
    assert sum(launched) >= 5  # most steps were pipelined
    for i, p in enumerate(PROMPTS[:2]):
        assert out[i][0] == hf_greedy(engine, p, 12)
    monkeypatch.setattr(engine, "launch_next", lambda step, seqs: None)  # the same sampled row, unpipelined
    again = run(engine, [Generate(id=7, prompt=PROMPTS[2], params=SamplingParams(max_tokens=12, temperature=0.8,
                                                                                   seed=5))])
    assert again[7][0] == out[7][0]


def test_rows_ending_by_length_leave_the_pipeline_without_stopping_it(engine, monkeypatch):
    """Rows that reach max_tokens at different steps (any steady load) are left out of the next
    pipelined step instead of stopping the pipeline for every row: after the first step no step
    is launched from the host, and greedy output is still HF's."""
    fresh = []
    original = engine.launch

    def counting(seqs):
        fresh.append(len(seqs))
        return original(seqs)

    monkeypatch.setattr(engine, "launch", counting)
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=4 + 5 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:3])]
    got = run(engine, reqs)
    assert fresh == [3]  # the first step only; unpipelined, each row's end would launch another
    for r in reqs:
        ids, _, end = got[r.id]
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


@pytest.fixture
def beside_engine(tiny_model):
    """An engine that prefills arrivals beside the running rows' decode steps (on CUDA a second
    stream; here the same bookkeeping on one), with its prefill_beside handles and the steps that
    took joining rows on the device counted."""
    engine = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                               max_batch_size=3), padded_prefill=True)
    engine.overlap_prefill = True
    engine.beside, engine.joined = [], []
    prefill_beside, launch_next = engine.prefill_beside, engine.launch_next

    def counting_prefill(seqs):
        handle = prefill_beside(seqs)
        engine.beside.append(handle)
        return handle

    def counting_launch(step, seqs, joining=None):
        nxt = launch_next(step, seqs, joining=joining)
        if joining is not None and nxt is not None:
            engine.joined.append([s.id for s in joining.seqs])
        return nxt

    engine.prefill_beside, engine.launch_next = counting_prefill, counting_launch
    return engine


def test_arrivals_prefilled_beside_the_running_rows_match_hf_generate(beside_engine):
    """Arrivals admitted while a pipelined step is in flight are prefilled beside it and join the
    batch on the device at the next step: greedy rows still give HF generate's tokens, a seeded
    sampled row the tokens it gives alone, and every slot comes back."""
    engine = beside_engine
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=5 + 4 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    reqs.append(Generate(id=99, prompt="A late arrival", params=SamplingParams(max_tokens=9, temperature=0.0,
                                                                               ignore_eos=True)))
    sampled = Generate(id=7, prompt=PROMPTS[2], params=SamplingParams(max_tokens=10, temperature=0.8, seed=5,
                                                                       ignore_eos=True))
    got = run(engine, reqs + [sampled])
    assert any(h is not None for h in engine.beside) and engine.joined  # joined on the device at least once
    for r in reqs:
        ids, _, end = got[r.id]
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
    engine.overlap_prefill = False
    alone = run(engine, [sampled])
    assert alone[7][0] == got[7][0]
    assert engine.load == (0, 0) and sorted(engine._free) == [0, 1, 2]


def test_an_arrival_cancelled_while_prefilled_beside_never_joins(beside_engine):
    engine = beside_engine
    frames = []
    engine.emit = frames.extend
    for i in range(2):
        engine.submit(Generate(id=i, prompt=PROMPTS[i], params=SamplingParams(max_tokens=12, temperature=0.0,
                                                                              ignore_eos=True)))
    for _ in range(3):
        engine.step()  # both running, a pipelined step in flight
    engine.submit(Generate(id=5, prompt=PROMPTS[3], params=SamplingParams(max_tokens=12, temperature=0.0)))
    engine.step()
    assert engine._joining is not None and [s.id for s in engine._joining.seqs] == [5]
    engine.cancel(5)
    frames.clear()
    for _ in range(40):
        if not engine._running and engine._inflight is None and engine._joining is None:
            break
        engine.step()
    assert not [f for f in frames if f.id == 5]  # nothing of it went out
    ends = [f for f in frames if isinstance(f, Finished)]
    assert sorted(f.id for f in ends) == [0, 1] and all(f.completion_tokens == 12 for f in ends)
    assert engine.load == (0, 0) and sorted(engine._free) == [0, 1, 2]


def test_a_group_prefilled_beside_is_no_larger_than_one_prefill_graph(beside_engine):
    """More arrivals than one prefill graph takes (admit_together; 16 on CUDA) are admitted beside
    the decode steps a graph's worth at a time - a larger group would fall back to an eager
    prefill that stalls every stream - and all of them still finish as HF generate does."""
    engine = beside_engine
    engine.admit_together = 1
    first = Generate(id=0, prompt=PROMPTS[0], params=SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True))
    later = [Generate(id=1 + i, prompt=p, params=SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
             for i, p in enumerate(PROMPTS[1:3])]
    frames = []
    engine.emit = frames.extend
    engine.submit(first)
    for _ in range(3):
        engine.step()  # running, a pipelined step in flight
    for r in later:
        engine.submit(r)
    groups = []
    for _ in range(60):
        if sum(isinstance(f, Finished) for f in frames) == 3:
            break
        engine.step()
        if engine._joining is not None and (not groups or groups[-1] is not engine._joining):
            groups.append(engine._joining)
    assert [len(g.seqs) for g in groups] == [1, 1]
    for r in [first] + later:
        ids = [t for f in frames if isinstance(f, Tokens) and f.id == r.id for t in f.token_ids]
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


def test_constrained_rows_batch_with_free_rows(engine):
    """Grammar rows (JSON schema) and unconstrained rows in one batch: every constrained answer
    parses and validates even on random weights, and the free rows decode exactly as alone."""
    import json

    import jsonschema
    import llguidance

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["a", "b", "c"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema),
                                                            overrides={"whitespace_flexible": False})
    free = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS[:2])]
    constrained = [Generate(id=10 + i, prompt=p, params=SamplingParams(max_tokens=40, temperature=0.9, seed=i,
                                                                       grammar=grammar))
                   for i, p in enumerate(PROMPTS[:2])]
    mixed = run(engine, free + constrained)
    for r in constrained:
        ids, text, end = mixed[r.id]
        assert end.finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)
    for r in free:
        assert mixed[r.id][0] == run(engine, [r])[r.id][0]


def test_chunked_prefill_matches_hf_generate_with_joins_leaves_and_resume(engine, monkeypatch):
    """Prompts prefilled a few tokens per step (chunked prefill), between the running rows' decode
    steps (pipelined where rows allow), with rows joining and leaving: greedy output is still HF's,
    and a resumed generation continues token-exact."""
    chunks = []
    original = engine.prefill_chunk

    def counting(seq, start, end):
        chunks.append((seq.id, start, end))
        return original(seq, start, end)

    monkeypatch.setattr(engine, "prefill_chunk", counting)
    monkeypatch.setattr(engine, "prefill_budget", 5)
    long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=6 + 4 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS + [long_prompt])]
    got = run(engine, reqs)
    for r in reqs:
        ids, _, end = got[r.id]
        assert isinstance(end, Finished) and end.finish_reason == "length"
        assert ids == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt
    long_chunks = [c for c in chunks if c[0] == len(PROMPTS)]
    assert len(long_chunks) >= 3 and long_chunks[0][1] == 0  # split over several steps, in order
    assert all(a[2] == b[1] for a, b in zip(long_chunks, long_chunks[1:]))
    # a resumed generation: prompt + the tokens already sent are prefilled in chunks too
    full = hf_greedy(engine, long_prompt, 12)
    resumed = run(engine, [Generate(id=50, prompt=long_prompt, resume_token_ids=full[:5],
                                    params=SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))])
    assert full[:5] + resumed[50][0] == full


def test_cancel_while_a_prompt_is_half_prefilled_frees_its_row(engine, monkeypatch):
    monkeypatch.setattr(engine, "prefill_budget", 3)
    free_before = len(engine._free)
    frames = []
    engine.emit = frames.extend
    engine.submit(Generate(id=60, prompt="a b c d e f g h i j k l m n o p",
                           params=SamplingParams(max_tokens=4, temperature=0.0)))
    engine.step()
    engine.step()
    assert engine._prefilling and engine._prefilling[0].prefilled > 0
    engine.cancel(60)
    engine.step()
    assert not engine._prefilling and len(engine._free) == free_before and not frames


@pytest.fixture
def counted_fused(engine, monkeypatch):
    """The engine's fused pieces through a backend that runs the traced graphs as they are and
    counts each compilation and each call of compiled code: (the FusedPieces, the list of compiled
    graphs, the list of calls)."""
    from backend.fused import FusedPieces

    compiled, calls = [], []

    def counting_backend(graph_module, example_inputs):
        compiled.append(graph_module)

        def run(*args):
            calls.append(graph_module)
            return graph_module.forward(*args)
        return run

    fused = FusedPieces(engine.model, backend=counting_backend)
    monkeypatch.setattr(engine, "fused", fused)
    return fused, compiled, calls


def test_fused_pieces_still_match_hf_generate_and_can_be_put_back(engine, counted_fused):
    """The decode step's fused pieces (backend/fused.py: RMSNorm, the MLP, the rotary embedding
    through torch.compile; on the GPU with inductor, here with a backend that runs the traced
    graphs as they are): every matching module is swapped, each piece compiles whole, rows join
    and leave with greedy output still HF's, and restore leaves transformers' own forwards."""
    fused, compiled, _ = counted_fused
    layers = engine.model.config.num_hidden_layers
    reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=5 + 4 * i, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(PROMPTS)]
    try:
        assert fused.apply() == 2 * layers + 1 + layers  # two norms and an MLP per layer, the final norm
        assert fused.rotary_swapped
        got = run(engine, reqs)
    finally:
        fused.restore()
    assert len(compiled) >= 3  # the norm, the MLP and the rotary embedding each ran compiled
    assert not any("forward" in vars(m) for m in engine.model.modules())
    import transformers.models.llama.modeling_llama as llama
    assert llama.apply_rotary_pos_emb is not fused._compiled[2]
    for r in reqs:
        assert got[r.id][0] == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


def test_after_warm_up_the_fused_pieces_compile_nothing_more(engine, counted_fused):
    """Warm-up compiles the fused pieces for what serving runs (one row and several, prompts and
    single positions, in inference mode); afterwards a shape it did not see runs uncompiled
    rather than stalling every running stream while inductor compiles it."""
    fused, compiled, calls = counted_fused
    layers = engine.model.config.num_hidden_layers
    fused.apply()
    try:
        engine.warm_up()
        after_warm_up = len(compiled)
        assert after_warm_up >= 3
        # A batch of prompts of several lengths prefilled together runs every piece compiled:
        # two norms, the MLP and the rotary embedding per layer, and the final norm.
        del calls[:]
        probe = [engine._start(Generate(id=100 + i, prompt=p, params=SamplingParams(max_tokens=2)))
                 for i, p in enumerate(PROMPTS)]
        with torch.inference_mode():
            engine.prefill(probe)
        engine.release(probe)
        assert len(calls) == 4 * layers + 1
        reqs = [Generate(id=i, prompt=p, params=SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(PROMPTS)]
        got = run(engine, reqs)  # several rows decoding together: a shape the CPU warm-up never ran
        assert len(compiled) == after_warm_up
    finally:
        torch.compiler.set_stance("default")
        fused.restore()
    for r in reqs:
        assert got[r.id][0] == hf_greedy(engine, r.prompt, r.params.max_tokens), r.prompt


def test_a_one_slot_engine_warms_up_with_the_fused_pieces(tiny_model):
    """Warm-up compiles a several-row prefill - with one KV slot there is only room for one."""
    from backend.fused import FusedPieces

    one = TransformersEngine(WorkerSettings(engine="transformers", model_name="tiny", model_path=str(tiny_model),
                                            max_batch_size=1))
    one.fused = FusedPieces(one.model, backend=lambda graph_module, example_inputs: graph_module.forward)
    one.fused.apply()
    try:
        one.warm_up()
    finally:
        torch.compiler.set_stance("default")
        one.fused.restore()
    assert one.load == (0, 0) and one._free == [0]


def test_batched_detokenisation_gives_transformers_text(engine):
    """The scheduler's batched detokenisation goes to the tokenizers library in one call; its text
    must be what transformers' batch_decode gives: multi-byte characters cut mid-sequence, special
    and added tokens (skipped), arbitrary ids."""
    import random

    tok = engine.tokenizer
    assert engine._decode_batch is not tok.batch_decode  # the Rust batch call is in use
    ids = tok("Plain words, then Ünïcödé ✓ 你好 世界 🙂 and a tab\tand newlines\n\n  spaced").input_ids
    windows = [ids[i:i + n] for i in range(len(ids)) for n in (1, 3, 6, 7)]
    rng = random.Random(0)
    windows += [[rng.randrange(len(tok)) for _ in range(7)] for _ in range(300)]
    windows += [[tok.eos_token_id], [], [tok.eos_token_id] + ids[:4]]
    assert engine.detokenize_batch(windows) == tok.batch_decode(windows, skip_special_tokens=True)


def test_rows_detokenised_from_the_token_text_table_get_the_tokenizers_text(engine, monkeypatch):
    """Rows whose token's text is context-free (engine.token_text) skip the tokenizer call; the
    streamed text must be the windows' text exactly: multi-byte characters split over tokens,
    special and added tokens, arbitrary ids, EOS ending some rows, max_tokens ending the rest."""
    import random

    tok = engine.tokenizer
    assert engine.token_text is not None  # a byte-level tokenizer: the table is in use
    rng = random.Random(3)
    text_ids = tok("Plain words, then Ünïcödé ✓ 你好 世界 🙂 🚀 and a tab\tand newlines\n\n  spaced").input_ids
    steps = 30
    streams = []
    for i in range(24):
        if i % 3 == 0:
            start = rng.randrange(len(text_ids) - 8)
            streams.append((text_ids[start:] * 4)[:steps])
        elif i % 3 == 1:
            streams.append([rng.choice(text_ids) for _ in range(steps)])
        else:
            streams.append([rng.randrange(len(tok)) for _ in range(steps)])

    def streamed(table):
        monkeypatch.setattr(engine, "token_text", table)
        decoded = []
        batch_decode = engine.detokenize_batch
        monkeypatch.setattr(engine, "detokenize_batch", lambda w: decoded.append(len(w)) or batch_decode(w))
        seqs = [engine._start(Generate(id=i, prompt="x", params=SamplingParams(max_tokens=steps, ignore_eos=i % 2 == 0)))
                for i in range(len(streams))]
        texts = {i: [] for i in range(len(streams))}
        for step in range(steps):
            frames = []
            live = [s for s in seqs if not s.done]
            engine._advance(live, [streams[s.id][step] for s in live], frames)
            for f in frames:
                if isinstance(f, Tokens):
                    texts[f.id].append(f.text)
        return texts, sum(decoded)

    table = engine.token_text
    fast, fast_windows = streamed(table)
    slow, slow_windows = streamed(None)
    short, _ = streamed(table[:1000])  # ids past the table (a padded vocabulary) are decoded
    assert fast == slow == short
    assert 0 < fast_windows < slow_windows / 2  # most rows skipped the tokenizer, some did not


def test_fused_pieces_leave_alone_a_module_whose_maths_differs():
    """A norm named like RMSNorm that adds one to its weight (Gemma's), or a gated MLP whose
    activation is not SiLU, keeps its own forward: each piece is compared with the module on a
    probe input before it is swapped."""
    from backend.fused import FusedPieces

    class PlainRMSNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            x32 = x.float()
            normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * normed.to(x.dtype)

    class OffsetRMSNorm(PlainRMSNorm):
        def forward(self, x):
            x32 = x.float()
            return (1 + self.weight) * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    class SiLU(torch.nn.Module):  # named like torch's, computes something else
        def forward(self, x):
            return torch.tanh(x)

    class GatedMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 16, bias=False)
            self.down_proj, self.act_fn = torch.nn.Linear(16, 8, bias=False), SiLU()

        def forward(self, x):
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

    model = torch.nn.ModuleDict({"same": PlainRMSNorm(), "offset": OffsetRMSNorm(), "mlp": GatedMLP()})
    fused = FusedPieces(model, backend="eager")
    assert fused.apply() == 1 and "forward" in vars(model["same"])
    assert "forward" not in vars(model["offset"]) and "forward" not in vars(model["mlp"])
    assert not fused.rotary_swapped
    fused.restore()


def test_stream_interval_sends_tokens_in_groups_and_keeps_text_stops_and_logprobs(engine):
    """stream_interval 4: a request's first token goes at once, then four at a time, the rest with its
    end - the same ids and text as one at a time; a stop sequence still cuts the text where it
    did; a request for logprobs still gets each token (and its logprob) at once."""
    def requests():
        return [Generate(id=1, prompt="x", params=SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True)),
                Generate(id=2, prompt="abc", params=SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True,
                                                                   logprobs=0))]

    def frames_of(reqs):
        frames: list = []
        engine.emit = frames.extend
        for r in reqs:
            engine.submit(r)
        for _ in range(200):
            if sum(isinstance(f, Finished) for f in frames) == len(reqs):
                return frames
            engine.step()
        raise AssertionError("requests never finished")

    def tokens(frames, rid):
        return [f for f in frames if isinstance(f, Tokens) and f.id == rid]

    one_at_a_time = frames_of(requests())
    engine.stream_interval = 4
    grouped = frames_of(requests())
    assert [len(f.token_ids) for f in tokens(grouped, 1)] == [1, 4, 4, 2]
    for rid in (1, 2):
        assert [t for f in tokens(grouped, rid) for t in f.token_ids] == \
            [t for f in tokens(one_at_a_time, rid) for t in f.token_ids]
        assert "".join(f.text for f in tokens(grouped, rid)) == "".join(f.text for f in tokens(one_at_a_time, rid))
    assert [len(f.token_ids) for f in tokens(grouped, 2)] == [1] * 9
    assert all(len(f.logprobs) == 1 for f in tokens(grouped, 2))
    last = [f for f in grouped if f.id == 1][-2:]  # the last group, then the end
    assert isinstance(last[0], Tokens) and isinstance(last[1], Finished) and last[1].completion_tokens == 11

    full = "".join(f.text for f in tokens(one_at_a_time, 1))
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    stopped = frames_of([Generate(id=3, prompt="x", params=SamplingParams(max_tokens=11, temperature=0.0,
                                                                          ignore_eos=True, stop=[stop]))])
    assert "".join(f.text for f in tokens(stopped, 3)) == full[: full.index(stop)]
    assert [f for f in stopped if isinstance(f, Finished)][0].finish_reason == "stop"
