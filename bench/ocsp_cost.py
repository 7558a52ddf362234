"""What an OCSP check (tls.revocation.ocsp: leaf) costs a new connection, cached and uncached.

In a temporary folder: a dev PKI whose client certificate names an OCSP responder
(AIA), OpenSSL's own responder (`openssl ocsp`) for it, one nginx answering as the
upstream, and the gateway with every feature on (as bench/gateway.py runs it) in
three settings, one after the other:

- off: no OCSP;
- cached: ocsp: leaf, answers reused for 300 s (the default): the steady state;
- uncached: ocsp: leaf, ocsp_max_age_s 0.001: every request waits for a fresh answer
  (requests in flight at the same moment share one fetch).

Each is loaded with bench/handshakes.js (a new TLS connection a request, no
resumption), with 1 request in flight (the latency one client sees) and 16 (the
throughput). Prints each round, then medians with their spread, and what cached and
uncached cost against off.

    python bench/ocsp_cost.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
from cryptography import x509  # noqa: E402

from gateway.tools import certs, pki  # noqa: E402
from support import client_ssl, free_port, poll_ready, stop  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_gateway", BENCH / "gateway.py")
bg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bg)

MODES = {"off": None, "cached": {"ocsp": "leaf"}, "uncached": {"ocsp": "leaf", "ocsp_max_age_s": 0.001}}


def responder(tmp: Path, pki_dir: Path, port: int) -> subprocess.Popen:
    """`openssl ocsp` for the dev CA on `port`, listing the bench client certificate as valid."""
    ca = pki.load_ca(pki_dir)
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = pki.make_ocsp_responder(ca, now - dt.timedelta(days=1), now + dt.timedelta(days=30))
    folder = tmp / "ocsp"
    folder.mkdir()
    pki.write_pem(folder / "responder.crt", cert)
    pki.write_pem(folder / "responder.key", key)
    client = x509.load_pem_x509_certificate((pki_dir / "clients" / "bench.crt").read_bytes())
    serial = f"{client.serial_number:X}"
    serial = serial if len(serial) % 2 == 0 else "0" + serial
    end = client.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
    (folder / "index.txt").write_text(f"V\t{end}\t\t{serial}\tunknown\t/CN=bench\n")
    return bg.start(["openssl", "ocsp", "-index", str(folder / "index.txt"), "-port", str(port), "-rsigner",
                     str(folder / "responder.crt"), "-rkey", str(folder / "responder.key"), "-CA",
                     str(pki_dir / "ca.crt"), "-ndays", "1", "-ignore_err"], folder / "ocsp.log")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None or shutil.which("openssl") is None:
        raise SystemExit("nginx (the upstream) and openssl (the OCSP responder) are needed")
    bg.ensure_autocannon()
    results: dict[str, list[dict]] = {f"{m}@{c}": [] for m in MODES for c in (1, 16)}
    with tempfile.TemporaryDirectory(prefix="bench-ocsp-") as name:
        tmp = Path(name)
        pki_dir = tmp / "pki"
        procs: list[subprocess.Popen] = []
        try:
            ocsp_proc, ocsp_port = responder_for(tmp, pki_dir)
            procs.append(ocsp_proc)
            up = free_port()
            order = json.dumps({"id": bg.ORDER_ID, "solicitor": bg.SOLICITOR})
            procs.append(bg.nginx(binary, tmp / "upstream", bg.NGINX_UPSTREAM, port=up, order=order))
            ctx = client_ssl(pki_dir, "bench")
            url = None
            for i in range(args.rounds):
                for mode, revocation in MODES.items():
                    folder = tmp / f"gw-{mode}-{i}"
                    folder.mkdir()
                    (folder / "pki").symlink_to(pki_dir)
                    config, port, _ = bg.gateway_config(folder, up)
                    data = json.loads(config.read_text())
                    if revocation:
                        data["tls"]["revocation"] = {**revocation, "cache_dir": "data/revocation"}
                    config.write_text(json.dumps(data))
                    gw = bg.start([sys.executable, "-m", "gateway", "serve", "-c", str(config)], folder / "gw.log",
                                  cwd=ROOT)
                    try:
                        poll_ready(mode, gw, lambda p=port: bg.handshake_probe(p, ctx), bg.READY_S, folder / "gw.log")
                        url = f"https://localhost:{port}/orders/{bg.ORDER_ID}/state"
                        for conns in (1, 16):
                            r = bg.load("handshakes.js", url, pki_dir, conns, args.seconds, pid=gw.pid)
                            if r["errors"] or r["non2xx"]:
                                raise RuntimeError(f"{mode}: {r['errors']} errors, {r['non2xx']} non-2xx answers; "
                                                   + "\n".join(refusals(folder)))
                            results[f"{mode}@{conns}"].append(r)
                            print(f"round {i + 1} {mode:8} {conns:2} in flight: {r['rps']:6.0f} req/s  "
                                  f"p50 {r['p50']:5.2f} ms  p99 {r['p99']:6.2f} ms  {r['cpu_us']:5.0f} us CPU/req",
                                  flush=True)
                    finally:
                        stop(gw)
        except RuntimeError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in reversed(procs):
                stop(proc)
    print("== medians (min-max)")
    for key, runs in results.items():
        print(f"  {key:12} {bg.spread([r['rps'] for r in runs])} req/s  "
              f"p50 {bg.spread([r['p50'] for r in runs], '{:.2f}')} ms  "
              f"p99 {bg.spread([r['p99'] for r in runs], '{:.2f}')} ms  "
              f"CPU {bg.spread([r['cpu_us'] for r in runs])} us/req")
    for mode in ("cached", "uncached"):
        extra = statistics.median(r["p50"] for r in results[f"{mode}@1"]) - \
            statistics.median(r["p50"] for r in results["off@1"])
        ratio = statistics.median(r["rps"] for r in results[f"{mode}@16"]) / \
            statistics.median(r["rps"] for r in results["off@16"])
        print(f"  {mode}: +{extra:.2f} ms a new connection (p50, one in flight); {ratio:.2f}x the new "
              f"connections/s of off (16 in flight)")
    return 0


def refusals(folder: Path) -> list[str]:
    """Why answers were not 2xx: the gateway's OCSP log lines and the first refusals' reasons."""
    log = [line for line in (folder / "gw.log").read_text().splitlines() if '"event": "ocsp' in line][-3:]
    audit = (folder / "data" / "audit.jsonl").read_text().splitlines()
    return log + [json.loads(line)["reason"] for line in audit if '"status":403' in line][:2]


def responder_for(tmp: Path, pki_dir: Path) -> tuple[subprocess.Popen, int]:
    """The dev PKI, its client certificate naming the responder (AIA), and the responder, polled with a
    real OCSP request until it answers (`openssl ocsp` spins on a connection closed without one)."""
    import urllib.request

    from gateway.core.ocsp import request_der

    port = free_port()
    certs.init(pki_dir, ["bench"], ocsp_url=f"http://127.0.0.1:{port}/")
    proc = responder(tmp, pki_dir, port)
    client = x509.load_pem_x509_certificate((pki_dir / "clients" / "bench.crt").read_bytes())
    body = request_der(client, pki.load_ca(pki_dir)[0])

    def probe() -> None:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body,
                                         headers={"Content-Type": "application/ocsp-request"})
        urllib.request.urlopen(request, timeout=2).read()

    poll_ready("openssl ocsp", proc, probe, 10.0, tmp / "ocsp" / "ocsp.log")
    return proc, port


if __name__ == "__main__":
    raise SystemExit(main())
