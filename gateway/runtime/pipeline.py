"""The request pipeline as one aiohttp handler: the shell around the core.

identity -> client policy -> operation -> decision (with the facts read from
the body or the upstream) -> forward. Every step is a call into the core
(identity, policy, operations, multipart, headers); this module only moves
bytes and turns refusals into problem+json answers. Every answer, allowed or
refused, leaves an Exchange behind for the audit log and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from aiohttp import web
from aiohttp.helpers import parse_mimetype
from cryptography import x509
from multidict import CIMultiDict

from gateway.core.audit import completed, record_of
from gateway.shell.audit_writer import AuditUnavailable, AuditWriter
from gateway.shell.compat import BodyFramingError, verified_chain
from gateway.shell.settings import Config
from gateway.core.credentials import Standing, Trust
from gateway.core.headers import REQUEST_ID_HEADER, client_response_headers, has_body, upstream_request_headers
from gateway.core.identity import Identity, identity_from_der
from gateway.shell.body import CHUNK, BodyRefused, Spool, anonymize_fields, form_fields, json_value
from gateway.core.operations import ORDER_SCOPED, Operation, Route, route
from gateway.core.policy import (
    Decision, Policy, PolicySet, decide_anonymize, decide_operation, decide_order_scope, decide_solicitor,
)
from gateway.core.problem import CONTENT_TYPE as PROBLEM_TYPE
from gateway.shell.oplog import Summary
from gateway.core.problem import problem_bytes
from gateway.core.ratelimit import StorageError, Storage, limits_for
from gateway.shell.metrics import Metrics
from gateway.shell.token import TokenIssuer
from gateway.shell.upstream import Upstream, UpstreamTimeout, UpstreamUnavailable

log = logging.getLogger("gateway.pipeline")
ANONYMIZE_LIMIT = 65536
ANONYMIZE_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded", "application/json"})
SMALL_BODY = 65536  # answers up to this size are read whole and sent in one write
AUDIT_WAIT_S = 3.0  # how long an answer waits for its audit line (a few retries of a failed write)


@dataclass
class Exchange:
    """What happened to one request: the facts the audit line and the metrics are made of."""

    request_id: str
    method: str
    path: str
    remote: str | None
    started: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    client: str = "unknown"
    operation: str | None = None
    order_id: str | None = None
    solicitor: dict | None = None
    decision: str = "deny"
    reason: str = ""
    code: str = ""                  # fixed reason code of a denial (metrics label)
    would_deny: str | None = None   # report mode: the code of the denial that was not enforced
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float | None = None
    limit_headers: dict[str, str] | None = None
    response: web.StreamResponse | None = None   # a streamed answer (its head decided)
    complete: bool | None = None                 # the last byte left; None while a stream is under way
    close: bool = False                          # close the connection after this answer
    waiting: bool = False                        # the client may hold its body back for 100 Continue


@dataclass
class Gateway:
    """What the pipeline works with; replaced whole on reload (the services in it are kept)."""

    config: Config
    policies: PolicySet
    upstream: Upstream
    tokens: TokenIssuer | None
    metrics: Metrics
    audit: AuditWriter | None = None
    limiter: Storage | None = None
    trust: Trust | None = None                 # client CAs and CRLs in force: checked on every request
    tls_context: ssl.SSLContext | None = None  # the context new handshakes get (the trust's generation)
    clock: Callable[[], float] = time.time


class Refused(Exception):
    """Answer with a problem instead of forwarding; `code` is the fixed reason code."""

    def __init__(self, status: int, reason: str, code: str, headers: dict[str, str] | None = None):
        self.status, self.reason, self.code, self.headers = status, reason, code, headers
        super().__init__(reason)


_SLUGS = {400: "bad-request", 403: "forbidden", 404: "not-found", 408: "request-timeout", 413: "body-too-large",
          415: "unsupported-media-type", 417: "expectation-failed", 429: "rate-limited", 500: "internal",
          502: "bad-gateway", 503: "unavailable", 504: "gateway-timeout", 505: "http-version-not-supported"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Peer:
    """A connection's client certificate: parsed once, its standing rebuilt once per trust generation."""

    __slots__ = ("identity", "cert", "presented", "handshake_context", "_trust", "_standing", "__weakref__")

    def __init__(self, der: bytes, chain: list[bytes], handshake_context: ssl.SSLContext | None):
        self.identity = identity_from_der(der)
        self.cert = x509.load_der_x509_certificate(der)
        self.presented = tuple(x509.load_der_x509_certificate(c) for c in chain[1:])
        self.handshake_context = handshake_context
        self._trust: Trust | None = None
        self._standing: Standing | None = None

    def standing(self, gw: Gateway) -> Standing | None:
        if gw.trust is None:
            return None
        if self._trust is not gw.trust:
            self._standing = gw.trust.standing(self.cert, self.presented, self.handshake_context is gw.tls_context)
            self._trust = gw.trust
        return self._standing


