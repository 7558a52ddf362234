"""What one fsync of one appended audit-sized line costs on this machine's disk, from idle and from busy.

Why: under `audit.sync: answer` the gateway appends a line (~600 bytes) and syncs it before
it answers. Under load the syncs come back to back on busy CPUs; a lone request (500 req/s
spread over connections is one every 2 ms) issues its sync from an idle machine. On a virtual
machine whose vCPUs halt when idle (HLT exits to the hypervisor), the I/O completion must
then wake a halted vCPU (an interrupt injected by the hypervisor, the vCPU scheduled again)
before the waiting thread runs, so an fsync issued from idle can cost far more than one issued
while the CPUs are busy. That wake-up is what a lone request under `audit.sync: answer` pays
in its latency, on top of the disk's own flush.

Four situations, COUNT appends each (a few warm-up appends first, not counted), each in a
temporary file of its own in --dir; only the sync call is timed (the write is a copy into the
page cache):

- back to back: write + fsync, no gap;
- idle gap: time.sleep(0.002), then write + fsync;
- busy gap: the same while os.cpu_count() child processes (`python -c`, at nice 19, so that they
  keep every CPU from halting without taking the time slice of the process measured) spin;
- fdatasync: time.sleep(0.002), then write + fdatasync (the size still changes, so the metadata
  that says so is still flushed).

The folder defaults to ./data (created if missing) rather than the temporary folder, which may
be a tmpfs (no disk under it): the filesystem type under the folder is printed from
/proc/mounts. Standard library only.

    python bench/fsync_idle.py [--count 1000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = (b'{"ts":"2026-01-01T00:00:00.000000Z","event":"request","client":"bench","status":200,'
        + b'"x":"' + b"a" * 508 + b'"}\n')  # ~600 bytes, an audit line's size
GAP_S = 0.002
WARMUP = 20
SPIN = "import os\nos.nice(19)\nwhile True:\n    pass\n"


def mount_of(folder: Path) -> tuple[str, str, str]:
    """(device, mount point, filesystem type) of the longest mount point holding FOLDER, from /proc/mounts."""
    path, best = str(folder.resolve()), ("?", "", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        device, point, fstype = fields[0], fields[1].replace("\\040", " "), fields[2]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[1]):
            best = (device, point, fstype)
    return best


def measure(folder: Path, count: int, gap_s: float, sync) -> list[float]:
    """Seconds of each of COUNT sync calls, each after appending one line (and sleeping GAP_S first)."""
    fd, name = tempfile.mkstemp(prefix="fsync-idle-", suffix=".jsonl", dir=folder)
    try:
        os.close(fd)
        fd = os.open(name, os.O_WRONLY | os.O_APPEND)
        times = []
        for i in range(WARMUP + count):
            if gap_s:
                time.sleep(gap_s)
            os.write(fd, LINE)
            t0 = time.perf_counter()
            sync(fd)
            if i >= WARMUP:
                times.append(time.perf_counter() - t0)
        os.close(fd)
        return times
    finally:
        os.unlink(name)


def spinners() -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(os.cpu_count() or 1)]
    time.sleep(0.5)  # let them start and take the CPUs before measuring
    return procs


def summary(label: str, times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    cuts = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return (f"  {label:<34} p50 {cuts[49]:7.3f}  p90 {cuts[89]:7.3f}  p99 {cuts[98]:7.3f}  "
            f"max {max(ms):8.3f} ms  (mean {statistics.fmean(ms):.3f}, n {len(ms)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000, help="appends a situation (default 1000)")
    parser.add_argument("--dir", type=Path, default=Path("data"),
                        help="folder of the temporary file (default ./data, created if missing)")
    args = parser.parse_args()
    if args.count < 1:
        parser.error("--count must be at least 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    device, point, fstype = mount_of(args.dir)
    virtual = "hypervisor" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else None
    before = os.getloadavg()
    print(f"{args.dir.resolve()}: {fstype} on {device} (mounted at {point}); {os.cpu_count()} CPUs"
          + ({True: ", a virtual machine (cpuinfo: hypervisor)", False: ", no hypervisor flag in cpuinfo"}
             .get(virtual, "")))
    print(f"load average before {' '.join(f'{x:.2f}' for x in before)}; {args.count} appends of "
          f"{len(LINE)} bytes a situation, the sync call timed")
    results = [("back to back, fsync", measure(args.dir, args.count, 0, os.fsync))]
    print(summary(*results[-1]), flush=True)
    results.append((f"after {GAP_S * 1000:g} ms idle, fsync", measure(args.dir, args.count, GAP_S, os.fsync)))
    print(summary(*results[-1]), flush=True)
    procs = spinners()
    try:
        results.append((f"after {GAP_S * 1000:g} ms, CPUs busy, fsync",
                        measure(args.dir, args.count, GAP_S, os.fsync)))
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    print(summary(*results[-1]) + f"  [{len(procs)} spinners at nice 19]", flush=True)
    results.append((f"after {GAP_S * 1000:g} ms idle, fdatasync", measure(args.dir, args.count, GAP_S, os.fdatasync)))
    print(summary(*results[-1]), flush=True)
    idle, busy = statistics.median(results[1][1]), statistics.median(results[2][1])
    print(f"median fsync after an idle gap / after the same gap with busy CPUs: {idle / busy:.1f}x "
          f"({idle * 1000:.3f} / {busy * 1000:.3f} ms)")
    after = os.getloadavg()
    print(f"load average after {' '.join(f'{x:.2f}' for x in after)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
