"""The gateway against nginx and a bare aiohttp proxy, side by side, loaded by autocannon.

In a temporary folder: a dev PKI, one nginx (one worker) answering as the upstream
(`GET /orders/{id}` with a solicitor, `GET /orders/{id}/state`), and in front of it,
each on its own port:

- nginx: one worker, `ssl_verify_client on`, keep-alive upstream: the reference figure;
- bare: bench/bare_proxy.py, an aiohttp web.Application with one catch-all handler
  forwarding on the gateway's own pool, mTLS and nothing else: the floor of an aiohttp design;
- gateway: `gateway serve` with every feature on: audit (sync: answer, HMAC key,
  solicitor.identifier redacted), rate limits, identity tokens, metrics, order scope.

Load, all from node with a client certificate (`npm install` in bench/ the first time, done
here when node_modules is missing), GET /orders/{id}/state:
- load.js: autocannon, 32 keep-alive connections, as fast as the target answers;
- paced.js: the same connections opened first, then requests evenly spaced at half the
  gateway's peak rate: p50/p99 where no queue builds up (autocannon's rate limiting bursts);
- handshakes.js: 16 requests in flight, a new TLS connection each (no resumption).
CPU microseconds a request are read from /proc for the target's process and its children
(nginx: its worker; the gateway: with its audit helper).
Prints every round, then medians with their spread (min-max) and the ratios
gateway/nginx and gateway/bare. The load generator check: nginx must come out far
above the gateway, or the figures say nothing.

    python bench/gateway.py [--rounds 3] [--seconds 5] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose gateway.py is this file
from gateway.tools import certs  # noqa: E402
from support import client_ssl, free_port, poll_ready, stop  # noqa: E402

ORDER_ID = "22222222-2222-4222-8222-222222222222"
SOLICITOR = {"source": "EXTERNAL", "identifier": "198603052385"}
POLICY = {"client": "bench", "match": {"common_name": "bench"}, "allow": ["order_state", "read_order"],
          "solicitors": [{"source": "EXTERNAL", "identifier": "*"}],
          "rate_limit": {"per_second": 1_000_000, "burst": 1_000_000}}
READY_S = 60.0
NGINX_COMMON = """worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
"""
NGINX_UPSTREAM = NGINX_COMMON + """http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
  server {{
    listen 127.0.0.1:{port};
    location ~ ^/orders/[^/]+/state$ {{ default_type text/plain; return 200 "PENDING"; }}
    location ~ ^/orders/[^/]+$ {{ default_type application/json; return 200 '{order}'; }}
    location / {{ return 404; }}
  }}
}}
"""
NGINX_PROXY = NGINX_COMMON + """http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
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


def ensure_autocannon() -> None:
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is needed (autocannon drives the load): install Node.js")
    if not (BENCH / "node_modules" / "autocannon").is_dir():
        print("installing autocannon into bench/node_modules (npm) ...", flush=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=BENCH, check=True)


def start(cmd: list[str], log: Path, cwd: Path = ROOT) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)


def nginx(binary: str, folder: Path, template: str, **values) -> subprocess.Popen:
    folder.mkdir()
    (folder / "nginx.conf").write_text(template.format(d=folder, **values))
    return start([binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log"),
                  "-g", "daemon off;"], folder / "out.log")


def handshake_probe(port: int, ctx) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET /orders/{ORDER_ID}/state HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        if not tls.recv(64).startswith(b"HTTP/1.1 200"):
            raise OSError("not 200 yet")


def gateway_config(tmp: Path, upstream_port: int) -> tuple[Path, int, int]:
    (tmp / "policies").mkdir()
    (tmp / "policies" / "bench.yaml").write_text(json.dumps(POLICY))
    (tmp / "audit.key").write_text("bench-audit-key-" + "k" * 32)
    port, admin = free_port(), free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": port}, "admin": {"host": "127.0.0.1", "port": admin},
        "tls": {"cert": "pki/server.crt", "key": "pki/server.key", "client_ca": "pki/ca.crt", "crl": "pki/crl.pem"},
        "policies": "policies",
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "timeout_s": 30},
        "audit": {"path": "data/audit.jsonl", "key_file": "audit.key", "redact": ["solicitor.identifier"],
                  "sync": "answer"},
        "identity_token": {"key": "data/identity-token.key", "audience": "automation-api", "ttl_s": 60},
        "rate_limit": {"storage": "memory"},
        "reload": {"watch_s": 5},
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(config))
    return path, port, admin


