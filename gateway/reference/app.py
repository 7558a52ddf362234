"""The reference Automation API as an aiohttp application (the thin shell).

Routes read and check the request, call the store in its own thread and
answer. Every error is problem+json naming the field at fault; nothing a
client sends can cause a 500 or change stored data when refused.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Awaitable, Callable
from zoneinfo import ZoneInfo

from aiohttp import web

from gateway.core.problem import CONTENT_TYPE as PROBLEM_TYPE
from gateway.core.problem import problem_bytes
from gateway.reference.directory import Directory
from gateway.reference.ldap_directory import DirectoryUnavailable, LdapDirectory
from gateway.reference.documents import DocumentError, SigningIdentity, check_pdf, sign_pdf
from gateway.reference.formdata import BodyError, read_json_object, read_multipart, read_urlencoded
from gateway.reference.forms import FieldError, parse_anonymize, parse_create
from gateway.reference.orders import Conflict, NoSuchSigner
from gateway.reference.store import NotFound, Person, Store

log = logging.getLogger("gateway.reference")

GUID_RE = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9._ -]")


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    timezone: ZoneInfo
    directory: Directory | LdapDirectory
    signing: SigningIdentity
    max_body_bytes: int = 33554432
    # Checks the identity token of a request; raises PermissionError to refuse (401).
    verify_token: Callable[[web.Request], None] | None = None


Clock = Callable[[], float]
HTTPError = (FieldError, BodyError, DocumentError, NotFound, NoSuchSigner, Conflict, DirectoryUnavailable)


def _problem(status: int, slug: str, detail: str, request_id: str, **extra) -> web.Response:
    return web.Response(
        status=status, body=problem_bytes(status, slug, detail, request_id, **extra),
        content_type=PROBLEM_TYPE, headers={"X-Request-ID": request_id},
    )


def _error_response(exc: Exception, request_id: str) -> web.Response:
    if isinstance(exc, FieldError):
        return _problem(exc.status, "invalid-field", f"{exc.field}: {exc.detail}", request_id, field=exc.field)
    if isinstance(exc, DocumentError):
        return _problem(400, "invalid-field", f"upload: {exc}", request_id, field="upload")
    if isinstance(exc, BodyError):
        return _problem(exc.status, exc.slug, exc.detail, request_id)
    if isinstance(exc, DirectoryUnavailable):
        return _problem(503, "directory-unavailable", "the user directory cannot be reached; try again later",
                        request_id)
    if isinstance(exc, (NotFound, NoSuchSigner)):
        return _problem(404, "not-found", str(exc), request_id)
    return _problem(409, "conflict", str(exc), request_id)


@web.middleware
async def _errors(request: web.Request, handler) -> web.StreamResponse:
    response = await _answer(request, handler)
    if not request.content.is_eof():
        # The body was refused unread (413, 415, ...): do not keep reading it to reuse the connection.
        response.force_close()
    return response


async def _answer(request: web.Request, handler) -> web.StreamResponse:
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else str(uuid.uuid4())
    try:
        verify = request.app[SETTINGS].verify_token
        if verify is not None and request.match_info.route.name in API_ROUTES:
            try:
                verify(request)
            except PermissionError as exc:
                return _problem(401, "unauthenticated", str(exc), request_id)
        response = await handler(request)
    except HTTPError as exc:
        if isinstance(exc, DirectoryUnavailable):
            log.warning("user directory unavailable: %s", exc)
        return _error_response(exc, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _problem(exc.status, "http", exc.reason, request_id)
    except asyncio.CancelledError:
        raise
    except Exception:  # never a traceback to the client
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _problem(500, "internal", "the server could not complete the request", request_id)
    response.headers["X-Request-ID"] = request_id
    return response


def order_id(request: web.Request) -> str:
    text = request.match_info["order_id"]
    if not GUID_RE.fullmatch(text):
        raise FieldError("orderId", "is not a GUID")
    return text.lower()


class Handlers:
    def __init__(self, settings: Settings, store: Store, clock: Clock, new_id: Callable[[], str]):
        self.settings, self.store, self.clock, self.new_id = settings, store, clock, new_id
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-store")
        self.signer = settings.signing.signer()

    def run(self, fn, *args) -> Awaitable:
        """Run a store call in the store's one thread: calls are serialized, the loop stays free."""
        return asyncio.get_running_loop().run_in_executor(self.executor, partial(fn, *args))

    async def create_order(self, request: web.Request) -> web.Response:
        s = self.settings
        form = await read_multipart(request, s.max_body_bytes, file_fields=("upload",))
        now = self.clock()
        order = parse_create(form.fields, s.timezone, now)
        uploads = form.files.get("upload", [])
        if len(uploads) != 1:
            raise FieldError("upload", "must appear once" if uploads else "is missing")
        upload = uploads[0]
        await self.run(check_pdf, upload.data)
        solicitor = Person(order.solicitor.source, *await s.directory.resolve("solicitor", order.solicitor))
        signers = [Person(p.source, *await s.directory.resolve("signers", p)) for p in order.signers]
        name = SAFE_NAME_RE.sub("_", upload.filename or "")[:200] or "document.pdf"
        new_id = await self.run(
            self.store.create_order, self.new_id(), order, s.timezone.key, solicitor, signers, name, upload.data, now
        )
        return web.Response(text=new_id, content_type="text/plain")

    async def read_order(self, request: web.Request) -> web.Response:
        return web.json_response(await self.run(self.store.order, order_id(request), self.clock()))

    async def order_state(self, request: web.Request) -> web.Response:
        state = await self.run(self.store.state, order_id(request), self.clock())
        return web.Response(text=state.value, content_type="text/plain")

    async def download_document(self, request: web.Request) -> web.Response:
        doc = await self.run(self.store.document, order_id(request), self.clock())
        return web.Response(
            body=doc.content, content_type="application/pdf",
            headers={"Content-Disposition": f'attachment; filename="{doc.name}"', "ETag": f'"{doc.sha256}"'},
        )

    async def delete_order(self, request: web.Request) -> web.Response:
        await self.run(self.store.delete, order_id(request), self.clock())
        return web.Response(status=204)

    async def anonymize_user(self, request: web.Request) -> web.Response:
        if request.content_type == "application/json":
            body = await read_json_object(request)
            fields = {k: [v] for k, v in body.items()}
        elif request.content_type == "application/x-www-form-urlencoded":
            fields = await read_urlencoded(request)
        else:
            form = await read_multipart(request, 65536, file_fields=())
            fields = form.fields
        target = parse_anonymize(fields)
        if target.person is not None:
            # ldapSearch is looked up as a create's people are: the directory's spelling of the identifier.
            found = await self.settings.directory.lookup("ldapSearch", target.person.source, target.person.identifier)
            if found is not None:
                target = replace(target, person=replace(target.person, identifier=found[0]))
        new_ids = await self.run(self.store.anonymize, target, self.clock())
        return web.json_response({"anonymized": len(new_ids)})

    def _signer_index(self, request: web.Request) -> int:
        text = request.match_info["index"]
        if not text.isascii() or not text.isdigit() or len(text) > 4:
            raise FieldError("index", "must be a signer index: 0, 1, ...")
        return int(text)

    async def sign(self, request: web.Request) -> web.Response:
        oid, index = order_id(request), self._signer_index(request)

        def add_signature(pdf: bytes, i: int, name: str) -> bytes:
            return sign_pdf(pdf, self.signer, f"Signer{i + 1}", name, f"Signer {i + 1} of order {oid}")

        state = await self.run(self.store.sign, oid, index, self.clock(), add_signature)
        return web.Response(text=state.value, content_type="text/plain")

    async def reject(self, request: web.Request) -> web.Response:
        state = await self.run(self.store.reject, order_id(request), self._signer_index(request), self.clock())
        return web.Response(text=state.value, content_type="text/plain")

    async def cancel(self, request: web.Request) -> web.Response:
        state = await self.run(self.store.cancel, order_id(request), self.clock())
        return web.Response(text=state.value, content_type="text/plain")


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("gateway.reference").joinpath("openapi.yaml").read_text(encoding="utf-8")
    return web.Response(text=text, content_type="application/yaml")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok", content_type="text/plain")


