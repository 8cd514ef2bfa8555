"""Endpoints the ecosystem probes beyond OpenAI's own: vLLM's /tokenize and /detokenize and
/version (GET /health is with the probes, proxy/http/admin.py). Tokenizing needs the model's
tokenizer and chat template, which only workers hold: the call goes to a ready worker of the
model's pool, whose engine thread answers it between steps (no admission: it costs microseconds)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Union

import msgspec
from aiohttp import web

import proxy
from backend.protocol import Detokenize, Failed, Tokenize, TokenizeResult
from proxy.errors import InvalidRequest, NoWorkerReady, UpstreamError, UpstreamTimeout
from proxy.fleet.pool import PoolState
from proxy.http.server import JsonBodyReader
from proxy.serving.auth import Authenticator
from proxy.serving.core import ServingCore
from proxy.serving.generation import next_request_id
from proxy.serving.openai_types import ChatMessageIn, Tool, raise_invalid
from proxy.serving.plan import Planner

_json = msgspec.json.Encoder()
TOKENIZER_CALL_TIMEOUT_S = 10.0


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    prompt: Union[str, None] = None
    messages: Union[Annotated[list[ChatMessageIn], msgspec.Meta(min_length=1)], None] = None
    tools: Union[list[Tool], None] = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    model: str
    tokens: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=1_000_000)]


class CompatHandlers:
    def __init__(self, auth: Authenticator, planner: Planner, core: ServingCore, pools: PoolState,
                 body: JsonBodyReader) -> None:
        self.auth = auth
        self.planner = planner
        self.core = core
        self.pools = pools
        self.body = body

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/version", self.version), web.post("/tokenize", self.tokenize),
                web.post("/detokenize", self.detokenize)]

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": proxy.__version__})

    async def _decode(self, request: web.Request, kind: type):
        try:
            return msgspec.json.decode(await self.body.read(request), type=kind)
        except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise_invalid(exc)

    async def _pool(self, request: web.Request, model: str) -> str:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        pool = self.planner.pool_for(model, principal, principal.tier)
        await self.core.rate_limit(principal.key_name, principal.tier)  # cheap, but not free: the key's request rate
        return pool

    async def tokenize(self, request: web.Request) -> web.Response:
        req: TokenizeRequest = await self._decode(request, TokenizeRequest)
        pool = await self._pool(request, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("Send exactly one of prompt and messages.", param="prompt")
        if not req.add_special_tokens:
            raise InvalidRequest("add_special_tokens: false is not supported.", param="add_special_tokens")
        messages = None if req.messages is None else [m.to_protocol(i) for i, m in enumerate(req.messages)]
        tools = [t.as_dict() for t in req.tools or ()]
        result = await self._ask(pool, lambda rid: Tokenize(id=rid, messages=messages, prompt=req.prompt, tools=tools,
                                                            add_generation_prompt=req.add_generation_prompt))
        return web.Response(body=_json.encode({"count": len(result.token_ids), "max_model_len":
                                               self.pools.context_length(pool), "tokens": result.token_ids,
                                               "token_strs": None}), content_type="application/json")

    async def detokenize(self, request: web.Request) -> web.Response:
        req: DetokenizeRequest = await self._decode(request, DetokenizeRequest)
        pool = await self._pool(request, req.model)
        result = await self._ask(pool, lambda rid: Detokenize(id=rid, token_ids=req.tokens))
        return web.Response(body=_json.encode({"prompt": result.text}), content_type="application/json")

    async def _ask(self, pool: str, make) -> TokenizeResult:
        worker = self.pools.pick(pool)
        if worker is None or worker.conn is None:
            raise NoWorkerReady("No worker is ready to serve this model; retry shortly.", retry_after=1.0)
        rid = next_request_id()
        stream = worker.conn.generate(make(rid))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOKENIZER_CALL_TIMEOUT_S
        try:
            while True:
                items = stream.take()
                if items:
                    break
                if loop.time() >= deadline:
                    raise UpstreamTimeout(f"The worker did not answer within {TOKENIZER_CALL_TIMEOUT_S:.0f}s.")
                await stream.wait_until(deadline)
        finally:
            stream.release()
            if not stream.closed:
                worker.conn.cancel(rid)
        frame = items[0]
        if isinstance(frame, TokenizeResult):
            return frame
        if isinstance(frame, Failed):
            raise InvalidRequest(frame.message, param=frame.param or None)
        raise UpstreamError(f"The worker failed ({frame}).")
