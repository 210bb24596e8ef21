"""A small authoritative DNS server on loopback (UDP and TCP), built on
dnspython (a runtime dependency, so ``mxguard demo`` needs no test extras).

Serves a zone given as ``{name: [(rtype, value), ...]}``. Values:

* A / AAAA / PTR / CNAME / NS: a string;
* TXT / SPF: a string or a list of strings (one record of several strings);
  strings over 255 bytes are split, bytes are sent as they are;
* MX: ``(preference, exchange)``;
* the markers ``("TIMEOUT", None)`` -- the server never answers for that
  name -- and ``("SERVFAIL", None)``; ``("TIMEOUT", "TXT")`` stays silent
  only for queries of that type (a server that drops some types).

Unknown names answer NXDOMAIN, known names without the asked type answer
NOERROR with no records (NODATA); both carry an SOA so resolvers can cache
them negatively for ``negative_ttl`` seconds. Names with a CNAME are chased
inside the zone. ``*.`` wildcard names are honoured. UDP answers over 512
bytes are truncated (TC) so clients retry over TCP. Every query is recorded
in ``queries`` as ``(name, type)``.

    with DNSServer({"example.test": [("TXT", "v=spf1 -all")]}) as dns:
        ...  # dns.address -> "127.0.0.1:PORT"
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.CNAME import CNAME
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.NS import NS
from dns.rdtypes.ANY.PTR import PTR
from dns.rdtypes.ANY.SOA import SOA
from dns.rdtypes.ANY.SPF import SPF
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

Zone = dict[str, list[tuple[str, Any]]]

_IN = dns.rdataclass.IN


def _name(text: str) -> dns.name.Name:
    """``text`` as an absolute name, labels taken raw (no escapes, no IDNA)."""
    text = text.rstrip(".")
    labels = [label.encode("utf-8", "surrogateescape") for label in text.split(".")] \
        if text else []
    return dns.name.Name([*labels, b""])


def _name_text(name: dns.name.Name) -> str:
    """The query name as zone text: labels joined raw (no ``\\032`` escapes)."""
    labels = (label.decode("utf-8", "surrogateescape") for label in name.labels if label)
    return ".".join(labels).lower()


def _chunks(text: str) -> list[bytes]:
    raw = text.encode("utf-8", "surrogateescape")
    return [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]


_CLASSES: dict[str, Any] = {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME, "NS": NS,
                           "TXT": TXT, "SPF": SPF, "MX": MX, "SOA": SOA}


def _make(rtype: str, *args: Any) -> dns.rdata.Rdata:
    rdata: dns.rdata.Rdata = _CLASSES[rtype](_IN, dns.rdatatype.from_text(rtype), *args)
    return rdata


def _rdata(rtype: str, value: Any) -> dns.rdata.Rdata:
    if rtype in ("A", "AAAA"):
        return _make(rtype, value)
    if rtype in ("PTR", "CNAME", "NS"):
        return _make(rtype, _name(value))
    if rtype in ("TXT", "SPF"):
        parts = value if isinstance(value, list | tuple) else [value]
        strings: list[bytes] = []
        for p in parts:
            strings.extend(_chunks(p) if isinstance(p, str) else [p])
        return _make(rtype, strings)
    if rtype == "MX":
        pref, host = value
        return _make("MX", int(pref), _name(host))
    raise ValueError(f"unsupported record type {rtype}")


def _rrset(name: str, ttl: int, rdata: dns.rdata.Rdata) -> dns.rrset.RRset:
    return dns.rrset.from_rdata(_name(name), ttl, rdata)


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

    def answer(self, request: dns.message.Message) -> dns.message.Message | None:
        """The reply, or None to stay silent (TIMEOUT or no question)."""
        if not request.question:
            return None
        q = request.question[0]
        qname = _name_text(q.name)
        qtype = dns.rdatatype.to_text(q.rdtype)
        reply = _reply(request)
        with self.lock:
            self.queries.append((qname, qtype))
            name, seen = qname, 0
            while True:
                records = self._find(name)
                if records is None:
                    if name == qname:
                        reply.set_rcode(dns.rcode.NXDOMAIN)
                    break
                kinds = {r for r, _ in records}
                silent = {v for r, v in records if r == "TIMEOUT"}
                if None in silent or qtype in silent:
                    return None
                if "SERVFAIL" in kinds:
                    reply.set_rcode(dns.rcode.SERVFAIL)
                    return reply
                cname = [v for r, v in records if r == "CNAME"]
                if cname and qtype != "CNAME" and seen < 8:
                    reply.answer.append(_rrset(name, self.ttl, _rdata("CNAME", cname[0])))
                    name, seen = cname[0].lower().rstrip("."), seen + 1
                    continue
                for rtype, value in records:
                    if rtype == qtype:  # one RRset per record: order kept, nothing merged
                        reply.answer.append(_rrset(name, self.ttl, _rdata(rtype, value)))
                break
        if not reply.answer:
            soa = _make("SOA", _name("ns.test"), _name("hostmaster.test"), 1, 3600, 600,
                        86400, self.negative_ttl)
            reply.authority.append(_rrset("test", self.negative_ttl, soa))
        return reply


def _reply(request: dns.message.Message) -> dns.message.Message:
    """An authoritative, empty reply to ``request`` (no EDNS)."""
    reply = dns.message.make_response(request)
    reply.use_edns(False)
    reply.flags |= dns.flags.AA
    return reply


class _UDPHandler(socketserver.BaseRequestHandler):
    server: _UDPServer

    def handle(self) -> None:
        data, sock = self.request
        out = respond(self.server.zonedata, data, udp=True)
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
                out = respond(self.server.zonedata, data, udp=False)
                if out is None:
                    return
                conn.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            return


def respond(zonedata: ZoneData, data: bytes, *, udp: bool) -> bytes | None:
    """The wire reply to the wire query ``data``, or None to stay silent."""
    try:
        request = dns.message.from_wire(data)
    except (dns.exception.DNSException, ValueError):
        return None
    reply = zonedata.answer(request)
    if reply is None:
        return None
    out: bytes = reply.to_wire()
    if udp and len(out) > 512:
        trunc = _reply(request)
        trunc.flags |= dns.flags.TC
        out = trunc.to_wire()
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
            raise RuntimeError("no free port for the loopback DNS server")
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