async def readyz(request: web.Request) -> web.Response:
    """200 when the user directory answers (an LDAP directory: a bind and a search of its base), else 503."""
    problem = await request.app[SETTINGS].directory.ready()
    problems = {"directory": problem} if problem else {}
    return web.json_response({"ready": not problems, "problems": problems}, status=503 if problems else 200)


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
API_ROUTES = {"create_order", "read_order", "order_state", "download_document", "delete_order", "anonymize_user"}


def create_app(
    settings: Settings, clock: Clock = time.time, new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
) -> web.Application:
    # Bodies are streamed and bounded by the handlers; this bounds anything read whole.
    app = web.Application(middlewares=[_errors], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    store = Store(settings.data_dir / "reference.sqlite3")
    h = Handlers(settings, store, clock, new_id)
    app[STORE] = store
    oid = "/orders/{order_id}"
    app.router.add_post("/orders", h.create_order, name="create_order")
    app.router.add_get(oid, h.read_order, name="read_order", allow_head=False)
    app.router.add_delete(oid, h.delete_order, name="delete_order")
    app.router.add_get(oid + "/state", h.order_state, name="order_state", allow_head=False)
    app.router.add_get(oid + "/document", h.download_document, name="download_document", allow_head=False)
    app.router.add_post("/anonymize", h.anonymize_user, name="anonymize_user")
    app.router.add_post("/workflow" + oid + "/signers/{index}/sign", h.sign)
    app.router.add_post("/workflow" + oid + "/signers/{index}/reject", h.reject)
    app.router.add_post("/workflow" + oid + "/cancel", h.cancel)
    app.router.add_get("/openapi.yaml", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)

    async def close(app: web.Application) -> None:
        h.executor.shutdown(wait=True)
        store.close()
        settings.directory.close()

    app.on_cleanup.append(close)
    return app