_peers: "weakref.WeakKeyDictionary[Any, Peer]" = weakref.WeakKeyDictionary()


def peer_of(transport) -> Peer | None:
    """The connection's verified client certificate (None when there is none), parsed once a connection."""
    if transport is None:
        return None
    peer = _peers.get(transport)
    if peer is None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None
        peer = _peers[transport] = Peer(der, verified_chain(ssl_object), transport.get_extra_info("sslcontext"))
    return peer


def admit_peer(gw: Gateway, transport, ex: Exchange) -> Policy:
    """Identity first, on every request: a certificate that still holds and maps to one policy, else 403.

    A certificate that no longer holds (expired, revoked, its CRL stale, its CA no
    longer trusted) also closes the connection, so a resumed session cannot linger.
    """
    peer = peer_of(transport)
    if peer is None:
        ex.close = True
        raise Refused(403, "no verified client certificate", "no_certificate")
    ex.identity = peer.identity
    policy, why = gw.policies.find(peer.identity)
    if policy is not None:
        ex.client = policy.client  # named in the audit line and metrics even when refused below
    standing = peer.standing(gw)
    problem = standing.problem(gw.clock()) if standing is not None else None
    if problem is not None:
        ex.close = True
        raise Refused(403, problem.reason, problem.code)
    if policy is None:
        raise Refused(403, why, "unknown_client")
    return policy


def expects_continue(request: web.BaseRequest) -> bool:
    """Whether the client waits for 100 Continue; any expectation but a lone 100-continue is 417."""
    values = request.headers.getall("Expect", ())
    if not values:
        return False
    if len(values) == 1 and values[0].strip().lower() == "100-continue":
        return request.version >= (1, 1)  # HTTP/1.0 clients do not wait (RFC 9110 10.1.1)
    raise Refused(417, "the only expectation this server meets is a lone 100-continue", "bad_expect")


class _AuditedOnPrepare(web.Response):
    """An answer built by aiohttp's synchronous error hook: its audit line is written when it is sent."""

    def __init__(self, before_send, **kwargs):
        super().__init__(**kwargs)
        self._before_send = before_send

    async def prepare(self, request):
        before, self._before_send = self._before_send, None
        if before is not None and not await before():
            raise ConnectionResetError("the audit line could not be written: nothing is sent")
        return await super().prepare(request)


def problem_response(ex: Exchange, status: int, slug: str, detail: str) -> web.Response:
    resp = web.Response(status=status, body=problem_bytes(status, slug, detail, ex.request_id),
                        content_type=PROBLEM_TYPE)
    resp.headers[REQUEST_ID_HEADER] = ex.request_id
    return resp


