"""What TLS 1.3 session tickets cost a client that opens one connection a call, in Python and in nginx.

Why: after a TLS 1.3 handshake the server sends session tickets (NewSessionTicket messages,
Python's default num_tickets is 2, OpenSSL's too) so that the client can resume later. A client
that opens one connection per call and never resumes (a script, curl, `openssl s_time -new`)
gets nothing for them, but each ticket is made, encrypted and sent by the server, and received
by the client, on every connection. This measures that cost on each side: new connections a
second with and without tickets, against

- floor: bench/tls_floor.py (the gateway's own TLS context, a fixed answer), Python's default
  tickets, and floor-t0 the same with num_tickets = 0 (its hidden --tickets option);
- nginx: one worker, ssl_verify_client on, ssl_crl, `return 200 "PENDING"`, with
  `ssl_session_tickets on`, nginx-off the same with `off`, and nginx-t0 with
  `ssl_conf_command NumTickets 0`. nginx-t0 is there because `ssl_session_tickets off` does
  not stop the tickets in TLS 1.3 (nginx 1.22, OpenSSL 3.0: still 2 a connection, stateful
  ones, a session ID each, instead of an encrypted session): nginx against nginx-t0 is what
  the tickets cost, nginx against nginx-off what the switch saves.

All mTLS with one dev PKI (gateway.tools.certs.init); the load is `openssl s_time -new` (a full
handshake and one HTTP/1.0 GET a connection, counted over wall-clock time, as bench/gateway.py
does), the targets in an order rotated each round. How many tickets each target sends a
connection is checked first with `openssl s_client -msg`. Prints every round, the medians
(min-max) of connections/s and of the server's CPU a connection, and what the tickets cost a
connection: the difference of 1/rate (wall time, client and server together on this machine)
and of the server's CPU, taken per round.

    python bench/tls_tickets.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from support import bench_gateway
from targets import (
    BENCH, NGINX_COMMON, READY_S, Target, certs, client_ssl, free_port, gateway_config, handshake_probe, nginx,
    nginx_binary, poll_ready, start, stop,
)

bench = bench_gateway()  # its s_time runner and answer check

NGINX_TICKETS = NGINX_COMMON + """http {{
  access_log off;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy; fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {pki}/server.crt; ssl_certificate_key {pki}/server.key;
    ssl_client_certificate {pki}/ca.crt; ssl_verify_client on; ssl_crl {pki}/crl.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_tickets {tickets};{extra}
    location / {{ default_type text/plain; return 200 "PENDING"; }}
  }}
}}
"""
# in the order of the first round; then (label, with tickets, without) to compare
NAMES = ("floor", "floor-t0", "nginx", "nginx-off", "nginx-t0")
PAIRS = (("python (floor)", "floor", "floor-t0"), ("nginx", "nginx", "nginx-t0"),
         ("nginx, switch off", "nginx", "nginx-off"))


def launch(name: str, tmp: Path, binary: str, pki_dir: Path, config: Path) -> Target:
    port = free_port()
    if name.startswith("nginx"):
        proc = nginx(binary, tmp / name, NGINX_TICKETS, port=port, pki=pki_dir,
                     tickets="off" if name == "nginx-off" else "on",
                     extra=" ssl_conf_command NumTickets 0;" if name == "nginx-t0" else "")
        return Target(name, port, [proc], [proc.pid], tmp / name / "error.log")
    (tmp / name).mkdir()
    log = tmp / name / "out.log"
    proc = start([sys.executable, str(BENCH / "tls_floor.py"), str(port), str(config),
                  *(["--tickets", "0"] if name.endswith("t0") else [])], log)
    return Target(name, port, [proc], [proc.pid], log)


def tickets_sent(port: int, pki_dir: Path) -> int:
    """NewSessionTicket messages the server sends on one connection (one HTTP/1.0 GET, read to the end)."""
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                          "-cert", str(pki_dir / "clients" / "bench.crt"),
                          "-key", str(pki_dir / "clients" / "bench.key"), "-CAfile", str(pki_dir / "ca.crt"),
                          "-msg", "-ign_eof"],
                         input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("<<<") and "NewSessionTicket" in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds a measurement (whole seconds)")
    args = parser.parse_args()
    binary = nginx_binary()
    if shutil.which("openssl") is None:
        raise SystemExit("openssl is needed (openssl s_time)")
    procs: list[subprocess.Popen] = []
    rounds: list[dict[str, dict]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-tickets-"))
    try:
        pki_dir = tmp / "pki"
        certs.init(pki_dir, ["bench"])
        ctx = client_ssl(pki_dir, "bench")
        (tmp / "config").mkdir()
        (tmp / "config" / "pki").symlink_to(pki_dir)
        config, _, _ = gateway_config(tmp / "config", free_port())  # the floor reads its TLS section only
        targets = {}
        for name in NAMES:
            targets[name] = t = launch(name, tmp, binary, pki_dir, config)
            procs.extend(t.procs)
        for t in targets.values():
            poll_ready(t.name, t.procs[0], lambda t=t: handshake_probe(t.port, ctx), READY_S, t.log)
        sizes = {n: bench.answer_size(t.port, ctx) for n, t in targets.items()}
        sent = {n: tickets_sent(t.port, pki_dir) for n, t in targets.items()}
        print(f"openssl s_time -new, {args.rounds} rounds of {args.seconds:g} s; tickets a connection (s_client -msg): "
              + ", ".join(f"{n} {k}" for n, k in sent.items()), flush=True)
        for i in range(args.rounds):
            order = list(NAMES[i % len(NAMES):] + NAMES[:i % len(NAMES)])
            r = {}
            print(f"-- round {i + 1}")
            for n in order:
                t = targets[n]
                x = r[n] = bench.new_connections(t.port, pki_dir, args.seconds, pid=t.cpu)
                x["answer_bytes"] = sizes[n]
                print(f"    {n:<12} {bench._fmt_new(x)}", flush=True)
            rounds.append(r)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        print(f"kept {tmp}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            stop(proc)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"== medians over {len(rounds)} rounds (min-max)")
    for n in NAMES:
        print(f"    {n:<12} {bench.spread([r[n]['rps'] for r in rounds]):>20} conn/s  "
              f"CPU {bench.spread([r[n]['cpu_us'] for r in rounds]):>18} us a connection (server)")
    print("== what the tickets cost a connection that never resumes (with - without, taken per round)")
    for label, on, off in PAIRS:
        wall = [(1 / r[on]["rps"] - 1 / r[off]["rps"]) * 1000 for r in rounds]
        cpu = [(r[on]["cpu_us"] - r[off]["cpu_us"]) / 1000 for r in rounds]
        ratio = [r[off]["rps"] / r[on]["rps"] for r in rounds]
        print(f"    {label:<18} {on} - {off} ({sent[on]} - {sent[off]} tickets): "
              f"1/rate {bench.spread(wall, '{:+.3f}')} ms  server CPU {bench.spread(cpu, '{:+.3f}')} ms  "
              f"(without/with conn/s {bench.spread(ratio, '{:.2f}')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
