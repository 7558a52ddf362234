"""The event loop's CPU for one audit line under `audit.sync: answer`, without TLS, HTTP or load generator.

An AuditWriter with an HMAC key on a log in a temporary folder; records committed one at a
time (every group a single line, as at low load) and eight at a time, for a few seconds
each. Prints this process's CPU microseconds a record (the helper process's write and
fsync not included: they do not hold the event loop). Run two versions back to back to
compare them; absolute figures drift with the machine.

    python bench/audit_commit.py [--seconds 2] [--rounds 3]
    PYTHONPATH=/path/to/other/checkout python bench/audit_commit.py   # another version
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.pop(0)  # bench/, whose gateway.py is not the package; the package: PYTHONPATH's, else this checkout's
if not any(Path(p, "gateway", "__init__.py").is_file() for p in sys.path if p):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.shell.audit_writer import AuditWriter  # noqa: E402

RECORD = {"ts": "2026-11-28T20:00:00.000Z", "request_id": "f0e1d2c3-b4a5-4697-8877-665544332211",
          "client": "bench", "method": "GET", "path": "/orders/22222222-2222-4222-8222-222222222222/state",
          "operation": "order_state", "decision": "allow", "reason": "allowed by policy", "status": 200}


async def measure(seconds: float, rounds: int) -> dict[int, list[float]]:
    results: dict[int, list[float]] = {1: [], 8: []}
    with tempfile.TemporaryDirectory(prefix="bench-commit-") as name:
        writer = AuditWriter(Path(name) / "audit.jsonl", b"bench-audit-key-" + b"k" * 32, None, "answer")
        await writer.start()
        try:
            for _ in range(100):  # the helper started, the file open
                await writer.commit(dict(RECORD), 5)
            for _ in range(rounds):
                for at_once in results:
                    count, cpu, until = 0, time.process_time(), time.monotonic() + seconds
                    while time.monotonic() < until:
                        await asyncio.gather(*(writer.commit(dict(RECORD), 5) for _ in range(at_once)))
                        count += at_once
                    results[at_once].append((time.process_time() - cpu) / count * 1e6)
        finally:
            await writer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import gateway

    print(f"gateway from {Path(gateway.__file__).parent.parent}")
    for at_once, values in asyncio.run(measure(args.seconds, args.rounds)).items():
        print(f"{at_once} at a time: {statistics.median(values):6.1f} us CPU a record "
              f"({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
