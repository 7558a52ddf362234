"""Load benchmark by hand: `gateway serve` against its upstream called directly, and against nginx.

In a temporary folder: a dev PKI, a policy for client "bench" (rate limit on but never
refusing), audit on with solicitor.identifier redacted, identity tokens on; a trivial aiohttp
upstream (this file, --serve-upstream PORT), the gateway in front of it and, when installed,
nginx (one worker, mTLS, keep-alive upstream), all on free 127.0.0.1 ports. Each target gets
the same load (P processes, C keep-alive connections, GET /orders/{id}/state for D seconds
after a warm-up, every answer checked for 200). Prints req/s, p50/p99 latency and errors per
target, the gateway process's CPU time per request (/proc/PID/stat) and the ratios
gateway/direct and gateway/nginx; stops everything and removes the folder at the end.

    python bench/gateway.py [--duration 10] [--connections 32] [--procs 2] [--targets direct,gateway,nginx]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose gateway.py is this file
from gateway.tools import pki  # noqa: E402
from support import client_ssl, free_port, poll_ready, stop  # noqa: E402

ORDER_ID = "22222222-2222-4222-8222-222222222222"
SOLICITOR = {"source": "EXTERNAL", "identifier": "198603052385"}
POLICY = {"client": "bench", "match": {"common_name": "bench"}, "allow": ["order_state", "read_order"],
          "solicitors": [{"source": "EXTERNAL", "identifier": "*"}],
          "rate_limit": {"per_second": 1_000_000, "burst": 1_000_000}}
READY_DEADLINE_S = 60.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)
NGINX_CONF = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;  # as the gateway: no reconnect (and new handshake) every 1000 requests
  upstream api {{ server 127.0.0.1:{up}; keepalive 64; keepalive_requests 100000000; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki}/server.crt; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/ca.crt; ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


def serve_upstream(port: int) -> None:
    """The trivial upstream: GET /orders/{id} (JSON with a solicitor) and GET /orders/{id}/state (PENDING)."""
    from aiohttp import web

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "solicitor": SOLICITOR})

    async def state(request: web.Request) -> web.Response:
        return web.Response(text="PENDING")

    app = web.Application()
    app.router.add_get("/orders/{id}", order)
    app.router.add_get("/orders/{id}/state", state)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)  # SIGTERM stops it


def wait_ready(name: str, proc: subprocess.Popen, log: Path, probe) -> None:
    poll_ready(name, proc, probe, READY_DEADLINE_S, log)


def handshake(port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(f"GET /orders/{ORDER_ID}/state HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        if not tls.recv(64).startswith(b"HTTP/1.1 200"):  # up, and the whole path answers
            raise OSError("not 200 yet")


def http_get(url: str) -> None:
    urllib.request.urlopen(url, timeout=2).close()  # HTTPError (not 200) is an OSError: not ready


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)


def write_gateway_config(tmp: Path, upstream_port: int) -> tuple[Path, int, int]:
    (tmp / "policies").mkdir()
    (tmp / "policies" / "bench.yaml").write_text(json.dumps(POLICY))
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port}, "admin": {"host": "127.0.0.1", "port": admin},
        "tls": {"cert": "pki/server.crt", "key": "pki/server.key", "client_ca": "pki/ca.crt", "crl": "pki/crl.pem"},
        "policies": "policies",
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "timeout_s": 30},
        "audit": {"path": "data/audit.jsonl", "redact": ["solicitor.identifier"]},
        "identity_token": {"key": "data/identity-token.key", "audience": "automation-api", "ttl_s": 60},
        "rate_limit": {"storage": "memory"},
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    return path, port, admin


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all threads, in clock ticks


async def load(url: str, pki_dir: Path | None, conns: int, warmup: float, duration: float, barrier) -> tuple:
    ctx = client_ssl(pki_dir, "bench") if pki_dir else False
    connector = aiohttp.TCPConnector(limit=conns, ssl=ctx)  # keep-alive: connections are reused
    count, errors, latencies, first_error = 0, 0, [], ""
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        path = f"{url}/orders/{ORDER_ID}/state"

        async def one(until: float, measure: bool) -> None:
            nonlocal count, errors, first_error
            while time.monotonic() < until:
                t0 = time.perf_counter()
                try:
                    async with session.get(path) as resp:
                        body = await resp.read()
                        ok = resp.status == 200
                        if not ok:
                            error = f"HTTP {resp.status}: {body[:200]!r}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    ok, error = False, f"{type(exc).__name__}: {exc}"
                if measure and ok:
                    count += 1
                    latencies.append(time.perf_counter() - t0)
                elif measure:
                    errors += 1
                    first_error = first_error or error[:300]

        await asyncio.gather(*(one(time.monotonic() + warmup, False) for _ in range(conns)))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, barrier.wait, READY_DEADLINE_S)  # all workers start together
        t0 = time.monotonic()
        await asyncio.gather(*(one(t0 + duration, True) for _ in range(conns)))
        elapsed = time.monotonic() - t0
        await loop.run_in_executor(None, barrier.wait, READY_DEADLINE_S)  # ... and end together
    return count, errors, latencies, elapsed, first_error


def worker(queue, barrier, *args) -> None:
    try:
        queue.put(asyncio.run(load(*args, barrier)))
    except BaseException as exc:  # reported by the parent; a broken barrier frees the others
        barrier.abort()
        queue.put(f"{type(exc).__name__}: {exc}")


def pct(xs: list[float], p: float) -> float:
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] * 1000 if xs else float("nan")


def measure(name: str, url: str, pki_dir: Path | None, args, cpu_pid: int | None = None) -> dict:
    """Run the load against one target; cpu_pid's CPU time is read when all workers start and end."""
    mpc = mp.get_context("spawn")
    queue, barrier = mpc.Queue(), mpc.Barrier(args.procs + 1)
    warmup = min(2.0, args.duration / 5)
    shares = [args.connections // args.procs + (i < args.connections % args.procs) for i in range(args.procs)]
    procs = [mpc.Process(target=worker, args=(queue, barrier, url, pki_dir, n, warmup, args.duration), daemon=True)
             for n in shares]
    for p in procs:
        p.start()
    ticks = None
    try:
        barrier.wait(READY_DEADLINE_S)
        ticks, wall = cpu_ticks(cpu_pid) if cpu_pid else None, time.monotonic()
        barrier.wait(args.duration + READY_DEADLINE_S)
        ticks, wall = cpu_ticks(cpu_pid) - ticks if cpu_pid else None, time.monotonic() - wall
    except Exception:  # a worker failed or hung: its message follows on the queue
        ticks = None
    try:
        results = [queue.get(timeout=READY_DEADLINE_S) for _ in procs]
    except Exception:  # queue.Empty: a worker died without a word
        results = ["no result within the deadline"]
    for p in procs:
        p.join(timeout=READY_DEADLINE_S)
        if p.is_alive():
            p.kill()
    failed = [r for r in results if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"{name}: load worker failed: {failed[0]}")
    lat = sorted(x for r in results for x in r[2])
    r = {"name": name, "count": sum(r[0] for r in results), "errors": sum(r[1] for r in results),
         "rate": sum(r[0] / r[3] for r in results), "p50": pct(lat, 50), "p99": pct(lat, 99),
         "first_error": next((r[4] for r in results if r[4]), "")}
    if ticks is not None:
        cpu_s = ticks / os.sysconf("SC_CLK_TCK")
        r["cpu_us"] = cpu_s * 1e6 / max(1, r["count"] + r["errors"])
        r["cpu_pct"] = 100 * cpu_s / wall
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections in total (default 32)")
    parser.add_argument("--procs", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--targets", default="direct,gateway,nginx", help="comma list (default all available)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        serve_upstream(args.serve_upstream)
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not targets or set(targets) - {"direct", "gateway", "nginx"}:
        parser.error("--targets is a comma list of direct, gateway, nginx")
    if not 1 <= args.procs <= 64 or not args.procs <= args.connections <= 4096 or not 1 <= args.duration <= 600:
        parser.error("--procs must be 1..64, --connections procs..4096, --duration 1..600")
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if "nginx" in targets and not nginx:
        print("note: nginx is not installed; skipping the nginx target")
        targets.remove("nginx")
    results, procs = {}, []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as name:
        tmp = Path(name)
        pki_dir, up = tmp / "pki", free_port()
        try:
            pki.init(pki_dir, ["bench"])
            ctx = client_ssl(pki_dir, "bench")
            procs.append(upstream := start([sys.executable, __file__, "--serve-upstream", str(up)], tmp / "up.log"))
            urls = {"direct": (f"http://127.0.0.1:{up}", None, None)}
            wait_ready("upstream", upstream, tmp / "up.log", lambda: http_get(f"{urls['direct'][0]}/orders/{ORDER_ID}"))
            if "gateway" in targets:
                config, port, admin = write_gateway_config(tmp, up)
                procs.append(gw := start([sys.executable, "-m", "gateway", "serve", "-c", str(config)], tmp / "gw.log"))
                wait_ready("gateway", gw, tmp / "gw.log",
                           lambda: (http_get(f"http://127.0.0.1:{admin}/healthz"), handshake(port, ctx)))
                urls["gateway"] = (f"https://127.0.0.1:{port}", pki_dir, gw.pid)
            if "nginx" in targets:
                (ndir := tmp / "nginx").mkdir()
                conf = NGINX_CONF.format(d=ndir, up=up, port=(ng_port := free_port()), pki=pki_dir)
                (ndir / "nginx.conf").write_text(conf)
                procs.append(ng := start([nginx, "-p", str(ndir), "-c", str(ndir / "nginx.conf"), "-e",
                                          str(ndir / "error.log"), "-g", "daemon off;"], tmp / "nginx.log"))
                wait_ready("nginx", ng, ndir / "error.log", lambda: handshake(ng_port, ctx))
                urls["nginx"] = (f"https://127.0.0.1:{ng_port}", pki_dir, None)
            print(f"{args.connections} connections from {args.procs} processes, {args.duration:g} s per target "
                  f"after a {min(2.0, args.duration / 5):g} s warm-up, GET /orders/{{id}}/state, {os.cpu_count()} CPUs")
            for target in targets:
                results[target] = measure(target, *urls[target][:2], args, urls[target][2])
        except RuntimeError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):  # stop what we started: terminate, wait, kill if it hangs
                stop(proc)
    for r in results.values():
        print(f"{r['name']:<8} {r['rate']:9.0f} req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  "
              f"{r['errors']} errors  ({r['count']} ok)")
        if r["first_error"]:
            print(f"         first error: {r['first_error']}")
        if "cpu_us" in r:
            print(f"         gateway process CPU: {r['cpu_us']:.0f} us/request ({r['cpu_pct']:.0f}% of one core)")
    gw = results.get("gateway")
    for base in ("direct", "nginx"):
        if gw and base in results and results[base]["rate"]:
            b = results[base]
            print(f"gateway/{base}: {gw['rate'] / b['rate']:.2f}x req/s, p50 {gw['p50'] / b['p50']:.2f}x, "
                  f"p99 {gw['p99'] / b['p99']:.2f}x")
    return 1 if any(r["errors"] for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
