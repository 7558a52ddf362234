"""The gateway against what a user would run instead, in one run: keep-alive, paced and new connections.

bench/targets.py starts, in a temporary folder, one nginx upstream and in front of it, all
mTLS with one dev PKI: nginx (the reference), diy (nginx + auth_request + an aiohttp policy
service), naive (aiohttp server + ClientSession), bare (aiohttp on the gateway's own pool),
floor (bench/tls_floor.py), gateway, gateway-batch (audit.sync: batch) and gateway-w2 (serve
--workers 2). floor answers a fixed 200 itself, no proxying, from loop.create_server with the
TLS context the gateway builds from its own config: it shows what TLS termination on asyncio
(Python's sslproto, the same OpenSSL) costs by itself, so that a gateway/nginx ratio can be read
against floor/nginx (the part of the gap floor already has is not the gateway's doing).
Ratios only hold within one run (the machine drifts by tens of percent from one run to the
next), so every target gets every mode in every round, in an order rotated each round:

- keepalive: bench/load.js (autocannon), 32 connections, closed loop: req/s, p50/p99, and CPU
  microseconds a request from /proc (each target's process trees: nginx's worker, diy's nginx
  + policy service, a gateway's audit helper, w2's workers and its Redis);
- paced: bench/rate.js at 500 and 2000 req/s over 8 connections after a 1 s warm-up: latency
  from the request's start (p50/p99/max) and from its due time (s_p99/s_max: a queue shows
  there, no coordinated omission), errors, non-2xx, lost;
- new: `openssl s_time -new` (a C client, out of the way): a full TLS 1.3 handshake and one
  HTTP/1.0 GET a connection, counted over wall-clock time (s_time's own seconds are its CPU
  time); bytes a connection are checked against the size of a 200 answer.

Prints every round, medians (min-max), then ratios taken per round and summarised as median
(min-max): above 1 the gateway is ahead of the peer. The check on the load generator: nginx
must come out far above the gateway, or the generator, not the target, is the limit. Last, the
targets, each a median (min-max) over the rounds, met or not met (by the median): new
connections/s gateway/nginx >= 0.80; at 500 req/s the gateway's p50 <= 0.8 ms, p99 <= 3.0 ms,
max <= 8 ms; keep-alive gateway/naive >= 1.0 (gateway-batch's, and floor/nginx, beside them,
not judged).

    python bench/gateway.py [--rounds 3] [--seconds 5] [--targets nginx,gateway] [--modes keepalive,new]
                            [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ when loaded by path (support.bench_gateway)
# What the other benchmarks use from this module (through support.bench_gateway()) lives in targets.py.
from targets import (  # noqa: E402,F401
    BENCH, NGINX_COMMON, NGINX_PROXY, NGINX_UPSTREAM, ORDER_ID, POLICY, READY_S, ROOT, SOLICITOR, TARGETS,
    Target, certs, client_ssl, cpu_ticks, free_port, gateway_config, handshake_probe, launch, nginx, nginx_binary,
    poll_ready, start, start_upstream, stop, wait_ready,
)

MODES = ("keepalive", "paced", "new")
RATES = (500, 2000)
KEEPALIVE_CONNS, PACED_CONNS = 32, 8
KEEPALIVE_RATIOS = [("gateway", "nginx"), ("gateway", "naive"), ("gateway", "diy"), ("gateway-w2", "diy"),
                    ("gateway-batch", "naive"), ("gateway", "bare"), ("gateway", "floor")]
NEW_RATIOS = [("gateway", "nginx"), ("gateway", "naive"), ("gateway", "diy"), ("gateway-w2", "diy"),
              ("floor", "nginx"), ("gateway", "floor"), ("gateway-batch", "floor"), ("gateway-batch", "nginx")]
TARGET_RATE = 500  # the paced rate the latency targets are read at
S_TIME = re.compile(r"(\d+) connections in [\d.]+s;.*bytes read (\d+)")


def ensure_autocannon() -> None:
    if shutil.which("node") is None:
        raise SystemExit("node is needed (autocannon drives the load): install Node.js")
    if not (BENCH / "node_modules" / "autocannon").is_dir():
        print("installing autocannon into bench/node_modules (npm) ...", flush=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund"], cwd=BENCH, check=True)


def _client_files(pki_dir: Path) -> list[str]:
    return [str(pki_dir / "ca.crt"), str(pki_dir / "clients" / "bench.crt"), str(pki_dir / "clients" / "bench.key")]


def _node(args: list[str], timeout: float) -> dict:
    out = subprocess.run(["node", *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_request(pid, before: int, count: int) -> float:
    return (cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") * 1e6 / max(1, count)


def load(script: str, url: str, pki_dir: Path, conns: int, seconds: float, rate: float = 0,
         pid: int | list[int] | None = None) -> dict:
    """One run of bench/SCRIPT (load.js: autocannon, closed loop, or RATE req/s in all; handshakes.js: a new
    connection a request), with CPU microseconds a request of PID's process tree(s) when given."""
    before = cpu_ticks(pid) if pid else 0
    r = _node([str(BENCH / script), url, str(conns), str(seconds), *_client_files(pki_dir)]
              + ([str(rate)] if rate else []), seconds + 120)
    if pid:
        r["cpu_us"] = _per_request(pid, before, r["total"])
    return r


