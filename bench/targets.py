"""What bench/gateway.py measures, started: the nginx upstream and every target in front of it.

Kept apart from the runner so that the other benchmarks (through support.bench_gateway(),
which re-exports these names) start the same upstream and the same gateway config.
All targets are mTLS with one dev PKI (ca.crt, server.crt/key, crl.pem, clients/bench.*):

- nginx: one worker, ssl_verify_client on, CRL, keep-alive upstream: the reference;
- diy: what a team would assemble instead, nginx (as above) + auth_request to
  bench/peers/policy_service.py (aiohttp), grants in bench/peers/grants.json, an audit line
  written and flushed a decision;
- naive: bench/naive_proxy.py, aiohttp server + one ClientSession;
- bare: bench/bare_proxy.py, aiohttp on the gateway's own pool: the floor of an aiohttp design;
- floor: bench/tls_floor.py, a fixed answer from loop.create_server(ssl=) with the TLS context the
  gateway builds from the plain gateway target's config (same certificates, CA, CRL), no proxying:
  what TLS termination on asyncio (Python's sslproto, the same OpenSSL) costs by itself, so that a
  gateway/nginx ratio can be read against floor/nginx;
- gateway, gateway-batch (audit.sync: batch), gateway-w2 (serve --workers 2; its rate limits in
  a redis-server of its own, since memory limits are refused with more than one worker).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # before bench/ itself, whose gateway.py is not the gateway package
from gateway.tools import certs  # noqa: E402,F401  (re-exported: the other benchmarks make their PKI with it)
from support import client_ssl, free_port, poll_ready, stop  # noqa: E402,F401

ORDER_ID = "22222222-2222-4222-8222-222222222222"
SOLICITOR = {"source": "EXTERNAL", "identifier": "198603052385"}
POLICY = {"client": "bench", "match": {"common_name": "bench"}, "allow": ["order_state", "read_order"],
          "solicitors": [{"source": "EXTERNAL", "identifier": "*"}],
          "rate_limit": {"per_second": 1_000_000, "burst": 1_000_000}}
READY_S = 60.0
TARGETS = ("nginx", "diy", "naive", "bare", "floor", "gateway", "gateway-batch", "gateway-w2")
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
    ssl_client_certificate {pki}/ca.crt; ssl_verify_client on; ssl_crl {pki}/crl.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{ proxy_pass http://api; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
"""


@dataclass
class Target:
    name: str
    port: int
    procs: list[subprocess.Popen]
    cpu: list[int]        # roots of the process trees whose CPU a request costs
    log: Path             # where to look when it fails
    admin: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/orders/{ORDER_ID}/state"


def nginx_binary() -> str:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit("nginx is needed: it is the upstream and the reference (Debian: apt install nginx)")
    return binary


def start(cmd: list[str], log: Path, cwd: Path = ROOT, env: dict | None = None) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _run_nginx(binary: str, folder: Path) -> subprocess.Popen:
    return start([binary, "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")]
                 + ([] if "daemon off;" in (folder / "nginx.conf").read_text() else ["-g", "daemon off;"]),
                 folder / "out.log")


def nginx(binary: str, folder: Path, template: str, **values) -> subprocess.Popen:
    folder.mkdir()
    (folder / "nginx.conf").write_text(template.format(d=folder, **values))
    return _run_nginx(binary, folder)


def handshake_probe(port: int, ctx) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET /orders/{ORDER_ID}/state HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        if not tls.recv(64).startswith(b"HTTP/1.1 200"):
            raise OSError("not 200 yet")


def gateway_config(tmp: Path, upstream_port: int, *, sync: str = "answer",
                   rate_storage: str = "memory") -> tuple[Path, int, int]:
    """Every feature on: audit (HMAC key, redaction), rate limits, identity tokens, metrics, order scope,
    CRL, reload watch. TMP must hold pki/; returns (config path, port, admin port)."""
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
                  "sync": sync},
        "identity_token": {"key": "data/identity-token.key", "audience": "automation-api", "ttl_s": 60},
        "rate_limit": {"storage": rate_storage},
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


def cpu_ticks(pids: int | list[int]) -> int:
    """utime + stime, in clock ticks, of PIDS and all their descendants still running (the gateway's audit
    helper, the workers of --workers 2 and theirs, nginx's worker): what serving a request costs."""
    stats = dict(_processes())
    children: dict[int, list[int]] = {}
    for pid, f in stats.items():
        children.setdefault(int(f[1]), []).append(pid)
    todo, seen = list([pids] if isinstance(pids, int) else pids), set()
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in seen if p in stats)


