"""The PROXY protocol reader (gateway/core/proxy_protocol.py): v1 and v2, split reads, strictness."""

import ipaddress
import struct

import pytest

from gateway.core.proxy_protocol import MAX_V2_LENGTH, V2_SIGNATURE, Header, ProxyHeaderError, Reader, parse

HELLO = b"\x16\x03\x01\x02\x00\x01"   # the start of a TLS ClientHello: what follows a header


def v2(command: int, fam: int, body: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", len(body)) + body


def v2_inet(src="203.0.113.7", sport=51000, tlvs=b"") -> bytes:
    body = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address("10.0.0.1").packed + struct.pack("!HH", sport, 8443)
    return v2(1, 0x11, body + tlvs)


def v2_inet6(src="2001:db8::7", sport=443, tlvs=b"") -> bytes:
    body = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address("2001:db8::1").packed + struct.pack("!HH", sport, 8443)
    return v2(1, 0x21, body + tlvs)


def read(data: bytes):
    return Reader().feed(data)


@pytest.mark.parametrize("line, source", [
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 8443\r\n", ("192.0.2.10", 56324)),
    (b"PROXY TCP6 2001:db8::a 2001:db8::1 0 8443\r\n", ("2001:db8::a", 0)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", None),
])
def test_v1(line, source):
    assert read(line + HELLO) == (Header(1, source), HELLO)


def test_v2_proxy_ipv4_with_tlvs():
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00" + b"\x20\x00\x05\x01\x00\x00\x00\x00"  # ALPN, NOOP, SSL
    assert read(v2_inet(tlvs=tlvs) + HELLO) == (Header(2, ("203.0.113.7", 51000)), HELLO)


def test_v2_proxy_ipv6_with_tlvs():
    assert read(v2_inet6(tlvs=b"\x05\x00\x04abcd") + HELLO) == (Header(2, ("2001:db8::7", 443)), HELLO)


def test_v2_local_is_the_balancer_itself():
    assert read(v2(0, 0x00, b"") + HELLO) == (Header(2, None, local=True), HELLO)
    assert read(v2(0, 0x11, b"\x00" * 12)) == (Header(2, None, local=True), b"")


@pytest.mark.parametrize("fam, body", [(0x00, b""), (0x31, b"\x00" * 216), (0x00, b"\x03\x00\x00")])
def test_v2_families_it_cannot_use_keep_the_connection_address(fam, body):
    assert read(v2(1, fam, body) + HELLO) == (Header(2, None), HELLO)


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 8443\r\n",
    v2_inet(tlvs=b"\x01\x00\x02h2"),
    v2_inet6(),
    v2(0, 0x00, b""),
])
def test_split_byte_by_byte(data):
    reader = Reader()
    whole = data + HELLO
    for i, byte in enumerate(whole[:len(data) - 1]):
        assert reader.feed(bytes([byte])) is None, i
    header, leftover = reader.feed(whole[len(data) - 1:])
    assert leftover == HELLO and header == read(data)[0]


def test_leftover_keeps_everything_after_the_header():
    tail = bytes(range(256)) * 3
    assert read(b"PROXY UNKNOWN\r\n" + tail)[1] == tail
    assert read(v2_inet() + tail)[1] == tail
    assert parse(b"PROXY UNKNOWN\r\nabc") == (Header(1, None), 15)


@pytest.mark.parametrize("data, message", [
    (HELLO, "no PROXY protocol header"),
    (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
    (b"PROXX", "no PROXY protocol header"),
    (b"proxy TCP4", "no PROXY protocol header"),
    (b"\r\n\r\n\x00\r\nQUIX\n", "bad v2 signature"),
    (V2_SIGNATURE + b"\x11", "version 1, not 2"),
    (v2(1, 0x11, b"\x00" * 12, version=3), "version 3"),
    (v2(2, 0x11, b"\x00" * 12), "unknown command 2"),
    (v2(1, 0x41, b""), "unknown address family"),
    (v2(1, 0x13, b""), "unknown address family"),
    (v2(1, 0x12, b"\x00" * 12), "not a stream"),
    (v2(1, 0x11, b"\x00" * 11), "too short"),
    (v2(1, 0x21, b"\x00" * 35), "too short"),
    (v2(1, 0x31, b"\x00" * 100), "too short"),
    (V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH + 1), "at most"),
    (b"PROXY TCP4 " + b"1" * 120, "longer than 107"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 8443\n", "line break"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 56324\r\n", "not PROXY"),
    (b"PROXY TCP4  192.0.2.10 10.0.0.1 56324 8443\r\n", "not PROXY"),
    (b"PROXY TCP4 192.0.2.10 10.0.0.1 56324 8443 \r\n", "not PROXY"),
    (b"PROXY UDP4 192.0.2.10 10.0.0.1 56324 8443\r\n", "unknown protocol"),
    (b"PROXY TCP4 192.0.2.256 10.0.0.1 56324 8443\r\n", "no TCP4 address"),
    (b"PROXY TCP4 2001:db8::1 10.0.0.1 56324 8443\r\n", "no TCP4 address"),
    (b"PROXY TCP6 192.0.2.1 2001:db8::1 56324 8443\r\n", "no TCP6 address"),
    (b"PROXY TCP4 192.0.2.01 10.0.0.1 56324 8443\r\n", "no TCP4 address"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 65536 8443\r\n", "no port"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 0443 8443\r\n", "no port"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 -1 8443\r\n", "no port"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 \xd9\xa1 8443\r\n", "not printable"),
    (b"PROXY TCP4 192.0.2.1 10.0.0.1 1\t 8443\r\n", "not printable"),
])
def test_malformed_headers_are_refused(data, message):
    with pytest.raises(ProxyHeaderError, match=message):
        read(data)


def test_junk_is_refused_at_its_first_byte():
    with pytest.raises(ProxyHeaderError):
        Reader().feed(b"\x16")
    with pytest.raises(ProxyHeaderError):
        Reader().feed(b"\r\n\r\n\x01")


def test_an_endless_v1_line_is_refused_at_107_bytes():
    reader = Reader()
    data = b"PROXY TCP6 " + b"f" * 200
    with pytest.raises(ProxyHeaderError, match="longer than"):
        for i in range(len(data)):
            reader.feed(data[i:i + 1])
    assert i == 106
