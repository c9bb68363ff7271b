"""DNS for `newsletter doctor`: ask the authoritative name servers of a zone, never a cache.

A caching resolver may hold yesterday's SPF or DKIM record for hours, so each name is asked of
its zone's own servers (found by walking up the labels for an NS set, with recursion not desired)
or, with `[doctor] nameservers`, of the servers given (with recursion desired: split DNS
usually means a recursive resolver). Every query has a timeout; a server that
did not answer once is not asked again in the same run, so a dead or hostile server costs one
timeout, not one per name. A server that answers, but slowly, is bounded by the run's budget
(TIMEOUTS_PER_RUN timeouts in all, from the first query): past it nothing more is asked and each
name left is a DnsError at once. Failures are DnsError: one line naming the server and what
happened.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX
from dns.rdtypes.ANY.TXT import TXT
from dns.rdtypes.IN.A import A
from dns.rdtypes.IN.AAAA import AAAA

from newsletter.config import split_server
from newsletter.errors import NewsletterError

MAX_CNAME_HOPS = 8
# A run's DNS time in all, in timeouts: a normal check asks a few dozen names in milliseconds each;
# an SPF chain of hundreds of names on a server that answers just before each timeout would
# otherwise hold the doctor for many minutes.
TIMEOUTS_PER_RUN = 10


class DnsError(NewsletterError):
    """A name could not be asked: no server answered, or one answered with an error."""


@dataclass
class AuthoritativeDns:
    """Asks each name of its zone's authoritative servers (or of `servers`, when given)."""

    timeout: float = 3.0
    servers: tuple[tuple[str, int], ...] = ()  # fixed (address, port) pairs; () = find them
    _dead: set[tuple[str, int]] = field(default_factory=set)
    _zones: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)
    _answers: dict[tuple[str, str], list[dns.rdata.Rdata]] = field(default_factory=dict)
    _deadline: float | None = None  # time.monotonic() at which the run's budget is spent

    @classmethod
    def from_settings(cls, nameservers: Sequence[str], timeout: float) -> AuthoritativeDns:
        """The resolver `[doctor]` describes."""
        return cls(timeout=timeout, servers=tuple(split_server(s) for s in nameservers))

    def txt(self, name: str) -> list[str]:
        """The TXT records at `name`, each one's strings joined ([] when there are none)."""
        rdatas = self.query(name, "TXT")
        return [
            b"".join(r.strings).decode("utf-8", "replace") for r in rdatas if isinstance(r, TXT)
        ]

    def addresses(self, name: str, version: int) -> list[str]:
        """The A (version 4) or AAAA (version 6) addresses of `name`."""
        found = self.query(name, "A" if version == 4 else "AAAA")
        return [str(r.address) for r in found if isinstance(r, A | AAAA)]

    def mx(self, name: str) -> list[str]:
        """The mail exchangers' host names of `name`."""
        found = self.query(name, "MX")
        return [r.exchange.to_text(omit_final_dot=True) for r in found if isinstance(r, MX)]

    def query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        """The records of one type at `name`, following CNAMEs ([] for no such name or type)."""
        key = (name.lower().rstrip("."), rdtype)
        if key not in self._answers:
            self._answers[key] = self._query(name, rdtype)
        return self._answers[key]

    def _query(self, name: str, rdtype: str) -> list[dns.rdata.Rdata]:
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as e:
            raise DnsError(f"{name!r} is not a domain name ({type(e).__name__})") from None
        wanted = dns.rdatatype.from_text(rdtype)
        for _ in range(MAX_CNAME_HOPS):
            response = self._ask(qname, wanted)
            if response.rcode() == dns.rcode.NXDOMAIN:
                return []
            found = response.get_rrset(response.answer, qname, dns.rdataclass.IN, wanted)
            if found is not None:
                return list(found)
            alias = response.get_rrset(
                response.answer, qname, dns.rdataclass.IN, dns.rdatatype.CNAME
            )
            if alias is None:
                return []
            qname = alias[0].target
        raise DnsError(f"{name}: more than {MAX_CNAME_HOPS} CNAMEs in a row")

    def _left(self, qname: dns.name.Name) -> float:
        """Seconds the run may still spend on DNS (at most one timeout); DnsError when none."""
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + TIMEOUTS_PER_RUN * self.timeout
        left = min(self.timeout, self._deadline - now)
        if left <= 0:
            spent = TIMEOUTS_PER_RUN * self.timeout
            raise DnsError(
                f"cannot ask DNS for {qname.to_text(True)}: the run's DNS budget of {spent:g}s"
                " is spent (slow name servers); not asked"
            )
        return left

    def _ask(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> dns.message.Message:
        """One answer from the first server that gives one; DnsError when none does."""
        self._left(qname)
        servers = self.servers or self._zone_servers(qname)
        problem = "no name server to ask"
        for server in servers:
            if server in self._dead:
                problem = f"{_show(server)} did not answer earlier"
                continue
            left = self._left(qname)
            try:
                response = self._ask_one(qname, rdtype, server, left)
            except (dns.exception.Timeout, TimeoutError):
                self._dead.add(server)
                problem = f"no answer from {_show(server)} within {left:g}s"
                continue
            except (dns.exception.DNSException, OSError, ValueError) as e:
                self._dead.add(server)
                problem = f"{_show(server)} gave no usable answer ({type(e).__name__})"
                continue
            if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            problem = f"{_show(server)} answered {dns.rcode.to_text(response.rcode())}"
        raise DnsError(f"cannot ask DNS for {qname.to_text(True)}: {problem}")

    def _ask_one(
        self,
        qname: dns.name.Name,
        rdtype: dns.rdatatype.RdataType,
        server: tuple[str, int],
        timeout: float,
    ) -> dns.message.Message:
        """Ask one server over UDP, again over TCP if truncated, within `timeout` in all.

        Recursion is desired only of `servers` given in [doctor] nameservers (behind split DNS
        these are usually recursive resolvers); never of the zone's authoritative servers.
        """
        request = dns.message.make_query(qname, rdtype, use_edns=0, payload=4096)
        if self.servers:
            request.flags |= dns.flags.RD
        else:
            request.flags &= ~dns.flags.RD
        host, port = server
        deadline = time.monotonic() + timeout
        response = dns.query.udp(request, host, port=port, timeout=timeout)
        if response.flags & dns.flags.TC:
            left = deadline - time.monotonic()
            if left <= 0:
                raise dns.exception.Timeout
            response = dns.query.tcp(request, host, port=port, timeout=left)
        return response

    def _zone_servers(self, qname: dns.name.Name) -> tuple[tuple[str, int], ...]:
        """The addresses of the authoritative servers of the zone holding `qname`."""
        resolver = dns.resolver.Resolver()
        name = qname
        try:
            while True:
                key = name.to_text()
                if key in self._zones:
                    return self._zones[key]
                resolver.lifetime = self._left(qname)  # one label at a time, up to 127 of them
                try:
                    ns = resolver.resolve(name, "NS", raise_on_no_answer=False)
                except dns.resolver.NXDOMAIN:
                    ns = None
                if ns is not None and ns.rrset is not None:
                    break
                name = name.parent()
            found: list[tuple[str, int]] = []
            for record in ns.rrset:
                for kind in ("A", "AAAA"):
                    resolver.lifetime = self._left(qname)
                    answer = resolver.resolve(record.target, kind, raise_on_no_answer=False)
                    found.extend((a.address, 53) for a in answer.rrset or ())
        except dns.name.NoParent:
            raise DnsError(f"no zone found for {qname.to_text(True)}") from None
        except dns.exception.DNSException as e:
            raise DnsError(
                f"cannot find the name servers of {qname.to_text(True)}: {type(e).__name__}"
            ) from None
        self._zones[name.to_text()] = tuple(found)
        return tuple(found)


def _show(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
