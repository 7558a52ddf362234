"""Whether a virtualenv holds the lock file's versions: `python same_as_lock.py FREEZE LOCK` exits 0 when
every pin of LOCK that applies here (its markers) is the version FREEZE (`pip list --format=freeze`) lists."""

import re
import sys

from packaging.markers import Marker

PIN = re.compile(r"^([A-Za-z0-9][\w.-]*)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$", re.M)


def pins(text: str) -> dict[str, str]:
    return {re.sub(r"[-_.]+", "-", name).lower(): version for name, version, marker in PIN.findall(text)
            if not marker or Marker(marker).evaluate()}


installed, locked = (pins(open(path).read()) for path in sys.argv[1:3])
differ = sorted(f"{n} {v} (installed: {installed.get(n)})" for n, v in locked.items() if installed.get(n) != v)
print("differs from the lock: " + ", ".join(differ) if differ else "the lock's set")
sys.exit(1 if differ else 0)
