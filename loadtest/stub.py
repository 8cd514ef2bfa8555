"""A minimal upstream stub for the proxy benchmark: answers every POST with one fixed chat
completion (and streams a fixed number of chunks when asked). Run: python -m loadtest.stub PORT"""

from __future__ import annotations

import sys

from aiohttp import web

BODY = (b'{"id":"chatcmpl-stub","object":"chat.completion","created":0,"model":"fake-model",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"the quick brown fox jumps over the lazy '
        b'dog"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":9,"total_tokens":14}}')


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