def paced(url: str, pki_dir: Path, rate: int, seconds: float, conns: int = PACED_CONNS) -> dict:
    """bench/rate.js: RATE req/s evenly spaced over CONNS keep-alive connections, 1 s of warm-up not recorded."""
    return _node([str(BENCH / "rate.js"), url, str(rate), str(seconds), str(conns), *_client_files(pki_dir), "1"],
                 seconds + 60)


def answer_size(port: int, ctx) -> int:
    """Bytes of the answer to the request s_time sends (HTTP/1.0, no Host), which must be a 200."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"GET /orders/{ORDER_ID}/state HTTP/1.0\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    if not re.match(rb"HTTP/1\.[01] 200 ", data):
        raise RuntimeError(f"port {port}: s_time's request gets {data[:60]!r}, not a 200")
    return len(data)


def new_connections(port: int, pki_dir: Path, seconds: float, pid=None) -> dict:
    """openssl s_time -new: connections a second over wall-clock time, bytes a connection, CPU a connection."""
    ca, cert, key = _client_files(pki_dir)
    before = cpu_ticks(pid) if pid else 0
    t0 = time.monotonic()
    out = subprocess.run(["openssl", "s_time", "-connect", f"127.0.0.1:{port}", "-new", "-cert", cert, "-key", key,
                          "-CAfile", ca, "-time", str(max(1, round(seconds))), "-www", f"/orders/{ORDER_ID}/state"],
                         capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - t0
    m = S_TIME.search(out.stdout)
    if out.returncode != 0 or m is None or int(m[1]) == 0:
        raise RuntimeError(f"openssl s_time on port {port} failed ({out.returncode}): "
                           f"{(out.stdout[-300:] + out.stderr[-300:]).strip()}")
    n = int(m[1])
    r = {"rps": n / wall, "total": n, "wall_s": wall, "bytes_per_conn": int(m[2]) / n}
    if pid:
        r["cpu_us"] = _per_request(pid, before, n)
    return r


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def run_round(targets: dict[str, Target], order: list[str], modes: list[str], pki_dir: Path, seconds: float,
              sizes: dict[str, int]) -> dict:
    r: dict[str, dict] = {}
    for mode in modes:
        for n in order:
            t = targets[n]
            if mode == "keepalive":
                r[f"{n}/keepalive"] = load("load.js", t.url, pki_dir, KEEPALIVE_CONNS, seconds, pid=t.cpu)
            elif mode == "paced":
                for rate in RATES:
                    r[f"{n}/paced{rate}"] = paced(t.url, pki_dir, rate, seconds)
            else:
                x = r[f"{n}/new"] = new_connections(t.port, pki_dir, seconds, pid=t.cpu)
                x["answer_bytes"] = sizes[n]
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds a measurement (s_time: whole seconds)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {','.join(TARGETS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {','.join(MODES)}")
    parser.add_argument("--json", type=Path, help="write every round's raw results there")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, audit) and say where")
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    modes = [m for m in MODES if m in args.modes.split(",")]
    if bad := [n for n in names if n not in TARGETS] + [m for m in args.modes.split(",") if m not in MODES]:
        parser.error(f"unknown target or mode: {', '.join(bad)}")
    binary = nginx_binary()
    ensure_autocannon()
    if "new" in modes and shutil.which("openssl") is None:
        raise SystemExit("openssl is needed for the new-connection mode (openssl s_time)")
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average before {' '.join(f'{x:.2f}' for x in load_before)}; "
          f"{args.rounds} rounds of {args.seconds:g} s a measurement; targets {', '.join(names)}; "
          f"modes {', '.join(modes)}; GET /orders/{{id}}/state over mTLS", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    rounds: list[dict] = []
    targets: dict[str, Target] = {}
    procs: list[subprocess.Popen] = []
    audits: dict[str, str] = {}
    try:
        pki_dir = tmp / "pki"
        certs.init(pki_dir, ["bench"])
        ctx = client_ssl(pki_dir, "bench")
        upstream, up = start_upstream(binary, tmp)
        procs.append(upstream)
        for n in names:
            targets[n] = launch(n, tmp, binary, pki_dir, up)
            procs.extend(targets[n].procs)
        for t in targets.values():
            wait_ready(t, ctx)
        sizes = {n: answer_size(t.port, ctx) for n, t in targets.items()} if "new" in modes else {}
        if "keepalive" in modes or "paced" in modes:
            for t in targets.values():  # warm-up: pools, caches, the first connections
                load("load.js", t.url, pki_dir, KEEPALIVE_CONNS, 2)
        for i in range(args.rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            r = run_round(targets, order, modes, pki_dir, args.seconds, sizes)
            rounds.append(r)
            _print_round(i + 1, order, r)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        args.keep = True
        return 1
    finally:
        for proc in reversed(procs):
            stop(proc)
        audits = {n: audit_summary(tmp / n, n) for n in targets}
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rounds": rounds,
                                             "audit": audits}, indent=1))
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    _print_summary(rounds, names, modes)
    print("what the targets logged of the whole run (warm-up and probes included):")
    for n, text in audits.items():
        if text:
            print(f"  {n:<14} {text}")
    load_after = os.getloadavg()
    print(f"load average after {' '.join(f'{x:.2f}' for x in load_after)} (before "
          f"{' '.join(f'{x:.2f}' for x in load_before)}), {os.cpu_count()} CPUs")
    _print_targets(rounds)
    return 0


def audit_summary(folder: Path, name: str) -> str:
    """Statuses in a gateway's audit (every worker's file), decisions in diy's: were the answers 200s."""
    if name == "diy":
        lines = _json_lines([folder / "audit.jsonl"])
        return "policy service decisions " + ", ".join(f"{k} {v}" for k, v in
                                                       Counter(x.get("decision") for x in lines).most_common())
    if not name.startswith("gateway"):
        return ""
    lines = _json_lines(sorted((folder / "data").glob("audit.jsonl*")))
    count = Counter(x.get("status", x.get("event")) for x in lines)
    text = "audit statuses " + ", ".join(f"{k} {v}" for k, v in count.most_common())
    odd = next((x for x in lines if isinstance(x.get("status"), int) and x["status"] != 200), None)
    return text + (f"; first non-200: {odd.get('status')} {odd.get('code')} {odd.get('reason')}" if odd else "")