def start_upstream(binary: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    order = json.dumps({"id": ORDER_ID, "solicitor": SOLICITOR})
    proc = nginx(binary, tmp / "upstream", NGINX_UPSTREAM, port=port, order=order)
    poll_ready("upstream", proc, lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(), 30,
               tmp / "upstream" / "error.log")
    return proc, port


def launch(name: str, tmp: Path, binary: str, pki_dir: Path, up: int) -> Target:
    """Start target NAME in front of the upstream on port UP, each in its own folder tmp/NAME."""
    upstream = f"http://127.0.0.1:{up}"
    folder = tmp / name
    port = free_port()
    if name == "nginx":
        proc = nginx(binary, folder, NGINX_PROXY, port=port, up=up, pki=pki_dir)
        return Target(name, port, [proc], [proc.pid], folder / "error.log")
    if name == "diy":
        return _launch_diy(folder, binary, pki_dir, port, up)
    if name in ("naive", "bare"):
        folder.mkdir()
        proc = start([sys.executable, str(BENCH / f"{name}_proxy.py"), str(port), upstream, str(pki_dir)],
                     folder / "out.log")
        return Target(name, port, [proc], [proc.pid], folder / "out.log")
    if name == "floor":
        return _launch_floor(folder, pki_dir, up)
    if name in ("gateway", "gateway-batch", "gateway-w2"):
        return _launch_gateway(name, folder, pki_dir, up)
    raise ValueError(f"unknown target {name!r}: one of {', '.join(TARGETS)}")


def _launch_diy(folder: Path, binary: str, pki_dir: Path, port: int, up: int) -> Target:
    from cryptography import x509

    folder.mkdir()
    grants = BENCH / "peers" / "grants.json"
    subject = x509.load_pem_x509_certificate((pki_dir / "clients" / "bench.crt").read_bytes()).subject
    if subject.rfc4514_string() not in json.loads(grants.read_text()):  # nginx's $ssl_client_s_dn, RFC 2253
        raise RuntimeError(f"{grants} grants nothing to {subject.rfc4514_string()!r}, the bench client")
    policy = free_port()
    service = start([sys.executable, str(BENCH / "peers" / "policy_service.py")], folder / "policy.log",
                    env={**os.environ, "PORT": str(policy), "GRANTS": str(grants),
                         "AUDIT_LOG": str(folder / "audit.jsonl")})
    poll_ready("diy policy service", service,
               lambda: socket.create_connection(("127.0.0.1", policy), timeout=1).close(), READY_S,
               folder / "policy.log")
    conf = (BENCH / "peers" / "nginx-diy.conf").read_text()
    for key, value in {"DIR": folder, "PKI": pki_dir, "PORT": port, "UP": up, "POLICY": policy}.items():
        conf = conf.replace(f"@{key}@", str(value))
    (folder / "nginx.conf").write_text(conf)
    proc = _run_nginx(binary, folder)
    return Target("diy", port, [proc, service], [proc.pid, service.pid], folder / "error.log",
                  notes=[f"audit {folder / 'audit.jsonl'}"])


def _launch_floor(folder: Path, pki_dir: Path, up: int) -> Target:
    """bench/tls_floor.py on the config the plain gateway target gets (its TLS section is all it reads)."""
    folder.mkdir()
    (folder / "pki").symlink_to(pki_dir)
    config, port, _ = gateway_config(folder, up)
    proc = start([sys.executable, str(BENCH / "tls_floor.py"), str(port), str(config)], folder / "out.log")
    return Target("floor", port, [proc], [proc.pid], folder / "out.log")


def _launch_gateway(name: str, folder: Path, pki_dir: Path, up: int) -> Target:
    folder.mkdir()
    (folder / "pki").symlink_to(pki_dir)
    procs: list[subprocess.Popen] = []
    storage = "memory"
    if name == "gateway-w2":  # two workers refuse in-memory rate limits: the deployment shares them in Redis
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("gateway-w2 needs redis-server for its shared rate limits (apt install redis-server)")
        rport = free_port()
        procs.append(redis := start([exe, "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                     "--appendonly", "no", "--dir", str(folder)], folder / "redis.log"))
        poll_ready("redis-server", redis, lambda: _ping_redis(rport), 10, folder / "redis.log")
        storage = f"redis://127.0.0.1:{rport}/0"
    config, port, admin = gateway_config(folder, up, sync="batch" if name == "gateway-batch" else "answer",
                                         rate_storage=storage)
    workers = ["--workers", "2"] if name == "gateway-w2" else []
    cmd = [sys.executable, "-m", "gateway", "serve", "-c", str(config), *workers]
    gw = start(cmd, folder / "gw.log")
    return Target(name, port, [*procs, gw], [p.pid for p in (gw, *procs)], folder / "gw.log", admin=admin)


def _ping_redis(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        if not sock.recv(16).startswith(b"+PONG"):
            raise OSError("no PONG yet")


def wait_ready(target: Target, ctx) -> None:
    """A 200 through the target; for a gateway also its /readyz (with --workers, every worker ready)."""
    main = target.procs[-1] if target.name.startswith("gateway") else target.procs[0]
    poll_ready(target.name, main, lambda: handshake_probe(target.port, ctx), READY_S, target.log)
    if target.admin is not None:
        def readyz() -> None:
            urllib.request.urlopen(f"http://127.0.0.1:{target.admin}/readyz", timeout=2).read()  # HTTPError: OSError
        poll_ready(f"{target.name} /readyz", main, readyz, READY_S, target.log)
