"""The admin port: /healthz, /readyz and /metrics, plain HTTP on a private address."""

from __future__ import annotations

import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

PIPELINE = web.AppKey("pipeline", object)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n", content_type="text/plain")


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[PIPELINE].gateway
    problems = {}
    why = await gateway.upstream.ready()
    if why:
        problems["upstream"] = why
    status = 503 if problems else 200
    body = {"ready": not problems, "problems": problems}
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=generate_latest())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def admin_app(pipeline) -> web.Application:
    app = web.Application()
    app[PIPELINE] = pipeline
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