def _json_lines(paths: list[Path]) -> list[dict]:
    out = []
    for path in paths:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    return out


def _fmt_keepalive(x: dict) -> str:
    return (f"{x['rps']:8.0f} req/s  p50 {x['p50']:5.1f} ms  p99 {x['p99']:5.1f} ms  "
            f"{x.get('cpu_us', 0):5.0f} us CPU/req  errors {x['errors']} non-2xx {x['non2xx']}")


def _fmt_paced(x: dict) -> str:
    def ms(key: str, width: int = 6) -> str:
        return f"{x[key]:{width}.2f}" if x[key] is not None else "-".rjust(width)

    return (f"p50 {ms('p50')}  p99 {ms('p99')}  max {ms('max', 7)}  s_p99 {ms('s_p99', 7)}  "
            f"s_max {ms('s_max', 7)} ms  ({x['rps']:.0f} req/s; errors {x['errors']} non-2xx {x['non2xx']} "
            f"lost {x['lost']})")


def _fmt_new(x: dict) -> str:
    check = "" if abs(x["bytes_per_conn"] - x["answer_bytes"]) <= 0.05 * x["answer_bytes"] else \
        f"  NOT ALL 200s? ({x['answer_bytes']} bytes in a 200)"
    return (f"{x['rps']:6.0f} conn/s  ({x['total']} in {x['wall_s']:.1f} s)  {x.get('cpu_us', 0):6.0f} us CPU/conn  "
            f"{x['bytes_per_conn']:.0f} bytes/conn{check}")


