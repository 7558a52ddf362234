"""A real OCSP responder for tests: `openssl ocsp` serving an OpenSSL CA index file on loopback.

The responder is OpenSSL's own, so the gateway's OCSP client is checked against responses it did
not build itself. OpenSSL reads the index only when it starts, so `revoke` rewrites it and
restarts the process on the same port. By default it signs with a delegated responder
certificate (id-kp-OCSPSigning) issued by the CA, as most deployments do.

    with OcspResponder(tmp_path, ca_cert, ca_key) as responder:
        cert, key = responder.issue("crm")          # listed as valid, AIA pointing at responder.url
        der = responder.query(cert)                 # the DER response to an OCSP POST
        responder.revoke(cert.serial_number)        # now answers "revoked"

or `OcspResponder.with_new_ca(dir)`, or the `ocsp_responder` fixture (import it into the test module
with `# noqa: F401`), both with a fresh CA of their own.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from conftest import free_port, need_programs, stop_process
from gateway.core.ocsp import request_der
from gateway.tools import pki

START_DEADLINE_S = 10.0


def _index_time(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).strftime("%y%m%d%H%M%SZ")


def _index_serial(serial: int) -> str:
    """The serial as OpenSSL looks it up (BN_bn2hex): upper-case hex of whole bytes."""
    text = f"{serial:X}"
    return text if len(text) % 2 == 0 else "0" + text


class OcspResponder:
    """`openssl ocsp -index` on 127.0.0.1:`port`, for the CA `ca_cert`; files live in `dir`.

    `signer` is the (cert, key) that signs responses: by default a fresh delegated responder
    certificate; pass the CA's own pair to have the CA sign. `next_update_minutes` sets nextUpdate
    (`-nmin`); by default it is a day ahead (`-ndays 1`).
    """

    def __init__(self, dir: Path, ca_cert: x509.Certificate, ca_key, *,
                 signer: tuple[x509.Certificate, object] | None = None, next_update_minutes: int | None = None,
                 port: int | None = None):
        need_programs("openssl")
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_cert, self.ca_key = ca_cert, ca_key
        self.port = port or free_port()
        self.next_update_minutes = next_update_minutes
        now = pki._now()
        self.signer = signer or pki.make_ocsp_responder((ca_cert, ca_key), now - pki._BACKDATE,
                                                        now + dt.timedelta(days=30))
        pki.write_pem(self.dir / "ca.crt", ca_cert)
        pki.write_pem(self.dir / "responder.crt", self.signer[0])
        pki.write_pem(self.dir / "responder.key", self.signer[1])
        self._entries: dict[int, tuple[x509.Certificate, dt.datetime | None]] = {}
        self._proc: subprocess.Popen | None = None
        self._write_index()

    @classmethod
    def with_new_ca(cls, dir: Path, **kw) -> OcspResponder:
        """A responder (not started) for a fresh CA of its own, `.ca_cert` and `.ca_key`."""
        now = pki._now()
        ca_cert, ca_key = pki.make_ca("OCSP test CA", not_before=now - pki._BACKDATE,
                                      not_after=now + dt.timedelta(days=30))
        return cls(dir, ca_cert, ca_key, **kw)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    # -- the index --------------------------------------------------------------

    def add(self, cert: x509.Certificate) -> None:
        """List `cert` as valid (restarting a running responder so that it reads the index again)."""
        self._entries[cert.serial_number] = (cert, None)
        self._changed()

    def issue(self, name: str, *, listed: bool = True, **kw) -> tuple[x509.Certificate, object]:
        """A client certificate from the CA whose AIA names this responder; listed as valid unless told not."""
        now = pki._now()
        kw.setdefault("not_before", now - pki._BACKDATE)
        kw.setdefault("not_after", now + dt.timedelta(days=30))
        cert, key = pki.make_client_cert(self.ca_cert, self.ca_key, name, ocsp_url=self.url, **kw)
        if listed:
            self.add(cert)
        return cert, key

    def revoke(self, serial: int, when: dt.datetime | None = None) -> None:
        """Mark the listed certificate `serial` revoked (at `when`, default now) and restart."""
        cert, _ = self._entries[serial]
        self._entries[serial] = (cert, when or pki._now())
        self._changed()

    def _changed(self) -> None:
        self._write_index()
        if self._proc is not None:
            self.stop()
            self.start()

    def _write_index(self) -> None:
        lines = []
        for serial, (cert, revoked_at) in self._entries.items():
            status, rev = ("V", "") if revoked_at is None else ("R", _index_time(revoked_at))
            # The subject column must be unique among valid entries (OpenSSL's unique_subject): add the serial.
            subject = "".join(f"/{a.rfc4514_attribute_name}={a.value}" for a in cert.subject)
            lines.append(f"{status}\t{_index_time(cert.not_valid_after_utc)}\t{rev}\t{_index_serial(serial)}"
                         f"\tunknown\t{subject}/serialNumber={_index_serial(serial)}\n")
        pki._write_atomic(self.dir / "index.txt", "".join(lines).encode(), 0o644)

    # -- the process ------------------------------------------------------------

    def start(self) -> OcspResponder:
        """Start `openssl ocsp` and return once its port accepts connections."""
        if self._proc is not None:
            return self
        validity = ["-nmin", str(self.next_update_minutes)] if self.next_update_minutes else ["-ndays", "1"]
        log = open(self.dir / "openssl.log", "ab")  # a file, not a pipe nobody reads that could fill up
        try:
            self._proc = subprocess.Popen(
                ["openssl", "ocsp", "-index", "index.txt", "-port", str(self.port), "-rsigner", "responder.crt",
                 "-rkey", "responder.key", "-CA", "ca.crt", *validity, "-ignore_err", "-timeout", "5"],
                cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while True:
            try:
                # A whole request, not a bare connect: OpenSSL 3.0's responder spins on a connection
                # closed before sending anything. The responder's own certificate is never listed: "unknown".
                self._post(request_der(self.signer[0], self.ca_cert), timeout_s=2)
                return
            except OSError:
                pass
            try:  # waiting on the process is the pause between tries, and notices it dying
                self._proc.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
            else:
                log = (self.dir / "openssl.log").read_text(errors="replace")
                self._proc = None
                raise AssertionError(f"openssl ocsp exited: {log[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"openssl ocsp did not listen on port {self.port} within {START_DEADLINE_S}s")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); the files stay."""
        if self._proc is not None:
            stop_process(self._proc, timeout_s=5)
            self._proc = None

    def __enter__(self) -> OcspResponder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- asking -----------------------------------------------------------------

    def query(self, cert: x509.Certificate, issuer: x509.Certificate | None = None) -> bytes:
        """POST an OCSP request for `cert` and return the DER response, as an OCSP client would."""
        return self._post(request_der(cert, issuer or self.ca_cert))

    def _post(self, body: bytes, timeout_s: float = 10) -> bytes:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/ocsp-request"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            assert resp.headers.get("Content-Type") == "application/ocsp-response", resp.headers
            return resp.read()


@pytest.fixture
def ocsp_responder(tmp_path: Path) -> Iterator[OcspResponder]:
    """A running responder with a fresh CA of its own (`.ca_cert`, `.ca_key`); stopped after the test."""
    with OcspResponder.with_new_ca(tmp_path / "ocsp") as responder:
        yield responder
