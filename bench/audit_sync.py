"""What `audit.sync: answer` costs against `batch`: req/s and latency, measured with autocannon.

Two gateways in front of bench/gateway.py's nginx upstream, alike (every feature on, as
there) but for `audit.sync`, loaded in turn (A B A B) by bench/load.js (autocannon, a
client certificate; `npm install` in bench/ the first time, done here when missing):
32 keep-alive connections, GET /orders/{id}/state. Prints each run and the medians.

    python bench/audit_sync.py [--seconds 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from support import bench_gateway, free_port

bench = bench_gateway()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit("nginx is needed: it is the upstream (Debian: apt install nginx)")
    bench.ensure_autocannon()
    procs = []
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as name:
        tmp = Path(name)
        pki_dir, up = tmp / "pki", free_port()
        bench.certs.init(pki_dir, ["bench"])
        ctx = bench.client_ssl(pki_dir, "bench")
        try:
            procs.append(bench.nginx(binary, tmp / "upstream", bench.NGINX_UPSTREAM, port=up,
                                     order=json.dumps({"id": bench.ORDER_ID, "solicitor": bench.SOLICITOR})))
            urls = {}
            for sync in ("answer", "batch"):
                (d := tmp / sync).mkdir()
                (d / "pki").symlink_to(pki_dir)
                config, port, admin = bench.gateway_config(d, up)
                data = json.loads(config.read_text())
                data["audit"]["sync"] = sync
                config.write_text(json.dumps(data))
                procs.append(gw := bench.start([sys.executable, "-m", "gateway", "serve", "-c", str(config)],
                                               d / "gw.log", cwd=bench.ROOT))
                bench.poll_ready(sync, gw, lambda p=port: bench.handshake_probe(p, ctx), 60, d / "gw.log")
                urls[sync] = f"https://127.0.0.1:{port}/orders/{bench.ORDER_ID}/state"
            runs: dict[str, list[dict]] = {"answer": [], "batch": []}
            for _ in range(args.rounds):
                for sync, url in urls.items():
                    r = bench.load("load.js", url, pki_dir, args.connections, args.seconds)
                    runs[sync].append(r)
                    print(f"sync: {sync:<6} {r['rps']:8.0f} req/s  p50 {r['p50']:5.1f} ms  p99 {r['p99']:5.1f} ms  "
                          f"non-2xx {r['non2xx']}  errors {r['errors']}")
        finally:
            for proc in reversed(procs):
                bench.stop(proc)
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")} for s, rs in runs.items()}
    a, b = med["answer"], med["batch"]
    print(f"medians: answer {a['rps']:.0f} req/s p50 {a['p50']:.1f} p99 {a['p99']:.1f} ms; "
          f"batch {b['rps']:.0f} req/s p50 {b['p50']:.1f} p99 {b['p99']:.1f} ms; answer/batch {a['rps'] / b['rps']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
