"""The Prometheus metrics, all in one place, in a registry of the gateway's own.

Label values come only from bounded sets: policy names (or "unknown"), the six
operations (or "none"), status codes, and fixed reason codes, never from
anything a client sends. With `serve --workers N` the values go to
prometheus_client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR, set by the
parent before this module loads) and the parent's admin port adds them up;
gauges say how (the sum of open connections, the lowest readiness).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from gateway.core.operations import Operation
from gateway.core.errors import POLICY_REASONS, Reason

# The fixed reason labels of refused handshakes (docs/metrics.md).
HANDSHAKE_REASONS = ("no_certificate", "unknown_ca", "expired", "not_yet_valid", "revoked", "crl_missing",
                     "crl_expired", "bad_purpose", "nonconforming", "bad_signature", "protocol", "timeout", "other")

# No `*_created` series: a timestamp per counter and histogram that no dashboard or alert here uses,
# and that doubles what a scrape carries.
disable_created_metrics()

CERTIFICATE_IN_USE_S = 86400.0   # a client certificate not presented for this long is no longer "in use"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self._requests: dict[tuple, object] = {}
        self._durations: dict[str, tuple] = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("gateway_requests_total", "Requests answered, by client, operation and status",
                                ["client", "operation", "status"], registry=r)
        self.denied = Counter("gateway_denied_total", "Requests refused, by client and reason code",
                              ["client", "reason"], registry=r)
        self.would_deny = Counter("gateway_would_deny_total",
                                  "Requests a policy in report mode would have refused, by client and reason code",
                                  ["client", "reason"], registry=r)
        self.rate_limited = Counter("gateway_rate_limited_total", "Requests refused by a rate limit",
                                    ["client", "operation"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Time from request to the end of the answer",
                                  ["operation"], buckets=BUCKETS, registry=r)
        self.upstream_duration = Histogram("gateway_upstream_duration_seconds",
                                           "Time the upstream took to answer (to its response headers)",
                                           ["operation"], buckets=BUCKETS, registry=r)
        self.handshake_failures = Counter("gateway_tls_handshake_failures_total", "Refused TLS handshakes",
                                          ["reason"], registry=r)
        self.certificate_expiry = Gauge("gateway_certificate_expiry_timestamp_seconds",
                                        "When a certificate, or the CRL's next update, is due (UNIX time)",
                                        ["certificate"], registry=r, multiprocess_mode="livemax")
        self.crl_this_update = Gauge("gateway_crl_this_update_timestamp_seconds",
                                     "lastUpdate of a CRL whose nextUpdate is in gateway_certificate_expiry_timestamp"
                                     "_seconds (same label): the alert warns relative to the CRL's period",
                                     ["certificate"], registry=r, multiprocess_mode="livemax")
        self._expiry_names: set[str] = set()        # the labels set in the two gauges above, to remove later
        self._this_update_names: set[str] = set()
        self.revocation_checks = Counter("gateway_revocation_checks_total",
                                         "Online revocation checks (OCSP answers, fetched CRLs) by result",
                                         ["method", "result"], registry=r)
        self.client_certificate_expiry = Gauge(
            "gateway_client_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate each client presented last (the soonest of those in use); +Inf until seen",
            ["client"], registry=r, multiprocess_mode="livemin")
        self._client_certs: dict[str, dict[str, tuple[float, float]]] = {}   # client -> fingerprint -> (end, seen)
        self.audit_records = Counter("gateway_audit_records_total", "Audit records written", registry=r)
        self.audit_dropped = Counter("gateway_audit_records_dropped_total",
                                     "Audit records dropped because too many were waiting to be written",
                                     registry=r)
        self.config_reloads = Counter("gateway_config_reloads_total", "Configuration reloads by result",
                                      ["result"], registry=r)
        self.upstream_restarts = Counter("gateway_upstream_restarts_total",
                                         "Restarts of the embedded reference API after it exited", registry=r)
        self.connections_open = Gauge("gateway_connections_open", "Open client connections", registry=r,
                                      multiprocess_mode="livesum")
        self.connections_refused = Counter("gateway_connections_refused_total",
                                           "Client connections closed at once, by reason (limit: "
                                           "limits.max_connections were open; proxy_protocol: no valid PROXY "
                                           "header from a trusted proxy)", ["reason"], registry=r)
        self.connections_refused.labels("limit")
        self.connections_refused.labels("proxy_protocol")
        self.ready = Gauge("gateway_ready", "1 while /readyz answers 200", registry=r, multiprocess_mode="livemin")
        self.log_dropped = Counter("gateway_log_lines_dropped_total",
                                   "Operational log lines dropped because stdout did not take them", registry=r)

    def observe(self, ex) -> None:
        """Count a finished exchange (core.exchange.Exchange): the one place that knows the labels.

        The labelled children are kept in dictionaries of our own: prometheus_client's labels()
        checks and joins the label values on every call, which costs more than the count itself.
        """
        op = ex.operation or "none"
        key = (ex.client, op, ex.status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self.requests.labels(ex.client, op, str(ex.status))
        child.inc()
        timing = self._durations.get(op)
        if timing is None:
            timing = self._durations[op] = (self.duration.labels(op), self.upstream_duration.labels(op))
        timing[0].observe(ex.duration)
        if ex.upstream_seconds is not None:
            timing[1].observe(ex.upstream_seconds)
        if ex.decision == "deny":
            self.denied.labels(ex.client, ex.code or "denied").inc()
            if ex.code == "rate_limited":
                self.rate_limited.labels(ex.client, op).inc()
        if ex.would_deny:
            self.would_deny.labels(ex.client, ex.would_deny).inc()

    def init_clients(self, clients: list[str]) -> None:
        """Create every series whose labels are known up front, so that each exists from the first scrape."""
        operations = [op.value for op in Operation] + ["none"]
        for op in operations:
            self.duration.labels(op)
            self.upstream_duration.labels(op)
        for client in [*clients, "unknown"]:
            for reason in Reason:
                self.denied.labels(client, reason.value)
            for reason in POLICY_REASONS:
                self.would_deny.labels(client, reason.value)
            for op in operations:
                self.rate_limited.labels(client, op)
        for reason in HANDSHAKE_REASONS:
            self.handshake_failures.labels(reason)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        for client in clients:
            if client not in self._client_certs:
                self.client_certificate_expiry.labels(client).set(float("inf"))

    def init_revocation(self) -> None:
        for method in ("ocsp", "crl_fetch"):
            for result in ("good", "revoked", "unavailable", "error"):
                self.revocation_checks.labels(method, result)

    def client_certificate_seen(self, client: str, fingerprint: str, not_after: float, now: float) -> None:
        """A connection of `client` with this certificate: the gauge is the soonest end among the
        certificates it used within a day (a renewed certificate replaces the old one a day later)."""
        seen = self._client_certs.setdefault(client, {})
        seen[fingerprint] = (not_after, now)
        for fp in [fp for fp, (_, last) in seen.items() if now - last > CERTIFICATE_IN_USE_S]:
            del seen[fp]
        self.client_certificate_expiry.labels(client).set(min(end for end, _ in seen.values()))

    def set_expiry(self, times: dict[str, float], crl_this_update: dict[str, float] | None = None) -> None:
        """The certificates and CRLs in use now: their series are set, every other one is removed."""
        _replace(self.certificate_expiry, self._expiry_names, times)
        _replace(self.crl_this_update, self._this_update_names, crl_this_update or {})

    def set_crl(self, name: str, this_update: float, next_update: float) -> None:
        """A fetched CRL's period, under the label `name`."""
        self.certificate_expiry.labels(name).set(next_update)
        self.crl_this_update.labels(name).set(this_update)
        self._expiry_names.add(name)
        self._this_update_names.add(name)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def multiprocess() -> bool:
    """Whether values go to prometheus_client's multiprocess folder (`serve --workers N`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


def _replace(gauge: Gauge, names: set[str], values: dict[str, float]) -> None:
    """Set `values` and remove the series of `names` not among them.

    In one process a series is removed. In multiprocess mode prometheus_client can neither
    remove nor clear a series (it only warns, on stderr, and the value stays in the worker's
    file), so a removed series is set to NaN, which the parent's /metrics leaves out
    (admin.py): no stale value is left to keep an alert firing, and nothing is printed.
    """
    for name in names - values.keys():
        if multiprocess():
            gauge.labels(name).set(float("nan"))
        else:
            gauge.remove(name)
    names.clear()
    for name, ts in values.items():
        gauge.labels(name).set(ts)
        names.add(name)
