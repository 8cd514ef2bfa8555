"""The continuous-batching loop every engine shares (torch-free).

An engine subclass supplies the model: `encode` (prompt -> token ids), `prefill` (start sequences,
return their first sampled tokens), `decode` (one step for every running sequence), `release`
(forget sequences) and `detokenize`. This class owns the request lifecycle: the inbox of new and
cancelled requests, the running batch, max_tokens, EOS, stop sequences and the frames sent back.
It runs on its own thread; the worker's event loop talks to it only through `submit`, `cancel` and
the `emit` callback.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Callable, Sequence

from backend.protocol import HOST_PARTS, Detokenize, Failed, Finished, Generate, TokenizeResult, Tokens
from backend.textstream import IncrementalDetokenizer, StopMatcher

log = logging.getLogger("fullpower.worker")


class RequestError(Exception):
    """A request the engine refuses (code "invalid_request"), naming the parameter at fault."""

    def __init__(self, message: str, param: str = "") -> None:
        super().__init__(message)
        self.param = param


class InternalError(Exception):
    """A request the engine failed to serve through its own fault (code "internal")."""


class EngineSequence:
    """One request's generation state inside the engine."""

    __slots__ = ("req", "prompt_ids", "generated", "detok", "stops", "params", "slot", "seed", "matcher",
                 "logprob", "done", "prefilled", "held_ids", "held_text")

    def __init__(self, req: Generate, prompt_ids: list[int], detok: IncrementalDetokenizer) -> None:
        self.req = req
        self.params = req.params
        self.prompt_ids = prompt_ids
        self.generated: list[int] = list(req.resume_token_ids)
        self.detok = detok
        self.stops = StopMatcher(req.params.stop)
        self.slot = None  # engine-private
        # sampling noise is a function of (seed, position): unseeded requests get a random seed
        self.seed = req.params.seed if req.params.seed is not None else random.getrandbits(62)
        self.matcher = None  # the grammar's matcher (engine-made) when the output is constrained
        self.logprob = None  # the TokenLogprob of the token just sampled, when the request asked
        self.done = False  # finished or cancelled (a step in flight may still hold its row)
        self.prefilled = 0  # tokens of all_ids in the KV cache while its prompt is prefilled in chunks
        # stream_interval: tokens made but not yet sent (sent together once there are enough)
        self.held_ids: list[int] = []
        self.held_text = ""

    @property
    def id(self) -> int:
        return self.req.id

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def shapes_logits(self) -> bool:
        """The next token's logits need this sequence's history on the host: grammar mask,
        penalties, logit_bias, or EOS held back by min_tokens."""
        p = self.params
        return bool(p.grammar or p.presence_penalty or p.frequency_penalty or p.logit_bias
                    or len(self.generated) < p.min_tokens)

    @property
    def needs_host(self) -> bool:
        """Host work between this sequence's steps (logits shaping or logprobs): no pipelining."""
        return self.params.logprobs >= 0 or self.shapes_logits

    def ends_at(self, token: int, eos_ids) -> bool:
        """`token` (just appended) is an EOS that ends the sequence."""
        p = self.params
        return token in eos_ids and not p.ignore_eos and len(self.generated) > p.min_tokens


_AT_EOS = object()  # _advance: the row's token is the EOS that ends it (no text of its own)


class _DoneStep:
    """A decode step that ran synchronously (engines that do not pipeline)."""

    __slots__ = ("seqs", "ids")

    def __init__(self, seqs: list, ids: list[int]) -> None:
        self.seqs, self.ids = seqs, ids