def _processes():
    """(pid, fields of /proc/PID/stat after the command name) of every process."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            yield int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue


def cpu_ticks(pid: int) -> int:
    """utime + stime of the process's threads and of its children still running (the gateway's
    audit helper writes and fsyncs its lines: part of what a request costs), in clock ticks."""
    return sum(int(f[11]) + int(f[12]) for p, f in _processes() if p == pid or int(f[1]) == pid)


def load(script: str, url: str, pki_dir: Path, conns: int, seconds: float, rate: float = 0,
         pid: int | None = None) -> dict:
    """One measurement with bench/SCRIPT (load.js: closed loop on autocannon; paced.js: a fixed rate;
    handshakes.js: a new connection a request); CPU microseconds a request of `pid` when given."""
    before = cpu_ticks(pid) if pid else 0
    args = ["node", str(BENCH / script), url, str(conns), str(seconds), str(pki_dir / "ca.crt"),
            str(pki_dir / "clients" / "bench.crt"), str(pki_dir / "clients" / "bench.key")]
    out = subprocess.run(args + ([str(rate)] if rate else []), capture_output=True, text=True,
                         timeout=seconds + 120)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-500:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if pid:
        r["cpu_us"] = (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, r["total"])
    return r


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds a measurement (after a 2 s warm-up)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit("nginx is needed: it is the upstream and the reference (Debian: apt install nginx)")
    ensure_autocannon()
    procs: list[subprocess.Popen] = []
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as name:
        tmp = Path(name)
        pki_dir = tmp / "pki"
        certs.init(pki_dir, ["bench"])
        ctx = client_ssl(pki_dir, "bench")
        order = json.dumps({"id": ORDER_ID, "solicitor": SOLICITOR})
        try:
            up = free_port()
            procs.append(nginx(binary, tmp / "upstream", NGINX_UPSTREAM, port=up, order=order))
            ng_port = free_port()
            procs.append(ng := nginx(binary, tmp / "nginx", NGINX_PROXY, port=ng_port, up=up, pki=pki_dir))
            bare_port = free_port()
            procs.append(bare := start([sys.executable, str(BENCH / "bare_proxy.py"), str(bare_port),
                                        f"http://127.0.0.1:{up}", str(pki_dir)], tmp / "bare.log"))
            config, gw_port, _ = gateway_config(tmp, up)
            procs.append(gw := start([sys.executable, "-m", "gateway", "serve", "-c", str(config)], tmp / "gw.log",
                                     cwd=ROOT))
            targets = {"nginx": (ng_port, ng), "bare": (bare_port, bare), "gateway": (gw_port, gw)}
            for name_, (port, proc) in targets.items():
                poll_ready(name_, proc, lambda p=port: handshake_probe(p, ctx), READY_S, tmp / "gw.log")
            url = {n: f"https://localhost:{p}/orders/{ORDER_ID}/state" for n, (p, _) in targets.items()}
            pid = {"nginx": _worker_pid(tmp / "nginx"), "bare": bare.pid, "gateway": gw.pid}
            print(f"{args.connections} keep-alive mTLS connections, {args.seconds:g} s a measurement, "
                  f"GET /orders/{{id}}/state, autocannon, {os.cpu_count()} CPUs", flush=True)
            for n in targets:  # warm up (pools, caches, the first connections)
                load("load.js", url[n], pki_dir, args.connections, 2)
            for i in range(args.rounds):
                r: dict[str, dict] = {}
                for n in targets:
                    r[n] = load("load.js", url[n], pki_dir, args.connections, args.seconds, pid=pid[n])
                half = r["gateway"]["rps"] / 2
                for n in targets:
                    r[n + "@half"] = load("paced.js", url[n], pki_dir, args.connections, args.seconds, rate=half)
                for n in ("nginx", "gateway"):
                    r[n + "@new"] = load("handshakes.js", url[n], pki_dir, 16, args.seconds, pid=pid[n])
                rounds.append(r)
                _print_round(i + 1, r, half)
        except RuntimeError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                stop(proc)
    _print_summary(rounds)
    return 0


def _worker_pid(folder: Path) -> int | None:
    """nginx's worker process (the master only forks it): where its CPU time goes."""
    master = int((folder / "nginx.pid").read_text())
    return next((pid for pid, fields in _processes() if int(fields[1]) == master), None)


