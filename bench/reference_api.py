"""Throughput and latency of the reference Automation API, measured by hand.

Three phases over keep-alive connections with C concurrent workers: GET /healthz
(baseline: a trivial aiohttp endpoint on the same server), POST /orders (N orders,
each with a 100 KB PDF and a future dueDate), GET /orders/{id}/state (N reads of
those orders). Prints req/s and p50/p99 latency per phase, orders created per second
and the state-reads/healthz ratio; exits non-zero if any response was wrong.

    python bench/reference_api.py [--requests N] [--concurrency C] [--url URL]

Without --url it starts its own `gateway reference-api` on a free 127.0.0.1 port
(temporary config and data folder) and stops it at the end; --url must be local.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from gateway.reference.documents import sample_pdf  # noqa: E402
from support import free_port, poll_ready, stop  # noqa: E402

SOLICITOR = '{"source":"INTERNAL","identifier":"sAMAccountName=cborgstrom","attributes":{}}'
SIGNER_EXTERNAL = ('{"source":"EXTERNAL","identifier":"198603052385","attributes":'
                   '{"mail":{"value":"anna@example.org"},"mobile":{"value":"+46700000000"}}}')
FUTURE_DUE = "2099-12-24T00:00:00"
GUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
STATES = {"PENDING", "ACCEPTED", "REJECTED", "CANCELLED", "EXPIRED"}
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)
PHASE_DEADLINE_S = 300.0
READY_DEADLINE_S = 30.0


def wait_ready(url: str, proc: subprocess.Popen | None, log: Path | None) -> None:
    """Poll GET {url}/healthz until it answers 200, the server exits, or the deadline passes."""
    try:
        poll_ready("reference API", proc, lambda: urllib.request.urlopen(url + "/healthz", timeout=2).close(),
                   READY_DEADLINE_S, log)
    except RuntimeError as exc:
        sys.exit(str(exc))


def start_server(tmp: Path) -> tuple[str, subprocess.Popen, Path]:
    """Run `gateway reference-api` with config.yaml's reference_api section, data in `tmp`."""
    ref = dict(yaml.safe_load((ROOT / "config.yaml").read_text(encoding="utf-8"))["reference_api"])
    port = free_port()
    ref.update(listen=f"127.0.0.1:{port}", data_dir=str(tmp / "data"),
               directory=str(ROOT / "directory.yaml"))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"reference_api": ref}), encoding="utf-8")
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "reference-api", "-c", str(config)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", proc, log


class Phase:
    def __init__(self, name: str):
        self.name, self.latencies, self.errors, self.elapsed = name, [], [], 0.0

    def pct(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] * 1000 if xs else float("nan")

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def report(self) -> None:
        print(f"{self.name:<15} {len(self.latencies):>6} ok {len(self.errors):>4} failed  "
              f"{self.rate:9.1f} req/s  p50 {self.pct(50):8.2f} ms  p99 {self.pct(99):8.2f} ms")
        for err in self.errors[:5]:
            print(f"    {err}")


async def run_phase(phase: Phase, n: int, concurrency: int, one) -> list:
    """Call `one(i)` for i in range(n) from `concurrency` workers; results in order (None if failed)."""
    results: list = [None] * n
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            try:
                results[i] = await one(i)
            except Exception as exc:  # a failed request is counted, never fatal
                phase.errors.append(f"#{i}: {type(exc).__name__}: {exc}"[:300])
                continue
            phase.latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), PHASE_DEADLINE_S)
    except asyncio.TimeoutError:
        phase.errors.append(f"phase stopped after {PHASE_DEADLINE_S:.0f}s")
    phase.elapsed = time.perf_counter() - t0
    return results


async def expect(resp: aiohttp.ClientResponse, status: int, check) -> str:
    text = await resp.text()  # every response's status and body are checked
    if resp.status != status or not check(text):
        raise RuntimeError(f"HTTP {resp.status}: {text[:200]}")
    return text


async def bench(url: str, n: int, concurrency: int) -> list[Phase]:
    pdf = sample_pdf(100_000)
    connector = aiohttp.TCPConnector(limit=concurrency)  # keep-alive: connections are reused
    async with aiohttp.ClientSession(url, connector=connector, timeout=REQUEST_TIMEOUT) as session:

        async def healthz(i: int) -> str:
            async with session.get("/healthz") as resp:
                return await expect(resp, 200, lambda t: t == "ok")

        async def create(i: int) -> str:
            form = aiohttp.FormData()
            for name, value in (("title", f"Benchmark order {i}"), ("description", "reference API benchmark"),
                                ("dueDate", FUTURE_DUE), ("solicitor", SOLICITOR),
                                ("signers", SOLICITOR), ("signers", SIGNER_EXTERNAL)):
                form.add_field(name, value)
            form.add_field("upload", pdf, filename="bench.pdf", content_type="application/pdf")
            async with session.post("/orders", data=form) as resp:
                return await expect(resp, 200, GUID_RE.fullmatch)

        await run_phase(Phase("warm-up"), concurrency * 4, concurrency, healthz)  # open the connections
        base, creates, reads = Phase("GET /healthz"), Phase("POST /orders"), Phase("GET .../state")
        await run_phase(base, n, concurrency, healthz)
        ids = [i for i in await run_phase(creates, n, concurrency, create) if i]

        async def state(i: int) -> str:  # the orders created above, round robin if some failed
            async with session.get(f"/orders/{ids[i % len(ids)]}/state") as resp:
                return await expect(resp, 200, lambda t: t in STATES)

        if ids:
            await run_phase(reads, n, concurrency, state)
        else:
            reads.errors.append("no order was created, nothing to read")
        return [base, creates, reads]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500, help="orders to create, states to read (default 500)")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent workers (default 8)")
    parser.add_argument("--url", help="an already running reference API on 127.0.0.1 (default: start one)")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be 1..10000 and --concurrency 1..256")
    if args.url:
        parts = urlsplit(args.url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be http://127.0.0.1:PORT (the benchmark only talks to this machine)")
    with tempfile.TemporaryDirectory(prefix="bench-reference-api-") as tmp:
        proc = None
        try:
            if args.url:
                url, log = args.url.rstrip("/"), None
            else:
                url, proc, log = start_server(Path(tmp))
            wait_ready(url, proc, log)
            print(f"reference API at {url}: {args.requests} requests per phase, concurrency {args.concurrency}, "
                  f"100 KB PDF per order")
            phases = asyncio.run(bench(url, args.requests, args.concurrency))
        finally:
            stop(proc)  # the server we started, if any
    for phase in phases:
        phase.report()
    base, creates, reads = phases
    print(f"orders created per second: {creates.rate:.1f}")
    ratio = reads.rate / base.rate if base.rate else float("nan")
    print(f"state reads / healthz: {ratio:.2f} ({reads.rate:.1f} vs {base.rate:.1f} req/s)")
    failed = sum(len(p.errors) for p in phases)
    if failed:
        print(f"FAILED: {failed} request(s) did not succeed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
