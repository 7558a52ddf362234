"""The request pipeline: the one handler of the front door's aiohttp low-level server.

identity (peers.py) -> operation (core.operations) -> the decision sequence
(core.decide), driven with the rate limit, the request body and the upstream ->
forward. This module moves bytes and turns refusals into problem+json answers;
what to decide is the core's. Every answer, allowed or refused, leaves an
Exchange behind; the metrics count it and the audit log records it, the line
on disk before the answer's first byte.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, Generator

import aiohttp
from aiohttp import web
from aiohttp.helpers import parse_mimetype
from multidict import CIMultiDict

from gateway.core.audit import completed, record_of
from gateway.core.decide import Need, NeedFields, NeedOrderSolicitor, Verdict, evaluate
from gateway.core.errors import CREDENTIAL_REASONS, Reason, Refusal
from gateway.core.exchange import Exchange
from gateway.core.headers import REQUEST_ID_HEADER, client_response_headers, has_body, upstream_request_headers
from gateway.core.operations import Operation, Route, created_order_id, route
from gateway.core.policy import Policy
from gateway.core.problem import CONTENT_TYPE as PROBLEM_TYPE
from gateway.core.problem import problem_bytes, slug_of
from gateway.core.ratelimit import StorageError, limits_for, refused_limits
from gateway.runtime.deadlines import Deadlines
from gateway.runtime.peers import admit_peer, peer_of
from gateway.runtime.snapshot import Gateway
from gateway.shell.audit_writer import AuditUnavailable
from gateway.shell.body import CHUNK, Spool, anonymize_fields, form_fields
from gateway.shell.compat import BodyFramingError
from gateway.shell.oplog import Summary

log = logging.getLogger("gateway.pipeline")
ANONYMIZE_LIMIT = 65536
# refusals not counted against a rate limit: a certificate that no longer holds (its connection is closed),
# and the gateway's own failures
UNCOUNTED = CREDENTIAL_REASONS | {Reason.AUDIT_UNAVAILABLE, Reason.RATELIMIT_STORAGE}
ANONYMIZE_TYPES = frozenset({"multipart/form-data", "application/x-www-form-urlencoded", "application/json"})
SMALL_BODY = 65536  # answers up to this size are read whole and sent in one write
AUDIT_WAIT_S = 3.0  # how long an answer waits for its audit line (a few retries of a failed write)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def request_id() -> str:
    """A random (version 4) UUID, as str(uuid.uuid4()) gives it, in half its time."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"


def expects_continue(request: web.BaseRequest) -> bool:
    """Whether the client waits for 100 Continue; any expectation but a lone 100-continue is 417."""
    values = request.headers.getall("Expect", ())
    if not values:
        return False
    if len(values) == 1 and values[0].strip().lower() == "100-continue":
        return request.version >= (1, 1)  # HTTP/1.0 clients do not wait (RFC 9110 10.1.1)
    raise Refusal(417, Reason.BAD_EXPECT, "the only expectation this server meets is a lone 100-continue")


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


def problem_response(ex: Exchange, status: int, detail: str) -> web.Response:
    resp = web.Response(status=status, body=problem_bytes(status, slug_of(status), detail, ex.request_id),
                        content_type=PROBLEM_TYPE)
    resp.headers[REQUEST_ID_HEADER] = ex.request_id
    return resp