class BatchEngine:
    name = "base"
    vocab_size = 2**31  # token ids the engine knows (engines set theirs)
    weight_bytes = 0  # the model's weights in memory (engines with a model set it)
    # token id -> its text where decoding it after any other ids appends exactly that text (None
    # for ids whose text depends on their neighbours); engines whose tokenizer allows it set it,
    # and a step's rows that are caught up need no tokenizer call
    token_text: "list[str | None] | None" = None
    pipeline = True  # launch the next decode step before this one's tokens reach the host, when rows allow
    chunked_prefill = False  # engines that can prefill a prompt in pieces (prefill_chunk) set it
    # Engines that can prefill arrivals beside the decode steps in flight (prefill_beside) set it;
    # see _admit.
    overlap_prefill = False

    def __init__(self, max_batch_size: int, context_length: int, eos_ids: Sequence[int]) -> None:
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.eos_ids = set(eos_ids)
        self._inbox: "queue.SimpleQueue[tuple[str, object]]" = queue.SimpleQueue()
        self._waiting: list[Generate] = []
        self._running: list[EngineSequence] = []
        # Admitted, slot reserved, prompt not yet all in the KV cache: prefilled at most
        # prefill_budget tokens per step, between the running rows' decode steps, so arrivals
        # never stall them for a whole long prompt (0: every admitted prompt at once).
        self._prefilling: list[EngineSequence] = []
        self.prefill_budget = 0
        # While rows are decoding, an arrival may wait up to prefill_wait_s for others to be
        # prefilled with it (each prefill holds every running row for about a step; several
        # together cost little more than one): admitted at once when admit_together have come,
        # when they fill the free slots, or when nothing is running. 0: admitted at every step.
        self.prefill_wait_s = 0.0
        self.admit_together = 16
        # A request's tokens go to the proxy this many at a time (its first at once, its last with
        # its end): fewer frames, events and socket writes per token for clients that can take
        # their text a few tokens at a time (the pool's stream_interval). 1: every token at once.
        self.stream_interval = 1
        self._waiting_since = 0.0  # when the oldest waiting request arrived (monotonic)
        self._inflight = None  # a decode step launched and not yet collected (pipelining)
        # Arrivals being prefilled beside the running rows' decode steps (an engine's handle with
        # .seqs, from prefill_beside): they join the batch at the next step, and nothing else is
        # admitted until they have.
        self._joining = None
        self._stop = threading.Event()
        self.last_tick = time.monotonic()
        self.generated_tokens = 0
        # Host seconds spent in each part of the loop since start (the GPU benchmark's step
        # anatomy): encoding arrivals, prefilling them, launching decode steps, waiting for their
        # tokens, turning tokens into text and frames, handing frames to the worker.
        self.host_seconds = dict.fromkeys(HOST_PARTS, 0.0)
        self.decode_steps = 0
        self.emit: Callable[[list], None] = lambda frames: None

    # --- model hooks ----------------------------------------------------------------------------
    def encode(self, req: Generate, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids of a Generate (or Tokenize): its messages through the chat template, or its prompt."""
        raise NotImplementedError

    def encode_many(self, reqs: list[Generate]) -> list:
        """Each request's prompt ids, or the RequestError or InternalError it raised, in order
        (engines override it to tokenize many prompts in one call)."""
        out: list = []
        for req in reqs:
            try:
                out.append(self.encode(req))
            except (RequestError, InternalError) as exc:
                out.append(exc)
        return out

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def detokenize_batch(self, windows: list[Sequence[int]]) -> list[str]:
        """Many decodes in one call (engines override it with their tokenizer's batch decode)."""
        return [self.detokenize(w) for w in windows]

    def prefill(self, seqs: list[EngineSequence]) -> list[int]:
        raise NotImplementedError

    def reserve(self, seq: EngineSequence) -> None:
        """Give the sequence its KV cache row before its prompt is prefilled in chunks."""
        raise NotImplementedError

    def prefill_beside(self, seqs: list[EngineSequence]):
        """Start prefilling `seqs` beside the decode steps in flight, without waiting for them or
        for the result: a handle (with .seqs) for first_tokens() and launch_next(joining=...), or
        None when this group cannot be (it is then prefilled the plain way). Engines that set
        overlap_prefill implement it."""
        return None

    def first_tokens(self, joining) -> list[int]:
        """The first token of each of a prefill_beside group's rows (waits for that prefill)."""
        raise NotImplementedError

    def prefill_chunk(self, seq: EngineSequence, start: int, end: int) -> int | None:
        """Prefill all_ids[start:end]; the first sampled token when that ends the prompt."""
        raise NotImplementedError

    def decode(self, seqs: list[EngineSequence]) -> list[int]:
        raise NotImplementedError

    def release(self, seqs: list[EngineSequence]) -> None:
        pass

    def make_matcher(self, grammar: str):
        """A matcher for the grammar (see TransformersEngine); engines without one refuse."""
        raise RequestError(f"the {self.name} engine does not support structured outputs", param="response_format")

    def check_params(self, req: Generate) -> None:
        """Engine-specific checks of a request's parameters (e.g. logit_bias token ids)."""

    def warm_up(self) -> None:
        """Run one short generation end to end; raises if the engine cannot serve."""
        done = threading.Event()
        result: list = []

        def capture(frames):
            for f in frames:
                if isinstance(f, (Finished, Failed)):
                    result.append(f)
                    done.set()

        from backend.protocol import ChatMessage, SamplingParams

        saved, self.emit = self.emit, capture
        try:
            self.submit(Generate(id=-1, params=SamplingParams(max_tokens=4, temperature=0.0),
                                 messages=[ChatMessage("user", "Hello")]))
            while not done.is_set():
                self.step()
        finally:
            self.emit = saved
        if isinstance(result[0], Failed):
            raise RuntimeError(f"warm-up generation failed: {result[0].message}")

    # --- thread-safe entry points ---------------------------------------------------------------
    def submit(self, req: Generate) -> None:
        self._inbox.put(("gen", req))

    def cancel(self, request_id: int) -> None:
        self._inbox.put(("cancel", request_id))

    def cancel_all(self, then=None) -> None:
        """Cancel every request sent so far (the proxy that sent them is gone: nobody can read
        their frames); `then()` is called on the engine thread once that is done, so that frames
        of old requests never reach the next proxy's connection."""
        self._inbox.put(("cancel_all", then))

    def submit_tokenizer_call(self, msg) -> None:
        """A Tokenize or Detokenize request: answered on the engine thread (the tokenizer's owner)."""
        self._inbox.put(("tokenizer", msg))

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(("wake", None))

    def gpu_memory_bytes(self) -> int:
        return 0

    @property
    def load(self) -> tuple[int, int]:
        return len(self._running) + len(self._prefilling) + len(self._joining_seqs()), len(self._waiting)

    def _joining_seqs(self) -> list[EngineSequence]:
        return self._joining.seqs if self._joining is not None else []

    # --- the loop -------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while not self._stop.is_set():
            self.step()

    def step(self) -> None:
        """One decode step for the running batch, after admitting waiting requests between steps.

        Pipelined (engines that can, for rows that need nothing from the host between steps): the
        next step is launched from the device's sampled tokens before this step's tokens are turned
        into text and frames, so the host's detokenising overlaps the device's next step. A row that
        ended at this step has run one step too many; that step's token is dropped."""
        self.last_tick = time.monotonic()
        idle = not self._running and not self._waiting and self._inflight is None and not self._prefilling \
            and self._joining is None
        self._drain_inbox(block=idle)
        frames: list = []
        # Arrivals prefilled beside an earlier step join at this one (not at the step they were
        # admitted at: joining waits for their prefill, which would then run before that step
        # instead of beside it).
        joining, admitted = self._joining, None
        if self._waiting and joining is None and len(self._running) + len(self._prefilling) < self.max_batch_size \
                and self._admission_due():
            admitted = self._admit(frames)
        if self._prefilling:
            self._prefill_some(frames)
        if frames:
            self._emit_timed(frames)  # first tokens go out now, not after the next decode step
            frames = []
        if self._running:
            t0 = time.perf_counter()
            current = self._inflight if self._inflight is not None else self.launch(self._running)
            alive = [s for s in current.seqs if not s.done]
            nxt = None
            if self._can_pipeline(alive):
                # rows whose token at this step is their last (max_tokens, context) are left out
                going = [s for s in alive if self._continues(s)]
                if going and joining is not None and all(self._continues(s) for s in joining.seqs if not s.done):
                    nxt = self.launch_next(current, going, joining=joining)  # they join on the device
                elif going:
                    nxt = self.launch_next(current, going)
            self._inflight = nxt
            self.host_seconds["launch"] += time.perf_counter() - t0
            self._collect_and_advance(current, frames)
        else:
            self._flush(frames)
        if joining is not None and joining is not admitted:
            self._join(joining, frames)
        if frames:
            self._emit_timed(frames)

    def _admission_due(self) -> bool:
        """Whether the waiting requests are admitted at this step (see prefill_wait_s)."""
        if not self.prefill_wait_s or not self._running:
            return True
        room = self.max_batch_size - len(self._running) - len(self._prefilling)
        if len(self._waiting) >= min(room, self.admit_together):
            return True
        return time.monotonic() - self._waiting_since >= self.prefill_wait_s

    def _emit_timed(self, frames: list) -> None:
        t0 = time.perf_counter()
        self.emit(frames)
        self.host_seconds["emit"] += time.perf_counter() - t0

    def _can_pipeline(self, seqs: list[EngineSequence]) -> bool:
        """Whether the step after this one can be launched before this one's tokens are known:
        every row samples on the device alone (no grammar, penalties, bias, logprobs or held
        EOS). Rows that end at this step by length are left out of it (_continues), so that a
        batch whose rows finish at different steps - any steady load - stays pipelined."""
        if not self.pipeline or not seqs or len(seqs) != len(self._running):
            return False
        return not any(s.needs_host for s in seqs)

    def _continues(self, s: EngineSequence) -> bool:
        """A row with one token sampled and not yet on the host (the step in flight) still runs
        after it: that token reaches neither max_tokens nor the context, and needs nothing from
        the host."""
        p = s.params
        return not s.needs_host and len(s.generated) + 2 <= p.max_tokens \
            and len(s.prompt_ids) + len(s.generated) + 2 <= self.context_length

    def _flush(self, frames: list) -> None:
        """Collect the step in flight, if any."""
        if self._inflight is not None:
            current, self._inflight = self._inflight, None
            self._collect_and_advance(current, frames)

    def _collect_and_advance(self, step, frames: list) -> None:
        """A launched decode step's tokens, then its rows advanced (timed, counted)."""
        t0 = time.perf_counter()
        ids = self.collect(step)
        t1 = time.perf_counter()
        self._advance_alive(step.seqs, ids, frames)
        self.host_seconds["collect"] += t1 - t0
        self.host_seconds["advance"] += time.perf_counter() - t1
        self.decode_steps += 1

    def _advance_alive(self, seqs: list[EngineSequence], ids: list[int], frames: list) -> None:
        """_advance for the rows still running (a row that ended or was cancelled while its step
        was in flight is dropped with its token)."""
        if all(not s.done for s in seqs):
            self._advance(seqs, ids, frames)
            return
        alive = [(s, t) for s, t in zip(seqs, ids) if not s.done]
        if alive:
            self._advance([s for s, _ in alive], [t for _, t in alive], frames)

    # --- decode steps (engines override launch/launch_next/collect to pipeline) ----------------------
    def launch(self, seqs: list[EngineSequence]):
        """Start a decode step for `seqs`; `collect` gives its sampled token ids."""
        return _DoneStep(list(seqs), self.decode(seqs))

    def launch_next(self, step, seqs: list[EngineSequence], joining=None):
        """Start the step after `step` for `seqs` (a subset of its rows) from the tokens `step`
        sampled on the device, before they are collected - with `joining`'s live rows too (a
        prefill_beside handle: their first tokens, also on the device); None when the engine cannot."""
        return None

    def collect(self, step) -> list[int]:
        return step.ids

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.25) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "gen":
                if not self._waiting:
                    self._waiting_since = time.monotonic()
                self._waiting.append(value)
            elif kind == "cancel":
                self._cancel(value)
            elif kind == "cancel_all":
                live = {r.id for r in self._waiting} | {s.id for s in self._running} | {s.id for s in self._prefilling}
                live |= {s.id for s in self._joining_seqs()}
                for request_id in live:
                    self._cancel(request_id)
                if value is not None:
                    value()
            elif kind == "tokenizer":
                self.emit([self._tokenizer_call(value)])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _tokenizer_call(self, msg):
        try:
            if isinstance(msg, Detokenize):
                bad = [t for t in msg.token_ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise RequestError(f"token {bad[0]} is outside this model's vocabulary (0..{self.vocab_size - 1})",
                                       param="tokens")
                return TokenizeResult(id=msg.id, text=self.detokenize(msg.token_ids))
            return TokenizeResult(id=msg.id, token_ids=self.encode(msg, add_generation_prompt=msg.add_generation_prompt))
        except RequestError as exc:
            return Failed(id=msg.id, code="invalid_request", message=str(exc), param=exc.param)
        except Exception as exc:  # noqa: BLE001 - e.g. an id outside the vocabulary: the caller's input
            return Failed(id=msg.id, code="invalid_request", message=f"{type(exc).__name__}: {exc}")

    def _cancel(self, request_id: int) -> None:
        self._waiting = [r for r in self._waiting if r.id != request_id]
        halfway = [s for s in self._prefilling if s.id == request_id]
        if halfway:
            self._prefilling = [s for s in self._prefilling if s.id != request_id]
            self.release(halfway)
        gone = [s for s in self._running if s.id == request_id]
        joining = [s for s in self._joining_seqs() if s.id == request_id and not s.done]
        if joining:  # its slot is free to reuse once the group has joined (nothing is admitted before)
            joining[0].done = True
            self.release(joining)
        for s in gone:
            s.done = True
        if gone:
            self._running = [s for s in self._running if s.id != request_id]
            self.release(gone)

    def _admit(self, frames: list):
        """Admit what fits of the waiting requests and prefill them. Beside the running rows
        (overlap_prefill, with a pipelined step in flight): the engine prefills them while the
        decode steps go on and they join at the next step (returns their handle); otherwise the
        step in flight is collected first (the batch as it really is) and they are prefilled
        before the next decode step is launched."""
        beside = self.overlap_prefill and self._inflight is not None \
            and not (self.prefill_budget and self.chunked_prefill)
        if not beside:
            self._flush(frames)
        room = self.max_batch_size - len(self._running) - len(self._prefilling)
        if room <= 0 or not self._waiting:
            return None
        if beside:  # no more than one prefill graph takes; the rest come with the next group
            room = min(room, self.admit_together)
        batch, self._waiting = self._waiting[:room], self._waiting[room:]
        self._waiting_since = time.monotonic()  # those left wait for room, not for company
        seqs = []
        t0 = time.perf_counter()
        for req, prompt_ids in zip(batch, self.encode_many(batch)):
            try:
                if isinstance(prompt_ids, Exception):
                    raise prompt_ids
                seqs.append(self._start(req, prompt_ids))
            except RequestError as exc:
                frames.append(Failed(id=req.id, code="invalid_request", message=str(exc), param=exc.param))
            except InternalError as exc:
                frames.append(Failed(id=req.id, code="internal", message=str(exc)))
        t1 = time.perf_counter()
        self.host_seconds["encode"] += t1 - t0
        if not seqs:
            return None
        if self.prefill_budget and self.chunked_prefill:
            for seq in seqs:
                self.reserve(seq)
            self._prefilling.extend(seqs)  # prefilled by _prefill_some, a budget per step
            return None
        if beside:
            self._joining = self.prefill_beside(seqs)
            if self._joining is not None:
                self.host_seconds["prefill"] += time.perf_counter() - t1
                return self._joining
            self._flush(frames)  # this group cannot: the plain way, after the step in flight
            t1 = time.perf_counter()
        first = self.prefill(seqs)
        t2 = time.perf_counter()
        self.host_seconds["prefill"] += t2 - t1
        self._running.extend(seqs)
        self._advance(seqs, first, frames)
        self.host_seconds["advance"] += time.perf_counter() - t2
        return None

    def _join(self, joining, frames: list) -> None:
        """Rows prefilled beside the decode steps join the running batch (on the device already, if
        the step just launched took them): their first tokens, then each row's first frame."""
        t0 = time.perf_counter()
        first = self.first_tokens(joining)
        t1 = time.perf_counter()
        self._joining = None
        live = [(s, t) for s, t in zip(joining.seqs, first) if not s.done]  # not cancelled meanwhile
        if live:
            self._running.extend(s for s, _ in live)
            self._advance([s for s, _ in live], [t for _, t in live], frames)
        self.host_seconds["collect"] += t1 - t0
        self.host_seconds["advance"] += time.perf_counter() - t1

    def _prefill_some(self, frames: list) -> None:
        """Up to prefill_budget prompt tokens of the admitted sequences, in order: prompts that fit
        whole go in one batched prefill; a longer one gets a chunk of what is left of the budget
        (one chunk per step) and joins the running rows once its last chunk is in."""
        t0 = time.perf_counter()
        try:
            self._prefill_within_budget(frames)
        finally:
            self.host_seconds["prefill"] += time.perf_counter() - t0

    def _prefill_within_budget(self, frames: list) -> None:
        budget = self.prefill_budget
        whole: list[EngineSequence] = []
        while self._prefilling and budget > 0:
            seq = self._prefilling[0]
            remaining = len(seq.all_ids) - seq.prefilled
            if seq.prefilled == 0 and remaining <= budget:
                whole.append(self._prefilling.pop(0))
                budget -= remaining
                continue
            if whole:
                break  # the long prompt starts next step
            end = seq.prefilled + min(remaining, budget)
            first = self.prefill_chunk(seq, seq.prefilled, end)
            seq.prefilled = end
            if first is not None:
                self._prefilling.pop(0)
                self._running.append(seq)
                self._advance([seq], [first], frames)
            break
        if whole:
            first_ids = self.prefill(whole)
            self._running.extend(whole)
            self._advance(whole, first_ids, frames)

    def _start(self, req: Generate, prompt_ids: list[int] | None = None) -> EngineSequence:
        if prompt_ids is None:
            prompt_ids = self.encode(req)
        p = req.params
        if p.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        total = len(prompt_ids) + max(p.max_tokens, len(req.resume_token_ids) + 1)
        if total > self.context_length:
            raise RequestError(
                f"This model's maximum context length is {self.context_length} tokens. However, you "
                f"requested {total} tokens ({len(prompt_ids)} in the messages, {p.max_tokens} in the "
                f"completion). Please reduce the length of the messages or completion.")
        if len(req.resume_token_ids) >= p.max_tokens:
            raise RequestError("resume_token_ids already reach max_tokens")
        self.check_params(req)
        seq = EngineSequence(req, prompt_ids, IncrementalDetokenizer(self.detokenize, req.resume_token_ids))
        if p.grammar:
            seq.matcher = self.make_matcher(p.grammar)
            # a resumed generation continues from where the grammar was
            if req.resume_token_ids and not seq.matcher.consume_tokens(req.resume_token_ids):
                raise RequestError(f"resume_token_ids do not follow the grammar: {seq.matcher.get_error()}")
        return seq

    def _advance(self, seqs: list[EngineSequence], next_ids: list[int], frames: list) -> None:
        """Each row's new token: end checks, its text (from token_text where that gives it, else
        from one tokenizer call for all the rows left), stop sequences, its frames. Per row and
        per step: written for the hot path (no work a row does not need)."""
        finished: list[EngineSequence] = []
        ends: list[str | None] = []  # per row: None (it continues), "stop" or "length"
        known: list = []  # per row: its text when known without the tokenizer, _AT_EOS, or None
        windows: list = []
        table = self.token_text
        known_ids = len(table) if table is not None else 0  # an id past it (a model's padded vocabulary) is decoded
        eos_ids, context, interval = self.eos_ids, self.context_length, self.stream_interval
        self.generated_tokens += len(seqs)
        for seq, tok in zip(seqs, next_ids):
            generated = seq.generated
            generated.append(tok)
            if tok in eos_ids and seq.ends_at(tok, eos_ids):
                ends.append("stop")
                known.append(_AT_EOS)
                continue
            matcher = seq.matcher
            if matcher is not None and (not matcher.consume_token(tok) or matcher.is_stopped()):
                # Complete (nothing but EOS could follow): end now rather than spend a step on EOS.
                # A refused token cannot happen (the mask allows only what the grammar accepts);
                # if it ever does, the sequence ends and the proxy sees unparsable output.
                if matcher.is_error():
                    log.error("request %d: a sampled token left the grammar: %s", seq.id, matcher.get_error())
                ends.append("stop")
            elif len(generated) >= seq.params.max_tokens or len(seq.prompt_ids) + len(generated) >= context:
                ends.append("length")
            else:
                ends.append(None)
            detok = seq.detok
            text = table[tok] if tok < known_ids and detok.caught_up else None
            detok.ids.append(tok)
            known.append(text)
            if text is None:
                windows.extend(detok.windows())
        # One tokenizer call for the rows left: per-sequence decodes dominate big batches.
        texts = iter(self.detokenize_batch(windows)) if windows else iter(())
        for seq, tok, reason, text in zip(seqs, next_ids, ends, known):
            detok = seq.detok
            if text is None:
                text = detok.accept(next(texts), next(texts))
            elif text is _AT_EOS:
                text = ""
            else:
                text = detok.accept_known(text)
            if reason is not None:
                text += detok.flush()
            stops = seq.stops
            if stops.stops:  # without stop sequences nothing is ever held back
                text, hit_stop = stops.push(text)
                if hit_stop:
                    reason = "stop"
                elif reason is not None:
                    text += stops.flush()
            if seq.logprob is None:
                held = seq.held_ids
                if (interval > 1 and reason is None and len(held) + 1 < interval
                        and len(seq.generated) > len(seq.req.resume_token_ids) + 1):
                    held.append(tok)  # not enough yet (and not this attempt's first): sent with the next
                    seq.held_text += text
                    continue
                if held:
                    held.append(tok)
                    frames.append(Tokens(id=seq.id, token_ids=held, text=seq.held_text + text))
                    seq.held_ids, seq.held_text = [], ""
                else:
                    frames.append(Tokens(id=seq.id, token_ids=[tok], text=text))
            else:
                frames.append(Tokens(id=seq.id, token_ids=[tok], text=text, logprobs=[seq.logprob]))
                seq.logprob = None
            if reason is not None:
                frames.append(Finished(id=seq.id, finish_reason=reason, prompt_tokens=len(seq.prompt_ids),
                                       completion_tokens=len(seq.generated)))
                finished.append(seq)
                seq.done = True
        if finished:
            done = {id(s) for s in finished}
            self._running = [s for s in self._running if id(s) not in done]
            self.release(finished)
