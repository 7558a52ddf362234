"""What happened to one request: the facts its audit line and its metrics are made of.

Data only: the pipeline fills it in as the request goes, and the observers of a
finished exchange (the audit log, the metrics) read it. No I/O handles in here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.core.errors import Reason
from gateway.core.identity import Identity


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    path: str
    remote: str | None
    started: float = field(default_factory=time.perf_counter)
    identity: Identity | None = None
    client: str = "unknown"
    operation: str | None = None
    order_id: str | None = None
    solicitor: dict | None = None
    decision: str = "deny"
    reason: str = ""
    code: Reason | None = None         # the fixed reason code of a denial (metrics label)
    would_deny: Reason | None = None   # report mode: the code of the denial that was not enforced
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float | None = None
    limit_headers: dict[str, str] | None = None
    streamed: bool = False             # the answer is streamed: its head was decided before its body
    complete: bool | None = None       # the last byte left; None while a stream is under way
    close: bool = False                # close the connection after this answer
    waiting: bool = False              # the client may hold its body back for 100 Continue
    limited: bool = False              # the rate limits have counted this request
    revocation: str | None = None      # tls.revocation could not learn a status and let the request through
    revocation_since: float | None = None   # when it started waiting for the statuses it lacked (clock time)

    def refused(self, status: int, code: Reason, reason: str) -> None:
        self.status, self.code, self.reason = status, code, reason

    @property
    def duration(self) -> float:
        return time.perf_counter() - self.started
