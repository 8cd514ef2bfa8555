"""OpenAI's Responses API: POST /v1/responses (whole or as stream events), GET and DELETE
/v1/responses/{id}. The request is planned as the chat request it stands for and served by the
serving core like any other; proxy/serving/responses_api.py translates both ways."""

from __future__ import annotations

import contextlib
import time

import msgspec
from aiohttp import web

from backend.protocol import Finished
from proxy.errors import ApiError, NotFound
from proxy.http.server import JsonBodyReader
from proxy.http.sse import open_event_stream, overhead_s, response_headers
from proxy.serving.auth import Authenticator
from proxy.serving.answer import Answer
from proxy.serving.core import ServingCore
from proxy.serving.plan import Planner, RequestPlan, cache_directives
from proxy.serving.record import RequestRecord
from proxy.serving.responses_api import ResponseStore, StoredResponse, as_chat_request, conversation, parse_create
from proxy.serving.responses_output import ResponseBuilder

_json = msgspec.json.Encoder()


class ResponsesHandlers:
    def __init__(self, auth: Authenticator, planner: Planner, core: ServingCore, body: JsonBodyReader,
                 responses: ResponseStore) -> None:
        self.auth = auth
        self.planner = planner
        self.core = core
        self.body = body
        self.responses = responses

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/responses", self.create_response), web.get("/v1/responses/{id}", self.get_response),
                web.delete("/v1/responses/{id}", self.delete_response)]

    async def create_response(self, request: web.Request) -> web.StreamResponse:
        rec: RequestRecord = request["record"]
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        rec.key = principal.key_name
        req = parse_create(await self.body.read(request))
        rec.model = req.model
        earlier = []
        if req.previous_response_id:
            stored = self.responses.get(req.previous_response_id, principal.key_name)
            if stored is None:
                raise NotFound(f"Response with id '{req.previous_response_id[:80]}' not found (stored responses are "
                               "kept in memory for a limited time).", param="previous_response_id")
            earlier = stored.messages
        messages = conversation(req, earlier)
        history = messages[1:] if req.instructions else messages  # instructions are not carried over
        plan = self.planner.plan(principal, request.headers.get("X-Priority"), as_chat_request(req, messages),
                                 cache_directives(request.headers.get("Cache-Control", "")),
                                 choose_pool=self.core.choose_pool, context_of=self.core.context_length)
        rec.tier, rec.planned_model = plan.tier, self.planner.pools[plan.pool].model
        builder = ResponseBuilder(req, plan.shape, stored=bool(req.store))

        def store(body: dict, turn: list) -> None:
            if req.store:
                self.responses.put(builder.id, StoredResponse(principal.key_name, body, history + turn))

        async with self.core.answer(plan, rec) as answer:
            if plan.stream:
                return await self._stream_response(request, rec, plan, answer, builder, store)
            collected = await answer.collect()
            finished_at = time.monotonic()
        body, turn = builder.outcome(collected)
        store(body, turn)
        rec.overhead_s = overhead_s(rec, answer, time.monotonic(), finished_at)
        return web.Response(body=_json.encode(body), content_type="application/json",
                            headers=response_headers(rec, answer))

    async def _stream_response(self, request: web.Request, rec: RequestRecord, plan: RequestPlan, answer: Answer,
                               builder: ResponseBuilder, store) -> web.StreamResponse:
        response = sse = None
        async with contextlib.aclosing(answer.frames()) as frames:
            try:
                async for batch in frames:
                    out: list[bytes] = []
                    if response is None:
                        response, sse = await open_event_stream(request, rec, answer, plan.write_timeout_s)
                        out.extend(builder.start_events())
                    end = None  # the stream's Finished frame, in the batch that ends it
                    if batch is None:
                        out.append(b": keep-alive\n\n")
                    else:
                        end = batch[-1] if isinstance(batch[-1], Finished) else None
                        out.extend(builder.tokens(batch[:-1] if end is not None else batch))
                        if end is not None:
                            events, body, turn = builder.finish_events(end)
                            out.extend(events)
                            store(body, turn)
                    if out:
                        await sse.write(b"".join(out), end=end is not None)
            except ApiError as exc:
                if response is None:
                    raise
                rec.fail(exc)
                await sse.write(builder.event("error", code=exc.code or exc.type, message=exc.message,
                                              param=exc.param))
        await sse.write(None)
        return response

    async def get_response(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        stored = self.responses.get(request.match_info["id"], principal.key_name)
        if stored is None:
            raise NotFound(f"Response with id '{request.match_info['id'][:80]}' not found.", param="response_id")
        return web.Response(body=_json.encode(stored.body), content_type="application/json")

    async def delete_response(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        response_id = request.match_info["id"]
        if not self.responses.delete(response_id, principal.key_name):
            raise NotFound(f"Response with id '{response_id[:80]}' not found.", param="response_id")
        return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})
