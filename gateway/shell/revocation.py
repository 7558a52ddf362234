"""Online revocation, the I/O part: OCSP answers and CRLs fetched over HTTP, cached, kept across restarts.

A request asks `prepare(chain)` (async) before its identity is checked: it returns
at once when every status it needs is known, and otherwise waits for the one
fetch in flight for that certificate or URL (however many requests wait, one
fetch goes out, with a timeout). `status(chain)` is then the synchronous,
per-request look-up (core.revocation.chain_status). An answer older than
`ocsp_max_age_s` or past its nextUpdate is not used; one nearing that age is
refreshed in the background, so a steady client does not wait.

CRLs: fetched at start, every `refresh_s`, and at once when one in force passes
its nextUpdate, from `crl_urls`, the distribution points of the CAs of
tls.client_ca and those of the client certificates seen. A CRL is taken only as
core.revocation.accept_crl says. Taken CRLs and good OCSP answers are written to
`cache_dir`, and read back (and checked again) on start, so a restart with the
network down still knows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterable

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.core import ocsp
from cachetools import TTLCache

from gateway.core.revocation import (
    GOOD, REVOKED, SKEW_S, UNAVAILABLE, CachedAnswer, FetchedCRL, Status, accept_crl, answer_key, chain_status,
    crl_key, to_check,
)
from gateway.shell import oplog
from gateway.shell.settings import Revocation as Settings

log = logging.getLogger("gateway.revocation")
FETCH_TIMEOUT_S = 5.0
MAX_BYTES = 4 * 1024 * 1024        # a CRL of a large CA is a few MB at most
RETRY_FAILED_S = 10.0              # a responder or URL that failed is not asked again for this long
REFRESH_AHEAD = 0.8                # refresh an answer in the background once it is this old (of max age)
URLS_PER_CERTIFICATE = 4           # distribution points taken from one certificate at most
MAX_URLS = 256                     # CRL URLs fetched at most (crl_urls, the CAs', the clients' certificates')
MAX_ANSWERS = 20_000               # OCSP answers kept at most (the oldest go first)


class RevocationChecker:
    def __init__(self, settings: Settings, metrics, clock: Callable[[], float] = time.time):
        self.settings, self.metrics, self.clock = settings, metrics, clock
        self.crl_check = "leaf"   # tls.crl_check, set with the CAs (start, reload)
        self.cas: tuple[x509.Certificate, ...] = ()
        self.answers: dict[tuple[str, int], CachedAnswer] = {}
        self.crls: dict[tuple[str, str], FetchedCRL] = {}   # (issuer name, CA key id) -> the CRL in force
        # leaf fingerprint -> the rest of its chain, seen at a full handshake: a resumed session shows no chain
        self._chains: TTLCache = TTLCache(maxsize=10_000, ttl=86400)
        self._urls: set[str] = set(settings.crl_urls)
        self._fetched_at: dict[str, float] = {}   # CRL URL -> when last asked (bounded by MAX_URLS)
        self._inflight: dict[object, asyncio.Future] = {}
        self._failed: dict[object, float] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    # -- life --------------------------------------------------------------------------------------

    async def start(self, cas: Iterable[x509.Certificate], crl_check: str) -> None:
        # a connection a fetch: responders such as `openssl ocsp` close after each answer, and a fetch
        # failing on a connection the peer had closed would count as the responder being down
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S),
                                              connector=aiohttp.TCPConnector(force_close=True))
        self.use_cas(cas, crl_check)
        self._read_cache()
        if self.settings.crl_fetch:
            await self._fetch_all()
            self._loop_task = asyncio.get_running_loop().create_task(self._refresh_loop(), name="crl-refresh")

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for fut in list(self._inflight.values()):
            fut.cancel()
        if self._session is not None:
            await self._session.close()

    def use_cas(self, cas: Iterable[x509.Certificate], crl_check: str) -> None:
        """The CAs of tls.client_ca and tls.crl_check in force (start, reload): CRLs are taken only from them."""
        self.cas, self.crl_check = tuple(cas), crl_check
        for ca in self.cas:
            self._add_urls(ocsp.crl_urls(ca))
        self._wake.set()

    def _add_urls(self, urls: list[str]) -> list[str]:
        """Remember a certificate's distribution points (a few, and a bounded number in all); the new ones."""
        new = [u for u in urls[:URLS_PER_CERTIFICATE] if u not in self._urls]
        new = new[:max(0, MAX_URLS - len(self._urls))]
        self._urls.update(new)
        return new

    def _complete(self, chain: tuple[x509.Certificate, ...]) -> tuple[x509.Certificate, ...]:
        """The chain, with what a full handshake of the same certificate showed when a resumed one shows less."""
        fingerprint = chain[0].fingerprint(_SHA256) if chain else b""
        if len(chain) >= 2:
            if self._chains.get(fingerprint) != chain[1:]:
                self._chains[fingerprint] = chain[1:]
            return chain
        rest = self._chains.get(fingerprint)
        return chain + rest if rest else chain

    # -- per request -------------------------------------------------------------------------------

    async def prepare(self, chain: tuple[x509.Certificate, ...]) -> None:
        """Make sure what `status(chain)` needs is known, fetching (once, shared) what is not."""
        chain = self._complete(chain)
        now = self.clock()
        waits = []
        if self.settings.ocsp != "off":
            for cert, issuer in to_check(chain, self.settings.ocsp):
                key = answer_key(cert, issuer)
                answer = self.answers.get(key) or self._from_saved(key, cert, issuer, now)
                if answer is not None and answer.usable(now, self.settings.ocsp_max_age_s):
                    if now - answer.fetched_at > REFRESH_AHEAD * self.settings.ocsp_max_age_s:
                        self._single(key, lambda c=cert, i=issuer: self._ask_ocsp(c, i))   # in the background
                    continue
                waits.append(self._single(key, lambda c=cert, i=issuer: self._ask_ocsp(c, i)))
        if self.settings.crl_fetch:
            for cert, issuer in to_check(chain, self.crl_check):
                crl = self.crls.get(crl_key(cert, issuer))
                if crl is not None and crl.current(now):
                    continue
                own = ocsp.crl_urls(cert)[:URLS_PER_CERTIFICATE]
                self._add_urls(own)
                # its own distribution points, else the configured ones: never every URL known
                for url in [u for u in own if u in self._urls] or list(self.settings.crl_urls):
                    # at once when the CRL in force has just gone stale; else not more than once in a while
                    last = self._fetched_at.get(url, -1e18)
                    if now - last >= RETRY_FAILED_S or (crl is not None and crl.next_update is not None
                                                        and last < crl.next_update):
                        waits.append(self._single(url, lambda u=url: self._fetch_crl(u)))
        waits = [w for w in waits if w is not None]
        if waits:
            await asyncio.gather(*(asyncio.shield(w) for w in waits), return_exceptions=True)

    def status(self, chain: tuple[x509.Certificate, ...], since: float | None = None) -> Status:
        """Where the chain stands now; `since`: when the request called prepare (core.revocation.chain_status)."""
        return chain_status(self._complete(chain), self.clock(), ocsp=self.settings.ocsp, max_age_s=self.settings.ocsp_max_age_s,
                            answers=self.answers, crl_fetch=self.settings.crl_fetch, crl_check=self.crl_check,
                            crls=self.crls, since=since)

    # -- fetching, one at a time per key -----------------------------------------------------------

    def _single(self, key: object, fetch: Callable[[], Awaitable[bool]],
                after_failure: bool = False) -> asyncio.Future | None:
        """The fetch in flight for `key`, or a new one; None when `key` failed a moment ago (requests do not
        each wait for a responder that is down), unless `after_failure` (the periodic refresh)."""
        fut = self._inflight.get(key)
        if fut is not None:
            return fut
        if not after_failure and self.clock() - self._failed.get(key, -1e18) < RETRY_FAILED_S:
            return None

        async def run() -> bool:
            ok = False
            try:
                ok = await fetch()
            finally:
                # out of the table before the task completes: a request that finds it there must get the
                # answer it is about to bring, not one a done task brought earlier
                self._inflight.pop(key, None)
                if ok:
                    self._failed.pop(key, None)
                elif len(self._failed) < MAX_ANSWERS:
                    self._failed[key] = self.clock()
            return ok

        task = self._inflight[key] = asyncio.get_running_loop().create_task(run())
        return task

    async def _get(self, url: str, body: bytes | None = None) -> bytes:
        assert self._session is not None
        if body is None:
            request = self._session.get(url)
        else:
            request = self._session.post(url, data=body, headers={"Content-Type": "application/ocsp-request"})
        async with request as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
            data = bytearray()
            async for chunk in resp.content.iter_chunked(65536):   # read() with a size gives one read only
                data += chunk
                if len(data) > MAX_BYTES:
                    raise OSError("answer too large")
            return bytes(data)

    async def _ask_ocsp(self, cert: x509.Certificate, issuer: x509.Certificate) -> bool:
        urls = [self.settings.ocsp_url] if self.settings.ocsp_url else ocsp.responder_urls(cert)[:2]
        key = answer_key(cert, issuer)
        what = f"{cert.subject.rfc4514_string()} (serial {cert.serial_number:x})"
        if not urls:
            self._count("ocsp", UNAVAILABLE)
            self._note("ocsp_unavailable", what, "the certificate names no OCSP responder (set ocsp_url)")
            return False
        for url in urls:
            try:
                data = await self._get(url, ocsp.request_der(cert, issuer))
                break
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                failure = f"{url}: {type(exc).__name__} {exc}".strip()
        else:
            self._count("ocsp", UNAVAILABLE)
            self._note("ocsp_unavailable", what, failure)
            return False
        now = self.clock()
        answer = ocsp.check_response(data, cert, issuer, now)
        if answer.status != "error" and answer.next_update is None and answer.this_update is not None \
                and now - answer.this_update > self.settings.ocsp_max_age_s + SKEW_S:
            # no nextUpdate: its thisUpdate says how old it is (an old answer replayed looks like any other)
            answer = ocsp.Answer("error", "stale: no nextUpdate, and thisUpdate older than ocsp_max_age_s")
        if answer.status == "error":
            self._count("ocsp", "error")
            self._note("ocsp_refused", what, answer.reason)
            return False
        if len(self.answers) >= MAX_ANSWERS:
            del self.answers[next(iter(self.answers))]
        self.answers.pop(key, None)
        self.answers[key] = CachedAnswer(answer.status, now, answer.next_update, data)
        self._count("ocsp", {GOOD: GOOD, REVOKED: REVOKED}.get(answer.status, UNAVAILABLE))
        if answer.status != "unknown":
            self._write(_answer_file(key), data)
        return True

    def _from_saved(self, key, cert, issuer, now: float) -> CachedAnswer | None:
        """An answer kept in cache_dir by an earlier run, checked again as if just fetched."""
        path = Path(self.settings.cache_dir) / _answer_file(key)
        try:
            data, fetched_at = path.read_bytes(), path.stat().st_mtime
        except OSError:
            return None
        answer = ocsp.check_response(data, cert, issuer, now)
        if answer.status not in (GOOD, REVOKED):
            return None
        cached = self.answers[key] = CachedAnswer(answer.status, fetched_at, answer.next_update, data)
        return cached

    async def _fetch_crl(self, url: str) -> bool:
        self._fetched_at[url] = self.clock()
        try:
            data = await self._get(url)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            self._count("crl_fetch", UNAVAILABLE)
            self._note("crl_unavailable", url, f"{type(exc).__name__} {exc}".strip())
            return False
        return self._take(data, url)

    def _take(self, data: bytes, where: str, count: bool = True) -> bool:
        crl, why = accept_crl(data, self.cas, self.crls.get, self.clock())
        if crl is None:
            if count:
                self._count("crl_fetch", "error")
                self._note("crl_refused", where, why)
            return False
        self.crls[(crl.issuer, crl.issuer_key)] = crl
        if count:
            self._count("crl_fetch", GOOD)
            self._write(f"crl-{_digest(crl.issuer + crl.issuer_key)}.der", crl.der)
        self._publish(crl)
        self._wake.set()
        return True

    async def _fetch_all(self) -> None:
        """Every URL known, each through the same one-at-a-time table as the requests' fetches."""
        waits = [self._single(u, lambda u=u: self._fetch_crl(u), after_failure=True) for u in sorted(self._urls)]
        await asyncio.gather(*(asyncio.shield(w) for w in waits if w is not None), return_exceptions=True)

    async def _refresh_loop(self) -> None:
        """Every refresh_s, and as soon as a CRL in force passes its nextUpdate."""
        while True:
            now = self.clock()
            due = [c.next_update for c in self.crls.values() if c.next_update is not None and c.next_update > now]
            wait = min([self.settings.refresh_s, *(d - now + 1 for d in due)])
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(1.0, wait))
                continue   # new CAs or a new CRL: recompute when to fetch next
            try:
                await self._fetch_all()
            except Exception:  # the loop must outlive any one bad fetch
                log.exception("fetching CRLs failed")

    def publish(self) -> None:
        """Put each fetched CRL's period (back) into the expiry gauges, which a reload clears."""
        for crl in self.crls.values():
            self._publish(crl)

    def _publish(self, crl: FetchedCRL) -> None:
        if crl.next_update is not None:
            self.metrics.set_crl(f"crl_fetch:{crl.issuer}", crl.this_update, crl.next_update)

    # -- cache_dir ---------------------------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        """Atomically, readable by the gateway's user only (what it reads back it checks again)."""
        folder = Path(self.settings.cache_dir)
        tmp = folder / f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, folder / name)
        except OSError as exc:
            self._note("revocation_cache_unwritable", str(folder), str(exc))
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _read_cache(self) -> None:
        folder = Path(self.settings.cache_dir)
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("crl-*.der")):
            try:
                self._take(path.read_bytes(), str(path), count=False)
            except Exception as exc:  # noqa: BLE001 - a bad file in the cache must not stop the gateway
                self._note("revocation_cache_unreadable", str(path), f"{type(exc).__name__}: {exc}")

    # -- telling ---------------------------------------------------------------------------------

    def _count(self, method: str, result: str) -> None:
        self.metrics.revocation_checks.labels(method, result).inc()

    @staticmethod
    def _note(event: str, what: str, why: str) -> None:
        oplog.event(event, subject=what, reason=why)


_SHA256 = hashes.SHA256()


def _answer_file(key: tuple[str, int]) -> str:
    return f"ocsp-{_digest(repr(key))}.der"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]
