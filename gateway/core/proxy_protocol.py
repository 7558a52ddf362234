"""The PROXY protocol header (v1 text, v2 binary) a TCP load balancer puts before a connection's bytes.

A small, strict reader with no I/O: `Reader.feed(bytes)` returns None while the header is
incomplete, raises ProxyHeaderError as soon as the bytes cannot be a header, and otherwise
returns (Header, leftover bytes: what follows the header, the start of the TLS handshake).

What is accepted (haproxy's proxy-protocol.txt):
- v1: "PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\\r\\n" or "PROXY UNKNOWN ...\\r\\n", at most 107 bytes,
  single spaces, addresses in their usual textual form, ports 0-65535 without leading zeros.
- v2: the 12-byte signature, version 2, command LOCAL or PROXY, at most MAX_V2_LENGTH bytes of
  addresses and TLVs (the TLVs are skipped). LOCAL (the balancer's own health check) and an address
  family the gateway cannot use (UNSPEC, unix) carry no client address: Header.source is None and the
  connection's own address stands.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
MAX_V2_LENGTH = 4096

_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0, 1, 2, 3
_T_UNSPEC, _T_STREAM, _T_DGRAM = 0, 1, 2


class ProxyHeaderError(ValueError):
    """The bytes are not a PROXY protocol header the gateway accepts (the message says why)."""


@dataclass(frozen=True)
class Header:
    version: int                           # 1 or 2
    source: tuple[str, int] | None         # the client's (address, port); None: keep the connection's own
    local: bool = False                    # v2 LOCAL: the balancer speaking for itself (a health check)


def parse(data: bytes) -> tuple[Header, int] | None:
    """The header at the start of `data` and its length in bytes, None when more bytes are needed."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    raise ProxyHeaderError("no PROXY protocol header (the connection does not start with one)")


def _parse_v1(data: bytes) -> tuple[Header, int] | None:
    head = data[:len(V1_PREFIX)]
    if head != V1_PREFIX[:len(head)]:
        raise ProxyHeaderError("no PROXY protocol header (the connection does not start with one)")
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES:
            raise ProxyHeaderError(f"v1 header longer than {V1_MAX_BYTES} bytes")
        if b"\n" in data or (b"\r" in data[:-1]):
            raise ProxyHeaderError("v1 header: line break without \\r\\n")
        return None
    line = data[:end]
    if any(b < 0x20 or b > 0x7e for b in line):
        raise ProxyHeaderError("v1 header: bytes that are not printable ASCII")
    parts = line.decode("ascii").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return Header(1, None), end + 2     # the rest of an UNKNOWN line is ignored, as the spec says
    if len(parts) != 6:
        raise ProxyHeaderError("v1 header: not PROXY <TCP4|TCP6|UNKNOWN> <src> <dst> <sport> <dport>")
    _, proto, src, dst, sport, dport = parts
    kinds = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}
    if proto not in kinds:
        raise ProxyHeaderError(f"v1 header: unknown protocol {proto!r}")
    for text in (src, dst):
        try:
            kinds[proto](text)
        except ValueError:
            raise ProxyHeaderError(f"v1 header: {text!r} is no {proto} address") from None
    ports = [_v1_port(p) for p in (sport, dport)]
    return Header(1, (str(kinds[proto](src)), ports[0])), end + 2


def _v1_port(text: str) -> int:
    if not text.isdigit() or not text.isascii() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ProxyHeaderError(f"v1 header: {text!r} is no port")
    return int(text)


def _parse_v2(data: bytes) -> tuple[Header, int] | None:
    head = data[:len(V2_SIGNATURE)]
    if head != V2_SIGNATURE[:len(head)]:
        raise ProxyHeaderError("no PROXY protocol header (bad v2 signature)")
    if len(data) < 16:
        if len(data) > 12 and data[12] >> 4 != 2:
            raise ProxyHeaderError(f"v2 header: version {data[12] >> 4}, not 2")
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"v2 header: version {ver_cmd >> 4}, not 2")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise ProxyHeaderError(f"v2 header: unknown command {command}")
    family, transport = fam >> 4, fam & 0x0F
    if family > _AF_UNIX or transport > _T_DGRAM:
        raise ProxyHeaderError(f"v2 header: unknown address family/protocol 0x{fam:02x}")
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"v2 header: {length} bytes of addresses and TLVs (at most {MAX_V2_LENGTH})")
    total = 16 + length
    if len(data) < total:
        return None
    if command == 0:
        return Header(2, None, local=True), total
    if family in (_AF_INET, _AF_INET6):
        if transport != _T_STREAM:
            raise ProxyHeaderError("v2 header: not a stream (TCP) connection")
        size = 12 if family == _AF_INET else 36
        if length < size:
            raise ProxyHeaderError(f"v2 header: {length} bytes, too short for its addresses")
        n = 4 if family == _AF_INET else 16
        address = ipaddress.ip_address(bytes(data[16:16 + n]))
        sport = struct.unpack_from("!H", data, 16 + 2 * n)[0]
        return Header(2, (str(address), sport)), total
    if family == _AF_UNIX and length < 216:
        raise ProxyHeaderError(f"v2 header: {length} bytes, too short for unix addresses")
    return Header(2, None), total           # UNSPEC or unix: no usable address, keep the connection's


class Reader:
    """Bytes fed as they arrive -> None (need more), or (Header, leftover); ProxyHeaderError when wrong."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> tuple[Header, bytes] | None:
        self._buffer += data
        found = parse(bytes(self._buffer))
        if found is None:
            return None
        header, used = found
        leftover = bytes(self._buffer[used:])
        self._buffer.clear()
        return header, leftover
