"""A small authoritative DNS server on loopback for tests (UDP and TCP).

Serves a zone given as ``{name: [(rtype, value), ...]}``. Values:

* A / AAAA / PTR / CNAME / NS: a string;
* TXT / SPF: a string or a list of strings (one record of several strings);
* MX: ``(preference, exchange)``;
* the markers ``("TIMEOUT", None)`` -- the server never answers for that
  name -- and ``("SERVFAIL", None)``; ``("TIMEOUT", "TXT")`` stays silent
  only for queries of that type (a server that drops some types).

Unknown names answer NXDOMAIN, known names without the asked type answer
NOERROR with no records (NODATA); both carry an SOA so resolvers can cache
them negatively for ``negative_ttl`` seconds. Names with a CNAME are chased
inside the zone. ``*.`` wildcard names are honoured. UDP answers over 512
bytes are truncated (TC) so clients retry over TCP.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord
from dnslib.dns import DNSError

Zone = dict[str, list[tuple[str, Any]]]

_TYPES = {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME, "NS": NS}


def _chunks(text: str) -> list[bytes]:
    raw = text.encode("utf-8", "surrogateescape")
    return [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]


def _rdata(rtype: str, value: Any) -> Any:
    if rtype in _TYPES:
        return _TYPES[rtype](value)
    if rtype in ("TXT", "SPF"):
        parts = value if isinstance(value, list | tuple) else [value]
        strings: list[bytes] = []
        for p in parts:
            strings.extend(_chunks(p) if isinstance(p, str) else [p])
        return TXT(strings)
    if rtype == "MX":
        pref, host = value
        return MX(host, pref)
    raise ValueError(f"unsupported record type {rtype}")


def _name_text(name: Any) -> str:
    """The query name as zone text: labels joined raw (no ``\\032`` escapes)."""
    labels = (label.decode("utf-8", "surrogateescape") for label in name.label)
    return ".".join(labels).lower()


class ZoneData:
    """Zone lookup logic, thread-safe to replace while serving."""

    def __init__(self, zone: Zone | None = None, ttl: int = 300, negative_ttl: int = 60) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.lock = threading.Lock()
        self.queries: list[tuple[str, str]] = []
        self.set(zone or {})

    def set(self, zone: Zone) -> None:
        norm = {k.lower().rstrip("."): list(v) for k, v in zone.items()}
        with self.lock:
            self.zone = norm

    def _find(self, name: str) -> list[tuple[str, Any]] | None:
        if name in self.zone:
            return self.zone[name]
        labels = name.split(".")
        for i in range(1, len(labels)):
            wild = "*." + ".".join(labels[i:])
            if wild in self.zone:
                return self.zone[wild]
        return None

    def answer(self, request: DNSRecord) -> DNSRecord | None:
        """The reply, or None to stay silent (TIMEOUT)."""
        q = request.q
        qname = _name_text(q.qname)
        qtype = QTYPE[q.qtype]
        reply = request.reply()
        reply.header.aa = 1
        with self.lock:
            self.queries.append((qname, qtype))
            name, seen = qname, 0
            while True:
                records = self._find(name)
                if records is None:
                    if name == qname:
                        reply.header.rcode = RCODE.NXDOMAIN
                    break
                kinds = {r for r, _ in records}
                silent = {v for r, v in records if r == "TIMEOUT"}
                if None in silent or qtype in silent:
                    return None
                if "SERVFAIL" in kinds:
                    reply.header.rcode = RCODE.SERVFAIL
                    return reply
                cname = [v for r, v in records if r == "CNAME"]
                if cname and qtype != "CNAME" and seen < 8:
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(cname[0]), ttl=self.ttl))
                    name, seen = cname[0].lower().rstrip("."), seen + 1
                    continue
                for rtype, value in records:
                    if rtype == qtype:
                        reply.add_answer(RR(name, getattr(QTYPE, rtype),
                                            rdata=_rdata(rtype, value), ttl=self.ttl))
                break
        if not reply.rr:
            soa = SOA("ns.test", "hostmaster.test", (1, 3600, 600, 86400, self.negative_ttl))
            reply.add_auth(RR("test", QTYPE.SOA, rdata=soa, ttl=self.negative_ttl))
        return reply


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        out = _respond(self.server.zonedata, data, udp=True)
        if out is not None:
            sock.sendto(out, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(5)
        try:
            while True:
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
                out = _respond(self.server.zonedata, data, udp=False)
                if out is None:
                    return
                conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            return


def _respond(zonedata: ZoneData, data: bytes, *, udp: bool) -> bytes | None:
    try:
        request = DNSRecord.parse(data)
    except DNSError:
        return None
    reply = zonedata.answer(request)
    if reply is None:
        return None
    out: bytes = reply.pack()
    if udp and len(out) > 512:
        trunc = request.reply()
        trunc.header.tc = 1
        trunc.header.aa = 1
        out = trunc.pack()
    return out


class _UDPServer(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True
    allow_reuse_address = True
    zonedata: ZoneData


class _TCPServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True
    zonedata: ZoneData


class DNSServer:
    """``with DNSServer(zone) as dns: ... dns.address -> "127.0.0.1:PORT"``."""

    def __init__(self, zone: Zone | None = None, host: str = "127.0.0.1", port: int = 0,
                 ttl: int = 300, negative_ttl: int = 60) -> None:
        self.zonedata = ZoneData(zone, ttl, negative_ttl)
        # UDP and TCP on the same port number.
        for _ in range(20):
            udp = _UDPServer((host, port), _UDPHandler)
            try:
                tcp = _TCPServer((host, udp.server_address[1]), _TCPHandler)
            except OSError:
                udp.server_close()
                if port:
                    raise
                continue
            break
        else:  # pragma: no cover
            raise RuntimeError("no free port for the test DNS server")
        udp.zonedata = tcp.zonedata = self.zonedata
        self._servers = (udp, tcp)
        self.host, self.port = host, udp.server_address[1]
        self._threads: list[threading.Thread] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_zone(self, zone: Zone) -> None:
        self.zonedata.set(zone)

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self.zonedata.queries

    def start(self) -> DNSServer:
        for srv in self._servers:
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1},
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
