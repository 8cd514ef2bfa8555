"""The jobs endpoints: /v1/jobs for API keys (each sees its own jobs) and /admin/jobs for the
operator. HTTP in, JobService operations, JSON out."""

from __future__ import annotations

import asyncio

import msgspec
from aiohttp import web

from proxy.errors import InvalidRequest
from proxy.http.server import JsonBodyReader
from proxy.jobs.service import PAGE_SIZE_MAX, JobService, public
from proxy.serving.auth import Authenticator


class JobHandlers:
    def __init__(self, jobs: JobService, auth: Authenticator, body: JsonBodyReader) -> None:
        self.jobs = jobs
        self.auth = auth
        self.body = body

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/jobs", self.submit), web.get("/v1/jobs", self.list_jobs),
                web.get("/v1/jobs/{id}", self.get_job), web.delete("/v1/jobs/{id}", self.cancel_job)]

    def admin_routes(self) -> list[web.RouteDef]:
        return [web.get("/admin/jobs", self.admin_list), web.get("/admin/jobs/{id}", self.admin_get),
                web.post("/admin/jobs/{id}/{action:cancel|retry}", self.admin_action)]

    def _key_name(self, request: web.Request, listing: bool = False) -> str:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        self.jobs.check_tenant(principal, listing)
        return principal.key_name

    async def submit(self, request: web.Request) -> web.Response:
        principal = self.auth.authenticate(request.headers.get("Authorization"))
        body = await self.body.read(request)
        job, created = await self.jobs.submit(principal, body, request.headers.get("Idempotency-Key") or None)
        # 202 only now: the row is committed (synchronous=FULL).
        return web.json_response({"id": job["id"], "object": "job", "status": job["status"],
                                  "created_at": job["created_at"]}, status=202 if created else 200)

    async def get_job(self, request: web.Request) -> web.Response:
        return web.json_response(public(await self.jobs.get(request.match_info["id"], self._key_name(request))))

    async def list_jobs(self, request: web.Request) -> web.Response:
        return await self._list(request, self._key_name(request, listing=True))

    async def cancel_job(self, request: web.Request) -> web.Response:
        return web.json_response(public(await self.jobs.cancel(request.match_info["id"], self._key_name(request))))

    async def _list(self, request: web.Request, key_name: str | None) -> web.Response:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            raise InvalidRequest("limit must be an integer.", param="limit") from None
        limit = max(1, min(limit, PAGE_SIZE_MAX))
        jobs = await self.jobs.list(key_name, request.query.get("status") or None, limit, request.query.get("after"))
        page = {"object": "list", "data": [public(j) for j in jobs], "has_more": len(jobs) == limit,
                "last_id": jobs[-1]["id"] if jobs else None}
        # A page holds up to 100 results of up to a body's size each: encode it off the loop.
        body = await asyncio.to_thread(msgspec.json.encode, page)
        return web.Response(body=body, content_type="application/json")

    async def admin_list(self, request: web.Request) -> web.Response:
        return await self._list(request, None)

    async def admin_get(self, request: web.Request) -> web.Response:
        job = await self.jobs.get(request.match_info["id"], None)
        out = public(job)
        out["key"] = job["key_name"]
        out["callback"] = {"url": job["callback_url"], "state": job["callback_state"],
                           "attempts": await self.jobs.callback_attempts(job["id"])}
        return web.json_response(out)

    async def admin_action(self, request: web.Request) -> web.Response:
        job_id, action = request.match_info["id"], request.match_info["action"]
        job = await (self.jobs.cancel(job_id, None) if action == "cancel" else self.jobs.retry(job_id))
        return web.json_response(public(job))
