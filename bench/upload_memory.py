"""Peak memory (RSS) of `gateway serve` while a 30 MB PDF goes up through it and comes back down.

Starts its own gateway (`python -m gateway serve`, embedded reference API) in a
temporary folder with a dev PKI and one policy for hr-system, then, over mTLS:
one small warm-up order (upload + download), the baseline RSS, then POST /orders
with a 30 MB PDF streamed from a file on disk and GET /orders/{id}/document read
in chunks, checked by SHA-256 and size. A background thread samples the gateway
process's VmRSS (/proc/<pid>/status; not its reference-API child) every ~20 ms.
Prints baseline, peak and growth in MB (2**20 bytes) against the aim (growth
under 40 MB), and upload and download times and MB/s. Exits 1 if the round trip
fails (a missed aim is only printed). All traffic stays on 127.0.0.1.

    python bench/upload_memory.py [--size-mb 30] [--aim-mb 40]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.tools import certs  # noqa: E402
from gateway.reference.documents import sample_pdf  # noqa: E402
from support import client_ssl, free_port, poll_ready, stop  # noqa: E402

MB = 1024 * 1024
SOLICITOR = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'
FIELDS = {"title": "Upload memory benchmark", "dueDate": "2099-12-24T00:00:00", "solicitor": SOLICITOR,
          "signers": '{"source":"EXTERNAL","identifier":"198603052385","attributes":{}}'}
GUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
READY_DEADLINE_S = 60.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=300)
POLICY = {"client": "hr-system", "match": {"common_name": "hr-system"},
          "allow": ["create_order", "download_document"],
          "solicitors": [{"source": "INTERNAL", "identifier": "sAMAccountName=*"}]}


def write_config(tmp: Path) -> tuple[Path, int, int]:
    """A dev PKI, policies/hr-system.yaml and config.yaml on free ports; returns (config, port, admin port)."""
    certs.init(tmp / "pki", ["hr-system"])
    (tmp / "policies").mkdir()
    (tmp / "policies" / "hr-system.yaml").write_text(json.dumps(POLICY))
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port},
        "admin": {"host": "127.0.0.1", "port": admin},
        "tls": {"cert": "pki/server.crt", "key": "pki/server.key", "client_ca": "pki/ca.crt", "crl": "pki/crl.pem"},
        "policies": "policies",
        "upstream": {"url": "embedded", "timeout_s": 60},
        "reference_api": {"listen": f"127.0.0.1:{free_port()}", "data_dir": "data",
                          "directory": str(ROOT / "directory.yaml")},
        "audit": {"path": "data/audit.jsonl"},
        "limits": {"max_body_bytes": 64 * MB, "header_timeout_s": 10, "request_timeout_s": 300},
        "identity_token": {"key": "data/identity-token.key", "audience": "automation-api", "ttl_s": 60},
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    return path, port, admin


def wait_ready(proc: subprocess.Popen, log: Path, admin: int, port: int, ctx: ssl.SSLContext) -> None:
    """Poll the admin /healthz, then an mTLS handshake on the front door, until the deadline."""
    def probe() -> None:
        urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=2).close()
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            ctx.wrap_socket(raw, server_hostname="localhost").close()

    try:
        poll_ready("gateway", proc, probe, READY_DEADLINE_S, log)
    except RuntimeError as exc:
        sys.exit(str(exc))


def vm_rss(pid: int) -> int:
    """Resident set size of one process (not its children), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RSSSampler(threading.Thread):
    """VmRSS of one process every ~20 ms; `peak` and `samples` count since the last reset()."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stopping = pid, threading.Event()
        self.peak, self.samples = vm_rss(pid), 0

    def reset(self) -> int:
        self.peak, self.samples = vm_rss(self.pid), 0
        return self.peak

    def run(self) -> None:
        while not self.stopping.wait(0.02):
            try:
                rss = vm_rss(self.pid)
            except (OSError, RuntimeError):
                return  # the process is gone
            self.peak, self.samples = max(self.peak, rss), self.samples + 1


async def round_trip(session: aiohttp.ClientSession, url: str, pdf_file: Path) -> tuple[float, float]:
    """POST /orders with the file streamed from disk, GET its document back; (upload s, download s)."""
    form = aiohttp.FormData()
    for name, value in FIELDS.items():
        form.add_field(name, value)
    t0 = time.perf_counter()
    with pdf_file.open("rb") as f:  # aiohttp's file payload reads it in chunks
        form.add_field("upload", f, filename=pdf_file.name, content_type="application/pdf")
        async with session.post(url + "/orders", data=form) as resp:
            order_id = (await resp.text()).strip()
    if resp.status != 200 or not GUID_RE.fullmatch(order_id):
        raise RuntimeError(f"POST /orders: HTTP {resp.status}: {order_id[:300]}")
    t1 = time.perf_counter()
    digest, size = hashlib.sha256(), 0
    async with session.get(f"{url}/orders/{order_id}/document") as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET document: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for chunk in resp.content.iter_chunked(256 * 1024):
            digest.update(chunk)
            size += len(chunk)
    t2 = time.perf_counter()
    want = (hashlib.sha256(pdf_file.read_bytes()).hexdigest(), pdf_file.stat().st_size)
    if (digest.hexdigest(), size) != want:
        raise RuntimeError(f"downloaded {size} bytes sha256 {digest.hexdigest()}, uploaded {want[1]} bytes {want[0]}")
    return t1 - t0, t2 - t1


async def bench(tmp: Path, port: int, sampler: RSSSampler, big: Path) -> dict:
    (small := tmp / "small.pdf").write_bytes(sample_pdf(100_000))
    url = f"https://localhost:{port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl(tmp / "pki", "hr-system")),
                                     timeout=REQUEST_TIMEOUT) as session:
        await round_trip(session, url, small)  # warm-up: connections, code paths, the upstream pool
        baseline = sampler.reset()
        up, down = await round_trip(session, url, big)
        peak = max(sampler.peak, vm_rss(sampler.pid))  # and one reading after the last byte
    return {"baseline": baseline, "peak": peak, "samples": sampler.samples, "up": up, "down": down}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=30, help="PDF size in MiB (default 30)")
    parser.add_argument("--aim-mb", type=float, default=40.0, help="aim for the RSS growth in MB (default 40)")
    args = parser.parse_args()
    if not 1 <= args.size_mb <= 60:
        parser.error("--size-mb must be 1..60 (limits.max_body_bytes is 64 MiB)")
    with tempfile.TemporaryDirectory(prefix="bench-upload-memory-") as name:
        tmp = Path(name)
        config, port, admin = write_config(tmp)
        log, big = tmp / "gateway.log", tmp / "upload.pdf"
        big.write_bytes(sample_pdf(args.size_mb * MB))  # written before the gateway starts
        mb = big.stat().st_size / MB
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(config)],
                                    cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        sampler = RSSSampler(proc.pid)
        try:
            wait_ready(proc, log, admin, port, client_ssl(tmp / "pki", "hr-system"))
            sampler.start()
            print(f"gateway pid {proc.pid} on https://localhost:{port}: a {mb:.1f} MB PDF up and down")
            try:
                r = asyncio.run(bench(tmp, port, sampler, big))
            except Exception as exc:  # the round trip failed: say why, exit 1
                print(f"FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
        finally:
            sampler.stopping.set()
            stop(proc, timeout_s=20)
    growth = (r["peak"] - r["baseline"]) / MB
    print(f"baseline RSS: {r['baseline'] / MB:8.1f} MB")
    print(f"peak RSS:     {r['peak'] / MB:8.1f} MB  ({r['samples']} samples)")
    print(f"growth:       {growth:8.1f} MB")
    print(f"aim: growth under {args.aim_mb:g} MB: {'PASS' if growth < args.aim_mb else 'FAIL'}")
    print(f"upload:   {r['up']:6.2f} s  {mb / r['up']:7.1f} MB/s")
    print(f"download: {r['down']:6.2f} s  {mb / r['down']:7.1f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