class Pipeline:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.upstream_errors = Summary("upstream_error")

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gw = self.gateway  # one consistent view for the whole request, even across a reload
        ex = Exchange(str(uuid.uuid4()), request.method, request.raw_path, request.remote)
        spool: Spool | None = None
        try:
            async with asyncio.timeout(gw.config.limits.request_timeout_s):
                policy, rt, waits = self._admit(gw, request, ex)
                await self._limit(gw, ex, policy, rt)
                spool = await self._inspect(gw, request, ex, policy, rt, waits)
                # the body may have taken a while: the credentials must still hold, under the trust
                # in force now (a reload may have come in between), when the request goes upstream
                admit_peer(self.gateway, request.transport, ex)
                response = await self._forward(gw, request, ex, rt, spool)
        except Refused as exc:
            ex.status, ex.reason, ex.code = exc.status, exc.reason, exc.code
            if exc.code.startswith("upstream"):
                self.upstream_errors.add(exc.code, detail=exc.reason)
            response = problem_response(ex, exc.status, _SLUGS.get(exc.status, "denied"), exc.reason)
            if exc.headers:
                response.headers.update(exc.headers)
        except TimeoutError:
            if ex.response is not None:  # the answer's head has left: all that can be done is cut it
                self._cut(gw, request, ex, "request timeout while sending the response")
                return ex.response
            ex.status, ex.reason = (504, "upstream timeout") if ex.decision == "allow" else (
                408, "request timeout")
            ex.code = "timeout"
            response = problem_response(ex, ex.status, _SLUGS[ex.status], ex.reason)
        except asyncio.CancelledError:
            # the client went away, or the drain on SIGTERM ran out: audited all the same
            if ex.response is not None:
                self._cut(gw, request, ex, "cancelled while sending the response")
            else:
                ex.status, ex.reason, ex.code = ex.status or 499, "cancelled before the answer was complete", "cancelled"
                ex.complete = False
                self._count(gw, ex)
                if gw.audit is not None:
                    gw.audit.submit(record_of(ex, time.time(), time.perf_counter() - ex.started))
            raise
        except ConnectionError:
            # the client went away mid-request (aiohttp fails the body it was sending): nobody to answer
            ex.status, ex.reason, ex.code = 499, "the client closed the connection before its answer", "client_gone"
            ex.complete = False
            self._count(gw, ex)
            if gw.audit is not None:
                gw.audit.submit(record_of(ex, time.time(), time.perf_counter() - ex.started))
            request.protocol.force_close()
            return web.Response(status=400)  # never sent: the connection is gone
        except Exception:  # never a traceback to the client
            log.exception("unexpected error in %s %s", request.method, request.raw_path)
            ex.status, ex.reason, ex.code = 500, "internal error", "internal"
            response = problem_response(ex, 500, "internal", "the gateway could not complete the request")
        finally:
            if spool is not None:
                spool.close()
        if ex.response is not None:
            return response  # streamed: sent, and its completion recorded, by _forward
        if ex.limit_headers:
            response.headers.update(ex.limit_headers)
        if not request.content.is_eof() or ex.close:
            response.force_close()  # a refused body is not read on just to reuse the connection
        ex.bytes_out, ex.complete = len(response.body), True
        if not await self._answered(gw, request, ex):
            return response  # its line could not be written: the connection is closed, nothing is sent
        if ex.waiting and not request.content.is_eof():
            # Refused before the body was asked for: the client holds it back, so there is nothing
            # to linger for (aiohttp would wait for it). Answer, then close at once.
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
        return response

    def http_error(self, request: web.BaseRequest, status: int, message: str) -> web.Response:
        """A request aiohttp's parser refused: answered as problem+json and audited like any other."""
        gw = self.gateway
        ex = Exchange(str(uuid.uuid4()), request.method, request.raw_path, request.remote)
        try:
            admit_peer(gw, request.transport, ex)  # identity first, even for a request that does not parse
        except Refused as exc:
            status, ex.code, ex.reason, detail = exc.status, exc.code, exc.reason, exc.reason
        else:
            ex.code, ex.reason = "bad_http", f"malformed HTTP request: {message}"[:200]
            detail = "the request is not valid HTTP"
        ex.status = status
        body = problem_bytes(status, _SLUGS.get(status, "bad-request"), detail, ex.request_id)
        ex.bytes_out, ex.complete = len(body), True
        response = _AuditedOnPrepare(lambda: self._answered(gw, request, ex), status=status, body=body,
                                     content_type=PROBLEM_TYPE)
        response.headers[REQUEST_ID_HEADER] = ex.request_id
        return response

    def _count(self, gw: Gateway, ex: Exchange) -> None:
        duration = time.perf_counter() - ex.started
        m, op = gw.metrics, ex.operation or "none"
        m.requests.labels(ex.client, op, str(ex.status)).inc()
        m.duration.labels(op).observe(duration)
        if ex.decision == "deny":
            m.denied.labels(ex.client, ex.code or "denied").inc()
        if ex.would_deny:
            m.would_deny.labels(ex.client, ex.would_deny).inc()
        if ex.code == "rate_limited":
            m.rate_limited.labels(ex.client, op).inc()
        if ex.upstream_seconds is not None:
            m.upstream_duration.labels(op).observe(ex.upstream_seconds)

    async def _answered(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> bool:
        """The answer is decided: count it, and put its audit line on disk before its first byte leaves.

        False when the line could not be written in time: then no byte of the answer may leave,
        so the connection is closed instead, and a second line records that nothing was sent.
        """
        if ex.response is None:
            self._count(gw, ex)  # a streamed answer is counted once it is over
        if gw.audit is None:
            return True
        record = record_of(ex, time.time(), time.perf_counter() - ex.started)
        if ex.code == "audit_unavailable":
            # The one answer that cannot wait for its line: the log is what is broken. Its line is
            # queued and written, in chain order, once the log can be written again.
            gw.audit.submit(record)
            return True
        try:
            await gw.audit.commit(record, min(gw.config.limits.request_timeout_s, AUDIT_WAIT_S))
            return True
        except AuditUnavailable as exc:
            log.error("audit: no answer sent to request %s: %s", ex.request_id, exc)
            ex.complete, ex.bytes_out = False, 0
            ex.reason = "not sent: its audit line could not be written"
            gw.audit.submit(completed(ex, time.time(), time.perf_counter() - ex.started))
            request.protocol.force_close()
            return False

    def _streamed(self, gw: Gateway, ex: Exchange) -> None:
        """A streamed answer is over (whole or cut): count it and record how it ended."""
        self._count(gw, ex)
        if gw.audit is not None:
            gw.audit.submit(completed(ex, time.time(), time.perf_counter() - ex.started))

    def _cut(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, why: str) -> None:
        """Too late for a problem answer: cut the connection so the client sees a broken body."""
        ex.complete, ex.reason = False, why
        if request.transport is not None:
            request.transport.close()
        self._streamed(gw, ex)

    # -- identity, client, operation ------------------------------------------

    def _admit(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> tuple[Policy, Route, bool]:
        """Identity, operation, expectation, policy: in that order, for every request target.

        Returns the policy, the route and whether the client waits for 100 Continue.
        """
        ex.waiting = "Expect" in request.headers
        policy = admit_peer(gw, request.transport, ex)
        if gw.audit is not None and not gw.audit.healthy:
            raise Refused(503, "the audit log cannot be written, so nothing is served", "audit_unavailable")
        if request.version not in ((1, 1), (1, 0)):
            ex.close = True
            raise Refused(505, f"HTTP/{request.version[0]}.{request.version[1]} is not served; use HTTP/1.1",
                          "bad_http")
        rt = route(request.method, request.raw_path)
        if rt is None:
            raise Refused(404, f"no operation {request.method} {request.raw_path}"[:300], "no_operation")
        ex.operation, ex.order_id = rt.operation.value, rt.order_id
        if "Upgrade" in request.headers:
            # aiohttp would hand the rest of the stream over as this request's body: never forwarded
            ex.close = True
            raise Refused(400, "protocol upgrades are not supported", "bad_request")
        waits = expects_continue(request)
        self._require(decide_operation(policy, rt.operation), policy, ex)
        return policy, rt, waits

    @staticmethod
    def _require(decision: Decision, policy: Policy, ex: Exchange) -> None:
        """Enforce a policy decision; in report mode a refusal is only noted and the call goes on."""
        if decision.allow:
            return
        if policy.mode == "report" and decision.status in (403, 404):
            ex.would_deny = decision.code
            ex.reason = f"would deny: {decision.reason}"
            return
        raise Refused(decision.status, decision.reason, decision.code)

    async def _limit(self, gw: Gateway, ex: Exchange, policy: Policy, rt: Route) -> None:
        """The client's and the operation's rate limits, before any body is read."""
        if gw.limiter is None:
            return
        cells = limits_for(policy, rt.operation)
        if not cells:
            return
        try:
            verdict = await gw.limiter.check(cells)
        except StorageError as exc:
            if gw.config.rate_limit.on_storage_error == "allow":
                log.warning("%s; allowing (on_storage_error: allow)", exc)
                return
            raise Refused(503, "the rate-limit storage is unavailable", "ratelimit_storage") from None
        ex.limit_headers = verdict.headers()
        if not verdict.allowed:
            raise Refused(429, f"rate limit of client {policy.client} exceeded", "rate_limited",
                          headers=ex.limit_headers)

    # -- facts from the body or the upstream ------------------------------------

    async def _inspect(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, policy: Policy,
                       rt: Route, waits: bool) -> Spool | None:
        op = rt.operation
        if op not in (Operation.CREATE_ORDER, Operation.ANONYMIZE_USER):
            if has_body(request.headers):
                raise Refused(400, f"{op.value} takes no request body", "bad_request")
            if op in ORDER_SCOPED:
                try:
                    solicitor = await gw.upstream.order_solicitor(rt.order_id, self._lookup_headers(gw, request, ex))
                except UpstreamUnavailable as exc:
                    raise Refused(502, str(exc), "upstream_unavailable") from None
                except UpstreamTimeout as exc:
                    raise Refused(504, str(exc), "upstream_timeout") from None
                ex.solicitor = solicitor
                self._require(decide_order_scope(policy, solicitor), policy, ex)
            ex.decision = "allow"
            ex.reason = ex.reason or "allowed by policy"
            return None

        content_types = request.headers.getall("Content-Type", [])
        if len(content_types) != 1:
            raise Refused(415 if not content_types else 400, "exactly one Content-Type is needed", "bad_body")
        if any(v.strip().lower() != "identity" for v in request.headers.getall("Content-Encoding", [])):
            raise Refused(415, "compressed request bodies are not accepted", "bad_body")
        limit = gw.config.limits.max_body_bytes
        if op is Operation.CREATE_ORDER:
            mime = parse_mimetype(content_types[0])
            if (mime.type, mime.subtype) != ("multipart", "form-data") or not mime.parameters.get("boundary"):
                raise Refused(415, "create_order needs a multipart/form-data body", "bad_body")
            if policy.max_upload_bytes:
                limit = min(limit, policy.max_upload_bytes)
        else:
            if request.content_type not in ANONYMIZE_TYPES:
                raise Refused(415, "anonymize_user needs a multipart/form-data, urlencoded or JSON body", "bad_body")
            limit = min(limit, ANONYMIZE_LIMIT)
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, f"the body is larger than {limit} bytes", "body_too_large")
        spool = Spool(limit)
        try:
            if waits:  # admitted so far: now, and only now, ask for the body
                await request.writer.write(CONTINUE)
            ex.waiting = False
            await spool.fill(request.content.iter_chunked(CHUNK))
            ex.bytes_in = spool.size
            if op is Operation.CREATE_ORDER:
                fields = await form_fields(spool, content_types[0], ("solicitor",))
                values = [json_value(v) for v in fields.get("solicitor", [])]
                if len(values) == 1 and isinstance(values[0], dict):
                    ex.solicitor = {"source": values[0].get("source"), "identifier": values[0].get("identifier")}
                self._require(decide_solicitor(policy, values), policy, ex)
            else:
                fields = await anonymize_fields(spool, content_types[0], request.content_type)
                self._require(decide_anonymize(policy, fields), policy, ex)
        except BodyRefused as exc:
            spool.close()
            raise Refused(exc.status, exc.reason, "body_too_large" if exc.status == 413 else "bad_body") from None
        except BodyFramingError as exc:
            spool.close()
            ex.close = True
            raise Refused(400, f"the request body's framing is malformed: {exc}"[:200], "bad_body") from None
        except BaseException:  # refused, timed out, client gone: the spool's file goes now
            spool.close()
            raise
        ex.decision = "allow"
        ex.reason = ex.reason or "allowed by policy"
        return spool

    # -- forwarding ----------------------------------------------------------------

    def _lookup_headers(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> dict[str, str]:
        """The gateway's own order look-up: none of the client's headers (a conditional one would
        make an existing order answer 304 or 412 where an absent one answers 404)."""
        token = None
        if gw.tokens is not None and ex.identity is not None:
            token = gw.tokens.token(ex.client, ex.identity.fingerprint_sha256)
        return upstream_request_headers((), request_id=ex.request_id, client_ip=request.remote or "", token=token)

    def _headers(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> dict[str, str]:
        token = None
        if gw.tokens is not None and ex.identity is not None:
            token = gw.tokens.token(ex.client, ex.identity.fingerprint_sha256)
        return upstream_request_headers(
            request.headers.items(), request_id=ex.request_id, client_ip=request.remote or "", token=token,
        )

    async def _forward(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, rt: Route,
                       spool: Spool | None) -> web.StreamResponse:
        headers = self._headers(gw, request, ex)
        started = time.perf_counter()
        try:
            upstream = await gw.upstream.send(
                request.method, rt.upstream_path, headers,
                body=spool.chunks() if spool is not None else None,
                length=spool.size if spool is not None else None,
            )
        except UpstreamUnavailable as exc:
            raise Refused(502, str(exc), "upstream_unavailable") from None
        except UpstreamTimeout as exc:
            raise Refused(504, str(exc), "upstream_timeout") from None
        async with upstream:
            ex.upstream_seconds = time.perf_counter() - started
            ex.status = upstream.status
            if rt.operation is Operation.DELETE_ORDER and upstream.status < 300:
                gw.upstream.forget_order(rt.order_id)
            created = rt.operation is Operation.CREATE_ORDER and upstream.status < 300
            headers = CIMultiDict(client_response_headers(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers
            ))
            headers[REQUEST_ID_HEADER] = ex.request_id
            if ex.limit_headers:
                headers.update(ex.limit_headers)
            length = upstream.content_length
            if length is not None and length <= SMALL_BODY:
                # Small answers go out in one write, headers and body together.
                try:
                    body = await upstream.read()
                except TimeoutError:
                    raise Refused(504, "the upstream did not finish its answer in time", "upstream_timeout") from None
                except aiohttp.ClientError:
                    raise Refused(502, "the upstream's answer broke off", "upstream_unavailable") from None
                ex.bytes_out = len(body)
                if created:  # a look-up of this id may have been cached as absent
                    gw.upstream.forget_order(body.decode("latin-1").strip().lower())
                return web.Response(status=upstream.status, body=body, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            if length is not None:
                response.content_length = length
            ex.response, ex.complete, ex.bytes_out = response, None, length or 0
            if not await self._answered(gw, request, ex):
                return response
            ex.bytes_out = 0
            await response.prepare(request)
            try:
                async for chunk in upstream.iter_chunks(CHUNK):
                    ex.bytes_out += len(chunk)
                    await response.write(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, TimeoutError) as exc:
                if isinstance(exc, ConnectionError):  # aiohttp's own: writing to a client that left
                    self._cut(gw, request, ex, "the client went away during the transfer")
                else:
                    self._cut(gw, request, ex, "the upstream failed during the transfer")
                return response
            except ConnectionError:
                self._cut(gw, request, ex, "the client went away during the transfer")
                return response
            ex.complete = True
            self._streamed(gw, ex)
        return response