class Pipeline:
    def __init__(self, gateway: Gateway):
        self.gateway = gateway
        self.upstream_errors = Summary("upstream_error")
        self.unsent = Summary("answer_not_sent")   # answers held back because their audit line failed
        self.deadlines = Deadlines()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        gw = self.gateway  # one consistent view for the whole request, even across a reload
        ex = Exchange(request_id(), request.method, request.raw_path, request.remote)
        spool: list[Spool] = []
        streamed: list[web.StreamResponse] = []
        deadline = self.deadlines.start(gw.config.limits.request_timeout_s)
        try:
            try:
                if gw.revocation is not None:   # fetch what the identity check will need, if it is not known
                    ex.revocation_since = gw.clock()
                    await self._revocation_known(gw, request)
                policy, rt, waits = self._admit(gw, request, ex)
                verdict = await self._decide(gw, request, ex, policy, rt, waits, spool)
                ex.decision, ex.would_deny = "allow", verdict.would_deny
                ex.reason = verdict.reason if verdict.would_deny else "allowed by policy"
                # the body may have taken a while: the credentials must still hold, under the trust
                # in force now (a reload may have come in between), when the request goes upstream;
                # a client that has left meanwhile is gone, not refused
                if request.transport is None:
                    raise ConnectionResetError("the client closed the connection")
                admit_peer(self.gateway, request.transport, ex)
                response = await self._forward(gw, request, ex, rt, spool[0] if spool else None, streamed)
            except asyncio.CancelledError as exc:
                if deadline.settle():
                    raise TimeoutError from exc
                raise
            except Refusal as refusal:
                if ex.limited:
                    raise
                raise await self._count_refused(gw, ex, refusal) from None
            finally:
                self.deadlines.end(deadline)
        except Refusal as exc:
            ex.refused(exc.status, exc.code, exc.detail)
            ex.close = ex.close or exc.close
            if exc.code in (Reason.UPSTREAM_UNAVAILABLE, Reason.UPSTREAM_TIMEOUT):
                # one detailed line for each distinct cause (a refused TLS handshake, a refused connection)
                self.upstream_errors.add(exc.code, key=exc.cause, detail=exc.detail,
                                         **({"cause": exc.cause} if exc.cause else {}))
            response = problem_response(ex, exc.status, exc.detail)
            if exc.headers:
                response.headers.update(exc.headers)
        except TimeoutError:
            if streamed:  # the answer's head has left: all that can be done is cut it
                self._cut(gw, request, ex, "request timeout while sending the response")
                return streamed[0]
            status, why = (504, "upstream timeout") if ex.decision == "allow" else (408, "request timeout")
            ex.refused(status, Reason.TIMEOUT, why)
            response = problem_response(ex, status, why)
        except asyncio.CancelledError:
            # the client went away, or the drain on SIGTERM ran out: audited all the same
            if streamed:
                self._cut(gw, request, ex, "cancelled while sending the response")
            else:
                ex.refused(ex.status or 499, Reason.CANCELLED, "cancelled before the answer was complete")
                self._unanswered(gw, ex)
            raise
        except ConnectionError:
            # the client went away mid-request (aiohttp fails the body it was sending): nobody to answer
            ex.refused(499, Reason.CLIENT_GONE, "the client closed the connection before its answer")
            self._unanswered(gw, ex)
            request.protocol.force_close()
            return web.Response(status=400)  # never sent: the connection is gone
        except Exception:  # never a traceback to the client
            log.exception("unexpected error in %s %s", request.method, request.raw_path)
            ex.refused(500, Reason.INTERNAL, "internal error")
            response = problem_response(ex, 500, "the gateway could not complete the request")
        finally:
            if spool:
                spool[0].close()
        if streamed:
            return response  # streamed: sent, and its completion recorded, by _forward
        if ex.limit_headers:
            response.headers.update(ex.limit_headers)
        if not request.content.is_eof() or ex.close:
            response.force_close()  # a refused body is not read on just to reuse the connection
        ex.bytes_out, ex.complete = len(response.body), True
        if request.transport is None or request.transport.is_closing():
            # the client left while its answer was made (the upstream may have acted all the same)
            ex.reason = f"the client closed the connection before its answer (status {ex.status} was not sent)"
            ex.refused(499, Reason.CLIENT_GONE, ex.reason)
            self._unanswered(gw, ex)
            return response
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
        ex = Exchange(request_id(), request.method, request.raw_path, request.remote)
        try:
            admit_peer(gw, request.transport, ex)  # identity first, even for a request that does not parse
        except Refusal as exc:
            ex.refused(exc.status, exc.code, exc.detail)
            detail = exc.detail
        else:
            ex.refused(status, Reason.BAD_HTTP, f"malformed HTTP request: {message}"[:200])
            detail = "the request is not valid HTTP"
        body = problem_bytes(ex.status, slug_of(ex.status), detail, ex.request_id)
        ex.bytes_out, ex.complete = len(body), True
        response = _AuditedOnPrepare(lambda: self._answered(gw, request, ex), status=ex.status, body=body,
                                     content_type=PROBLEM_TYPE)
        response.headers[REQUEST_ID_HEADER] = ex.request_id
        return response

    # -- what happened: metrics and the audit log ------------------------------------

    async def _answered(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> bool:
        """The answer is decided: count it, and put its audit line on disk before its first byte leaves.

        False when the line could not be written in time: then no byte of the answer may leave,
        so the connection is closed instead, and a second line records that nothing was sent.
        """
        if not ex.streamed:
            gw.metrics.observe(ex)  # a streamed answer is counted once it is over
        if gw.audit is None:
            return True
        record = record_of(ex, time.time(), ex.duration)
        if ex.code is Reason.AUDIT_UNAVAILABLE:
            # The one answer that cannot wait for its line: the log is what is broken. Its line is
            # queued and written, in chain order, once the log can be written again.
            gw.audit.submit(record, summarisable=True)
            return True
        try:
            await gw.audit.commit(record, min(gw.config.limits.request_timeout_s, AUDIT_WAIT_S))
            return True
        except AuditUnavailable as exc:
            self.unsent.add("audit_unavailable", detail=f"an answer was not sent: {exc}")
            ex.complete, ex.bytes_out = False, 0
            ex.reason = "not sent: its audit line could not be written"
            gw.audit.submit(completed(ex, time.time(), ex.duration))
            if ex.streamed:
                gw.metrics.observe(ex)  # counted here: its stream never starts
            request.protocol.force_close()
            return False

    def _unanswered(self, gw: Gateway, ex: Exchange) -> None:
        """No answer will be sent (the client left, or the drain ran out): counted and recorded all the same."""
        ex.complete = False
        gw.metrics.observe(ex)
        if gw.audit is not None:
            gw.audit.submit(record_of(ex, time.time(), ex.duration))

    def _streamed(self, gw: Gateway, ex: Exchange) -> None:
        """A streamed answer is over (whole or cut): count it and record how it ended."""
        gw.metrics.observe(ex)
        if gw.audit is not None:
            gw.audit.submit(completed(ex, time.time(), ex.duration))

    def _cut(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, why: str) -> None:
        """Too late for a problem answer: cut the connection so the client sees a broken body."""
        ex.complete, ex.reason = False, why
        if request.transport is not None:
            request.transport.close()
        self._streamed(gw, ex)

    # -- identity, operation, the decision ----------------------------------------------

    @staticmethod
    async def _revocation_known(gw: Gateway, request: web.BaseRequest) -> None:
        """tls.revocation: wait for the connection's OCSP answers and CRLs only when none usable is known."""
        peer = peer_of(request.transport)
        standing = peer.standing(gw) if peer is not None else None
        if standing is not None and standing.fixed is None and standing.chain:
            await gw.revocation.prepare(standing.chain)

    def _admit(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> tuple[Policy, Route, bool]:
        """Identity, operation, expectation: in that order, for every request target.

        Returns the policy, the route and whether the client waits for 100 Continue.
        """
        ex.waiting = "Expect" in request.headers
        policy = admit_peer(gw, request.transport, ex)
        if gw.audit is not None and not gw.audit.healthy:
            raise Refusal(503, Reason.AUDIT_UNAVAILABLE, "the audit log cannot be written, so nothing is served")
        if request.version not in ((1, 1), (1, 0)):
            raise Refusal(505, Reason.BAD_HTTP,
                          f"HTTP/{request.version[0]}.{request.version[1]} is not served; use HTTP/1.1", close=True)
        rt = route(request.method, request.raw_path)
        if rt is None:
            raise Refusal(404, Reason.NO_OPERATION, f"no operation {request.method} {request.raw_path}"[:300])
        ex.operation, ex.order_id = rt.operation.value, rt.order_id
        if "Upgrade" in request.headers:
            # aiohttp would hand the rest of the stream over as this request's body: never forwarded
            raise Refusal(400, Reason.BAD_REQUEST, "protocol upgrades are not supported", close=True)
        return policy, rt, expects_continue(request)

    async def _decide(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, policy: Policy, rt: Route,
                      waits: bool, spool: list[Spool]) -> Verdict:
        """Drive core.decide.evaluate: the operation first, then the rate limit, then the facts it needs."""
        steps: Generator[Need, Any, Verdict] = evaluate(policy, rt)
        try:
            need = next(steps)
        except StopIteration as done:
            return self._verdict(ex, done.value)
        await self._limit(gw, ex, policy, rt)  # the operation is admitted: now it counts
        while True:
            if need.would_deny:  # report mode: counted even if the request is refused below
                ex.would_deny, ex.reason = need.would_deny, need.would_deny_reason
            if isinstance(need, NeedOrderSolicitor):
                if has_body(request.headers):
                    raise Refusal(400, Reason.BAD_REQUEST, f"{rt.operation.value} takes no request body")
                answer = await gw.orders.solicitor(need.order_id, policy.client, self._lookup_headers(gw, request, ex))
            else:
                answer = await self._fields(gw, request, ex, policy, rt, waits, need, spool)
            try:
                need = steps.send(answer)
            except StopIteration as done:
                return self._verdict(ex, done.value)

    @staticmethod
    def _verdict(ex: Exchange, verdict: Verdict) -> Verdict:
        ex.solicitor = verdict.solicitor or ex.solicitor
        if verdict.would_deny:
            ex.would_deny, ex.reason = verdict.would_deny, verdict.reason
        if not verdict.allow:
            raise Refusal(verdict.status, verdict.code, verdict.reason)
        return verdict

    async def _limit(self, gw: Gateway, ex: Exchange, policy: Policy, rt: Route) -> None:
        """The client's and the operation's rate limits, before any body is read."""
        ex.limited = True
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
            raise Refusal(503, Reason.RATELIMIT_STORAGE, "the rate-limit storage is unavailable") from None
        ex.limit_headers = verdict.headers()
        if not verdict.allowed:
            raise Refusal(429, Reason.RATE_LIMITED, f"rate limit of client {policy.client} exceeded",
                          headers=ex.limit_headers)

    async def _count_refused(self, gw: Gateway, ex: Exchange, refusal: Refusal) -> Refusal:
        """A request refused before its operation was admitted counts against its client's limit all the
        same (a certificate of no policy against the shared one), so that refusals cannot flood the audit
        log: past the limit the refusal becomes a 429. A storage that fails leaves the refusal as it was."""
        ex.limited = True
        if gw.limiter is None or ex.identity is None or refusal.code in UNCOUNTED:
            return refusal
        policy = None if refusal.code is Reason.UNKNOWN_CLIENT else gw.policies.by_client.get(ex.client)
        try:
            verdict = await gw.limiter.check(refused_limits(policy))
        except Exception as exc:  # noqa: BLE001 - a refusal is answered and audited whatever the storage does
            if not isinstance(exc, StorageError):
                log.warning("counting a refusal against its rate limit failed (%s); answered as it was",
                            type(exc).__name__)
            return refusal
        ex.limit_headers = verdict.headers()
        if verdict.allowed:
            return refusal
        who = f"client {policy.client}" if policy is not None else "certificates that map to no client policy"
        return Refusal(429, Reason.RATE_LIMITED, f"rate limit of {who} exceeded", headers=ex.limit_headers,
                       close=refusal.close)

    async def _fields(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, policy: Policy, rt: Route,
                      waits: bool, need: NeedFields, spool: list[Spool]) -> dict[str, list[Any]]:
        """The body's form fields, read as the upstream reads them (the body is kept for forwarding)."""
        content_types = request.headers.getall("Content-Type", [])
        if len(content_types) != 1:
            raise Refusal(415 if not content_types else 400, Reason.BAD_BODY, "exactly one Content-Type is needed")
        if any(v.strip().lower() != "identity" for v in request.headers.getall("Content-Encoding", [])):
            raise Refusal(415, Reason.BAD_BODY, "compressed request bodies are not accepted")
        limit = gw.config.limits.max_body_bytes
        if rt.operation is Operation.CREATE_ORDER:
            mime = parse_mimetype(content_types[0])
            if (mime.type, mime.subtype) != ("multipart", "form-data") or not mime.parameters.get("boundary"):
                raise Refusal(415, Reason.BAD_BODY, "create_order needs a multipart/form-data body")
            if policy.max_upload_bytes:
                limit = min(limit, policy.max_upload_bytes)
        else:
            if request.content_type not in ANONYMIZE_TYPES:
                raise Refusal(415, Reason.BAD_BODY, "anonymize_user needs a multipart/form-data, urlencoded or JSON body")
            limit = min(limit, ANONYMIZE_LIMIT)
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(413, Reason.BODY_TOO_LARGE, f"the body is larger than {limit} bytes")
        body = Spool(limit)
        spool.append(body)  # closed by handle() whatever happens
        if waits:  # admitted so far: now, and only now, ask for the body
            await request.writer.write(CONTINUE)
        ex.waiting = False
        try:
            await body.fill(request.content.iter_chunked(CHUNK))
        except BodyFramingError as exc:
            raise Refusal(400, Reason.BAD_BODY, f"the request body's framing is malformed: {exc}"[:200],
                          close=True) from None
        finally:
            ex.bytes_in = body.size  # what arrived, also when the client hangs up half-way
        if need.names is not None:
            return await form_fields(body, content_types[0], need.names)
        return await anonymize_fields(body, content_types[0], request.content_type)

    # -- forwarding ----------------------------------------------------------------

    def _token(self, gw: Gateway, ex: Exchange) -> str | None:
        if gw.tokens is None or ex.identity is None:
            return None
        return gw.tokens.token(ex.client, ex.identity.fingerprint_sha256)

    def _lookup_headers(self, gw: Gateway, request: web.BaseRequest, ex: Exchange) -> dict[str, str]:
        """The gateway's own order look-up: none of the client's headers (a conditional one would
        make an existing order answer 304 or 412 where an absent one answers 404)."""
        return upstream_request_headers((), request_id=ex.request_id, client_ip=request.remote or "",
                                        token=self._token(gw, ex))

    async def _forward(self, gw: Gateway, request: web.BaseRequest, ex: Exchange, rt: Route,
                       spool: Spool | None, streamed: list[web.StreamResponse]) -> web.StreamResponse:
        headers = upstream_request_headers(request.headers.items(), request_id=ex.request_id,
                                           client_ip=request.remote or "", token=self._token(gw, ex))
        started = time.perf_counter()
        upstream = await gw.upstream.send(
            request.method, rt.upstream_path, headers,
            body=spool.chunks() if spool is not None else None,
            length=spool.size if spool is not None else None,
        )
        async with upstream:
            ex.upstream_seconds = time.perf_counter() - started
            ex.status = upstream.status
            if rt.operation is Operation.DELETE_ORDER and upstream.status < 300:
                gw.orders.forget(rt.order_id)
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
                    raise Refusal(504, Reason.UPSTREAM_TIMEOUT, "the upstream did not finish its answer in time") from None
                except aiohttp.ClientError:
                    raise Refusal(502, Reason.UPSTREAM_UNAVAILABLE, "the upstream's answer broke off") from None
                if created:
                    ex.order_id = created_order_id(body)  # the audit line names the new order
                    if ex.order_id is not None:  # a look-up of this id may have been cached as absent
                        gw.orders.forget(ex.order_id)
                return web.Response(status=upstream.status, body=body, headers=headers)
            response = web.StreamResponse(status=upstream.status, headers=headers)
            if length is not None:
                response.content_length = length
            streamed.append(response)
            ex.streamed, ex.complete, ex.bytes_out = True, None, length or 0
            if not await self._answered(gw, request, ex):
                return response
            ex.bytes_out = 0
            try:
                await response.prepare(request)
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
