"""Coverage-guided fuzz targets (atheris): request parsing and planning, the worker frame decoder,
and config loading. Each target may raise only the errors its input is allowed to cause; anything
else (an unexpected exception, a hang the runner times out) is a crash. Run: python -m fuzz.run."""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["proxy", "backend"]):
    from backend import protocol
    from proxy.config import Cache, ConfigError, Pool, Tier, Timeouts, parse_config
    from proxy.errors import ApiError
    from proxy.serving.auth import Principal
    from proxy.serving.openai_types import ChatCompletionRequest, CompletionRequest, parse
    from proxy.serving.plan import Planner

_PLANNER = Planner([Tier(name="premium", pool="main"), Tier(name="batch", pool="small")],
                   [Pool(name="main", model="fake-model"), Pool(name="small", model="small-model")],
                   Cache(), Timeouts(), max_tokens_default=64)


def request(data: bytes) -> None:
    """Bytes as a chat or text completion body: a validated request and a plan, or an ApiError."""
    if not data:
        return
    kind = ChatCompletionRequest if data[0] % 2 else CompletionRequest
    try:
        req = parse(data[1:], kind)
        _PLANNER.plan(Principal("k", "premium", ("small",)), None, req, context_of=lambda pool: 4096)
    except ApiError:
        pass


def frames(data: bytes) -> None:
    """Bytes from a worker (or to one), fed in two pieces: messages, or FrameError."""
    cut = data[0] if data else 0
    for decoder in (protocol.proxy_decoder(), protocol.worker_decoder()):
        try:
            decoder.feed(data[1:cut + 1])
            decoder.feed(data[cut + 1:])
        except protocol.FrameError:
            pass


def config(data: bytes) -> None:
    """Bytes as the YAML config file: a Config, or ConfigError naming the problems."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return
    try:
        parse_config(text)
    except ConfigError:
        pass


TARGETS = {"request": request, "frames": frames, "config": config}
