"""The admin port: /healthz, /readyz and /metrics, plain HTTP on a private address.

One process: the gateway's own registry and readiness. With --workers N the
parent serves it (parent_admin_app): the workers' metrics added up through
prometheus_client's multiprocess folder, and ready only when every worker is.
"""

from __future__ import annotations

import asyncio
import json
import math

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.core.ratelimit import StorageError

PIPELINE = web.AppKey("pipeline", object)


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n", content_type="text/plain")


async def readiness(gateway) -> dict[str, str]:
    """What does not work now, by part: the upstream, the audit log, the rate-limit storage."""
    problems = {}
    checks = [gateway.upstream.ready()]
    if gateway.limiter is not None:
        checks.append(gateway.limiter.ping())
    results = await asyncio.gather(*checks, return_exceptions=True)
    if results[0]:
        problems["upstream"] = str(results[0])
    if len(results) > 1 and isinstance(results[1], (StorageError, Exception)):
        problems["rate_limit"] = str(results[1])
    if gateway.audit is not None and not gateway.audit.healthy:
        problems["audit"] = gateway.audit.problem
    return problems


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[PIPELINE].gateway
    problems = await readiness(gateway)
    gateway.metrics.ready.set(0 if problems else 1)
    body = {"ready": not problems, "problems": problems}
    return web.Response(status=503 if problems else 200, text=json.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    resp = web.Response(body=request.app[PIPELINE].gateway.metrics.render())
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def admin_app(pipeline) -> web.Application:
    app = web.Application()
    app[PIPELINE] = pipeline
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def parent_admin_app(workers_problems) -> web.Application:
    """The admin port of `serve --workers N`: `workers_problems()` names what keeps a worker from ready."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    async def readyz_all(request: web.Request) -> web.Response:
        problems = workers_problems()
        body = {"ready": not problems, "problems": problems}
        return web.Response(status=503 if problems else 200, text=json.dumps(body), content_type="application/json")

    class Present:
        """The workers' metrics without NaN gauge samples: a series a worker removed (metrics.py _replace)."""

        def __init__(self):
            self.inner = multiprocess.MultiProcessCollector(None)

        def collect(self):
            for metric in self.inner.collect():
                if metric.type == "gauge":
                    metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
                yield metric

    async def metrics_all(request: web.Request) -> web.Response:
        registry = CollectorRegistry()
        registry.register(Present())
        resp = web.Response(body=generate_latest(registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz_all)
    app.router.add_get("/metrics", metrics_all)
    return app