def _ratios(r: dict, pairs, mode: str) -> dict[str, float]:
    return {f"{a}/{b}": r[f"{a}/{mode}"]["rps"] / r[f"{b}/{mode}"]["rps"] for a, b in pairs
            if f"{a}/{mode}" in r and f"{b}/{mode}" in r}


def _nginx_over_gateway(r: dict) -> float | None:
    if "nginx/keepalive" not in r or "gateway/keepalive" not in r:
        return None
    return r["nginx/keepalive"]["rps"] / r["gateway/keepalive"]["rps"]


def _generator_check(x: float) -> str:
    if x > 2:
        return f"generator check: nginx {x:.1f}x the gateway's keep-alive req/s (> 2x: ok)"
    return (f"!!!!! WARNING: nginx is only {x:.2f}x the gateway's keep-alive req/s (not > 2x): the load "
            "generator or the machine, not the gateway, is the limit; these ratios say little !!!!!")


def _print_round(i: int, order: list[str], r: dict) -> None:
    print(f"-- round {i} (order {', '.join(order)})")
    for key, fmt in (("keepalive", _fmt_keepalive), *((f"paced{x}", _fmt_paced) for x in RATES), ("new", _fmt_new)):
        rows = [(n, r[f"{n}/{key}"]) for n in order if f"{n}/{key}" in r]
        if rows:
            print(f"  {key}" + (" (32 conns, closed loop)" if key == "keepalive" else
                                " (openssl s_time -new)" if key == "new" else f" ({PACED_CONNS} conns)"))
        for n, x in rows:
            print(f"    {n:<14} {fmt(x)}")
    for mode, pairs in (("keepalive", KEEPALIVE_RATIOS), ("new", NEW_RATIOS)):
        if ratios := _ratios(r, pairs, mode):
            print(f"  {mode} ratios: " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    if (x := _nginx_over_gateway(r)) is not None:
        print(f"  {_generator_check(x)}")
    sys.stdout.flush()


def _print_summary(rounds: list[dict], names: list[str], modes: list[str]) -> None:
    if not rounds:
        return
    print(f"== medians over {len(rounds)} rounds (min-max)")

    def col(key: str, field: str) -> list[float]:
        return [r[key][field] for r in rounds if key in r and r[key].get(field) is not None]

    if "keepalive" in modes:
        print("  keep-alive, 32 connections: req/s, p99 ms, CPU us a request")
        for n in names:
            k = f"{n}/keepalive"
            print(f"    {n:<14} {spread(col(k, 'rps')):>22} req/s  p99 {spread(col(k, 'p99'), '{:.1f}'):>18} ms  "
                  f"CPU {spread(col(k, 'cpu_us')):>16} us")
    if "new" in modes:
        print("  new connections (s_time): connections/s, CPU us a connection")
        for n in names:
            k = f"{n}/new"
            print(f"    {n:<14} {spread(col(k, 'rps')):>22} conn/s  CPU {spread(col(k, 'cpu_us')):>18} us")
    if "paced" in modes:
        for rate in RATES:
            print(f"  paced at {rate} req/s, {PACED_CONNS} connections, ms (from start: p50 p99 max; "
                  "from due time: s_p99 s_max); errors+non-2xx+lost summed over rounds")
            for n in names:
                k = f"{n}/paced{rate}"
                bad = sum(r[k]["errors"] + r[k]["non2xx"] + r[k]["lost"] for r in rounds if k in r)
                print(f"    {n:<22} " + "  ".join(f"{f} {spread(col(k, f), '{:.2f}')}"
                                                  for f in ("p50", "p99", "max", "s_p99", "s_max")) + f"  bad {bad}")
            for g in (n for n in names if n.startswith("gateway") and "nginx" in names):
                a, b = f"{g}/paced{rate}", f"nginx/paced{rate}"
                diff = {f: [r[a][f] - r[b][f] for r in rounds if r[a][f] is not None and r[b][f] is not None]
                        for f in ("p50", "p99", "max", "s_p99", "s_max")}
                print(f"    {g + ' - nginx':<22} " + "  ".join(f"{f} {spread(v, '{:+.2f}')}" for f, v in diff.items()))
    print("== ratios, taken per round: median (min-max); above 1 the first is faster")
    for mode, pairs, label in (("keepalive", KEEPALIVE_RATIOS, "keep-alive req/s"),
                               ("new", NEW_RATIOS, "new connections/s")):
        per_round = [_ratios(r, pairs, mode) for r in rounds]
        if per_round[0]:
            print(f"  {label}: " + "  ".join(f"{k} {spread([x[k] for x in per_round], '{:.2f}')}"
                                              for k in per_round[0]))
    if xs := [x for x in map(_nginx_over_gateway, rounds) if x is not None]:
        print(f"  lowest over the rounds: {_generator_check(min(xs))}")


def _judged(values: list[float], limit: float, at_least: bool, fmt: str, unit: str = "") -> str:
    """median (min-max), met or not met by the median, and whether the range crosses the limit."""
    mid = statistics.median(values)
    met = mid >= limit if at_least else mid <= limit
    crosses = min(values) < limit <= max(values) if at_least else min(values) <= limit < max(values)
    return f"{spread(values, fmt)}{unit}  {'met' if met else 'not met'}" + ("  (its range crosses the line)"
                                                                            if crosses else "")


def _print_targets(rounds: list[dict]) -> None:
    """The targets the gateway is held to, each from the rounds that ran what it needs; a line is left out
    when a target or mode it needs was not run."""
    if not rounds:
        return
    lines = []

    def ratios(a: str, b: str, mode: str) -> list[float]:
        return [x[f"{a}/{b}"] for x in (_ratios(r, [(a, b)], mode) for r in rounds) if x]

    if xs := ratios("gateway", "nginx", "new"):
        beside = "  ".join(f"{a}/nginx {spread(v, '{:.2f}')}" for a in ("gateway-batch", "floor")
                           if (v := ratios(a, "nginx", "new")))
        lines.append(f"new connections/s gateway/nginx >= 0.80: {_judged(xs, 0.80, True, '{:.2f}')}"
                     + (f"   [not judged: {beside}]" if beside else ""))
    def paced_col(name: str, field: str) -> list[float]:
        k = f"{name}/paced{TARGET_RATE}"
        return [r[k][field] for r in rounds if k in r and r[k].get(field) is not None]

    for field, limit, fmt in (("p50", 0.8, "{:.2f}"), ("p99", 3.0, "{:.2f}"), ("max", 8.0, "{:.1f}")):
        if xs := paced_col("gateway", field):
            batch = paced_col("gateway-batch", field)
            lines.append(f"{field} at {TARGET_RATE} req/s, gateway (audit.sync: answer) <= {limit:.1f} ms: "
                         f"{_judged(xs, limit, False, fmt, ' ms')}"
                         + (f"   [not judged: gateway-batch {spread(batch, fmt)} ms]" if batch else ""))
    if xs := ratios("gateway", "naive", "keepalive"):
        lines.append(f"keep-alive req/s gateway/naive >= 1.0: {_judged(xs, 1.0, True, '{:.2f}')}")
    if lines:
        print(f"== targets: median (min-max) over {len(rounds)} round{'s' * (len(rounds) > 1)}, "
              "met or not by the median")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
