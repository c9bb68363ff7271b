"""A small authoritative DNS server on loopback (dnslib), over UDP and TCP, for the doctor's tests.

Zones are a dict: name → list of (type, value), e.g. {"example.org": [("TXT", "v=spf1 -all")]},
read at each query (a test may change it while it is served).
Every answer carries the AA flag; a name not in the dict is NXDOMAIN; a TXT value longer than
255 bytes is sent as several strings; a UDP answer over 512 bytes is truncated (TC), so the
client asks again over TCP, as with a real server.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dnslib import AAAA, CNAME, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord

Zone = dict[str, list[tuple[str, str]]]
UDP_LIMIT = 512


def _rdata(rtype: str, value: str) -> object:
    if rtype == "TXT":
        raw = value.encode()
        return TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])
    if rtype == "MX":
        preference, _, host = value.partition(" ")
        return MX(host, int(preference))
    return {"A": A, "AAAA": AAAA, "CNAME": CNAME}[rtype](value)


def answer(zone: Zone, packet: bytes, log: list[tuple[str, bool]] | None = None) -> DNSRecord:
    """The authoritative reply to one query packet (noted in `log` as (name, RD flag))."""
    request = DNSRecord.parse(packet)
    if log is not None:
        log.append((str(request.q.qname).rstrip(".").lower(), bool(request.header.rd)))
    reply = request.reply(aa=1, ra=0)
    qname = str(request.q.qname).rstrip(".").lower()
    qtype = QTYPE[request.q.qtype]
    records = zone.get(qname)
    if records is None:
        reply.header.rcode = RCODE.NXDOMAIN
        return reply
    for rtype, value in records:
        if rtype == qtype or (rtype == "CNAME" and qtype != "CNAME"):
            rr_type = getattr(QTYPE, rtype)
            reply.add_answer(RR(qname, rr_type, rdata=_rdata(rtype, value), ttl=60))
    return reply


class _Udp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = answer(self.server.zone, data, self.server.log)  # type: ignore[attr-defined]
        packed = reply.pack()
        if len(packed) > self.server.udp_limit:  # type: ignore[attr-defined]
            reply.rr = []
            reply.header.tc = 1
            packed = reply.pack()
        sock.sendto(packed, self.client_address)


class _Tcp(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        conn = self.request
        conn.settimeout(5)
        head = conn.recv(2)
        if len(head) < 2:
            return
        (length,) = struct.unpack("!H", head)
        data = b""
        while len(data) < length:
            chunk = conn.recv(length - len(data))
            if not chunk:
                return
            data += chunk
        packed = answer(self.server.zone, data, self.server.log).pack()  # type: ignore[attr-defined]
        conn.sendall(struct.pack("!H", len(packed)) + packed)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _free_port_pair() -> tuple[_UdpServer, _TcpServer]:
    """A UDP and a TCP server bound to the same free port on 127.0.0.1."""
    for _ in range(50):
        udp = _UdpServer(("127.0.0.1", 0), _Udp)
        port = udp.server_address[1]
        try:
            tcp = _TcpServer(("127.0.0.1", port), _Tcp)
        except OSError:
            udp.server_close()
            continue
        return udp, tcp
    raise RuntimeError("no free port for the DNS server")


@contextmanager
def serve_dns(
    zone: Zone, *, udp_limit: int = UDP_LIMIT, log: list[tuple[str, bool]] | None = None
) -> Iterator[int]:
    """Serve `zone` on 127.0.0.1 (UDP and TCP) until the block ends; yields the port.

    UDP answers longer than `udp_limit` bytes are truncated (TC) to send the client to TCP.
    Each query is appended to `log`, when given, as (name, whether recursion was desired).
    """
    for name in list(zone):  # in place: a test may change the zone while it is served
        zone[name.rstrip(".").lower()] = zone.pop(name)
    udp, tcp = _free_port_pair()
    threads = []
    for server in (udp, tcp):
        server.zone = zone  # type: ignore[attr-defined]
        server.udp_limit = udp_limit  # type: ignore[attr-defined]
        server.log = log  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        threads.append(thread)
    try:
        yield udp.server_address[1]
    finally:
        for server in (udp, tcp):
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join(timeout=5)


@contextmanager
def silent_dns() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that receives queries and never answers; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