def _print_round(i: int, r: dict, half: float) -> None:
    print(f"-- round {i}")
    for n in ("nginx", "bare", "gateway"):
        x = r[n]
        print(f"  {n:<8} {x['rps']:8.0f} req/s  p50 {x['p50']:5.1f} ms  p99 {x['p99']:5.1f} ms  "
              f"{x.get('cpu_us', 0):5.0f} us CPU/req  errors {x['errors']} non-2xx {x['non2xx']}")
    for n in ("nginx", "bare", "gateway"):
        x = r[n + "@half"]
        print(f"  {n:<8} at {half:.0f} req/s: p50 {x['p50']:5.1f} ms  p99 {x['p99']:5.1f} ms")
    for n in ("nginx", "gateway"):
        x = r[n + "@new"]
        print(f"  {n:<8} new connection each request: {x['rps']:6.0f} req/s  p99 {x['p99']:5.1f} ms  "
              f"{x.get('cpu_us', 0):5.0f} us CPU/req  errors {x['errors']}")
    print(f"  gateway/nginx {r['gateway']['rps'] / r['nginx']['rps']:.2f}  "
          f"gateway/bare {r['gateway']['rps'] / r['bare']['rps']:.2f}  "
          f"new connections gateway/nginx {r['gateway@new']['rps'] / r['nginx@new']['rps']:.2f}", flush=True)


def _print_summary(rounds: list[dict]) -> None:
    if not rounds:
        return
    print(f"== medians over {len(rounds)} rounds (min-max)")

    def col(key, field):
        return [r[key][field] for r in rounds]

    for n in ("nginx", "bare", "gateway"):
        print(f"  {n:<8} {spread(col(n, 'rps'))} req/s  p50 {spread(col(n, 'p50'), '{:.1f}')} ms  "
              f"p99 {spread(col(n, 'p99'), '{:.1f}')} ms  CPU {spread(col(n, 'cpu_us'))} us/req")
        print(f"  {'':<8} at half the gateway's peak: p50 {spread(col(n + '@half', 'p50'), '{:.1f}')} ms  "
              f"p99 {spread(col(n + '@half', 'p99'), '{:.1f}')} ms")
    for n in ("nginx", "gateway"):
        print(f"  {n:<8} new connection each request: {spread(col(n + '@new', 'rps'))} req/s  "
              f"CPU {spread(col(n + '@new', 'cpu_us'))} us/req")
    ratio = [r["gateway"]["rps"] / r["nginx"]["rps"] for r in rounds]
    bare = [r["gateway"]["rps"] / r["bare"]["rps"] for r in rounds]
    new = [r["gateway@new"]["rps"] / r["nginx@new"]["rps"] for r in rounds]
    p99 = [r["gateway@half"]["p99"] - r["nginx@half"]["p99"] for r in rounds]
    print(f"  gateway/nginx {spread(ratio, '{:.2f}')}  gateway/bare {spread(bare, '{:.2f}')}  "
          f"new connections gateway/nginx {spread(new, '{:.2f}')}  "
          f"p99 at half load, gateway - nginx {spread(p99, '{:+.1f}')} ms")


if __name__ == "__main__":
    sys.exit(main())
