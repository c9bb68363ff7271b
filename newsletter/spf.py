"""SPF (RFC 7208) for `newsletter doctor`: parse a record, count its DNS lookups, evaluate it.

Pure over a `Lookup` (txt, addresses, mx), so the doctor can ask the authoritative servers and
the tests can give records in a dict. Macros are expanded for the letters s, l, o, d, i, h (with
the digit and `r` transformers); `ptr` is counted but never matches (RFC 7208 says not to use it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

LOOKUP_LIMIT = 10  # RFC 7208 §4.6.4: mechanisms and modifiers that cause DNS queries
VOID_LIMIT = 2  # RFC 7208 §4.6.4: lookups that return no answer
MX_LIMIT = 10  # RFC 7208 §4.6.4: MX hosts of one mx mechanism; more is a permerror
LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists")
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
# One macro: %{letter digits r delimiters}. Linear: a fixed sequence of single-character classes,
# each repeated without overlap (digits at most 3: RFC 7208 §7.1 asks for 128 at most, and a
# longer run would be an integer int() refuses past 4,300 digits), anchored at a "%".
_MACRO = re.compile(r"%\{([slodiphcrtvSLODIPHCRTV])([0-9]{0,3})([rR]?)([.+,/_=-]*)\}")


class Lookup(Protocol):
    """The DNS queries SPF needs."""

    def txt(self, name: str) -> list[str]: ...
    def addresses(self, name: str, version: int) -> list[str]: ...
    def mx(self, name: str) -> list[str]: ...


class SpfPermError(Exception):
    """The record cannot be evaluated (RFC 7208 permerror): says why."""


@dataclass(frozen=True)
class Term:
    """One term of a record: a mechanism with its qualifier, or a modifier (qualifier "=")."""

    qualifier: str
    name: str
    value: str  # the domain-spec, address, or modifier value; "" when absent

    def text(self) -> str:
        """The term as written in a record ("+" left out)."""
        if self.qualifier == "=":
            return f"{self.name}={self.value}"
        prefix = "" if self.qualifier == "+" else self.qualifier
        sep = "" if self.value.startswith("/") or not self.value else ":"  # a/24 has no domain
        return f"{prefix}{self.name}{sep}{self.value}"


def spf_records(txts: list[str]) -> list[str]:
    """The SPF records among a name's TXT records (those that start with "v=spf1")."""
    return [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


def parse_spf(record: str) -> list[Term]:
    """The terms of one SPF record; SpfPermError for any term that does not parse.

    The whole record is checked before it is evaluated (RFC 7208 §4.6): an error after the term
    that matches still makes the record a permerror.
    """
    terms: list[Term] = []
    # Terms are separated by spaces (SP) only, RFC 7208 §4.6.1: a receiver reads a tab or a
    # non-breaking space as part of a term, which then does not parse.
    for word in record.split(" ")[1:]:
        if not word:
            continue  # several spaces in a row
        if odd := next((c for c in word if c.isspace() or not c.isprintable()), None):
            raise SpfPermError(
                f"{describe_char(odd)} in {word!r}: SPF terms are separated by plain spaces only"
            )
        name, eq, value = word.partition("=")
        modifier = eq and name[:1].isascii() and name[:1].isalpha()
        modifier = modifier and name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        if modifier and name.lower() not in MECHANISMS:
            _check_macro_string(value, word)
            if name.lower() in ("redirect", "exp"):
                if any(t.qualifier == "=" and t.name == name.lower() for t in terms):
                    raise SpfPermError(f"more than one {name.lower()}= in the record")
                _check_domain_spec(value, word)
            terms.append(Term("=", name.lower(), value))
            continue
        qualifier = word[0] if word[0] in QUALIFIERS else "+"
        body = word[1:] if word[0] in QUALIFIERS else word
        name, sep, value = body.partition(":")
        if "/" in name and not sep:  # a/24, mx/24//64
            name, slash, rest = name.partition("/")
            value = slash + rest
        name = name.lower()
        if name not in MECHANISMS:
            raise SpfPermError(f"unknown term {word!r}")
        _check_mechanism(name, value, bool(sep), word)
        terms.append(Term(qualifier, name, value))
    return terms


_CHAR_NAMES = {
    "\t": "a tab",
    "\n": "a line feed",
    "\r": "a carriage return",
    "\u00a0": "a non-breaking space",
}


def describe_char(char: str) -> str:
    """A character a reader of the record cannot see, named: "a tab (U+0009)"."""
    return f"{_CHAR_NAMES.get(char, 'the character')} (U+{ord(char):04X})"


def _check_mechanism(name: str, value: str, colon: bool, word: str) -> None:
    """SpfPermError when a mechanism's value is not what RFC 7208 §5 allows."""
    if colon and not value:
        raise SpfPermError(f"empty value in {word!r}")
    if name == "all":
        if value or colon:
            raise SpfPermError(f"all takes no value: {word!r}")
    elif name in ("ip4", "ip6"):
        if not value:
            raise SpfPermError(f"{name} needs a value in {word!r}")
        address, slash, length = value.partition("/")
        kind = ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address
        top = 32 if name == "ip4" else 128
        try:
            kind(address)
        except ValueError:
            raise SpfPermError(f"bad address in {word!r}") from None
        if slash and not (length.isascii() and length.isdigit() and int(length) <= top):
            raise SpfPermError(f"bad prefix length in {word!r}")
    elif name in ("include", "exists", "ptr"):
        if name != "ptr" and not value:
            raise SpfPermError(f"{name} needs a value in {word!r}")
        if value:
            _check_domain_spec(value, word)
    else:  # a, mx: [":" domain-spec] [dual-cidr-length]
        spec, _, _ = _cidr(value)
        if spec:
            _check_domain_spec(spec, word)


def _check_macro_string(text: str, word: str) -> None:
    """SpfPermError unless `text` is a macro-string (RFC 7208 §7.1).

    Linear: one pass over the text; each `%` is followed by `%`, `_`, `-` or one macro matched
    by _MACRO (anchored at that `%`, a fixed sequence of non-overlapping character classes).
    """
    if not text.isascii() or not text.isprintable():
        raise SpfPermError(f"not printable ASCII: {word!r}")
    i = text.find("%")
    while i != -1:
        if text[i + 1 : i + 2] in ("%", "_", "-"):
            i = text.find("%", i + 2)
            continue
        match = _MACRO.match(text, i)
        if match is None:
            raise SpfPermError(f"bad macro in {word!r}")
        i = text.find("%", match.end())


def _check_domain_spec(spec: str, word: str) -> None:
    """SpfPermError unless `spec` is a domain-spec: a macro-string ending in a top label or a
    macro; without macros, a domain name (labels of 1 to 63 characters, at most 253 in all)."""
    _check_macro_string(spec, word)
    if spec.endswith("}"):
        return
    if "%" not in spec and not valid_domain(spec):
        raise SpfPermError(f"bad domain in {word!r}")
    top = spec.rstrip(".").rpartition(".")[2]
    if not top or not top.replace("-", "").isalnum() or top.isdigit():
        raise SpfPermError(f"bad domain in {word!r}")


def valid_domain(domain: str) -> bool:
    """Whether `domain` can be asked of DNS: ASCII labels of 1 to 63, at most 253 characters."""
    name = domain[:-1] if domain.endswith(".") else domain
    labels = name.split(".")
    return (
        name.isascii()
        and 0 < len(name) <= 253
        and all(0 < len(label) <= 63 for label in labels)
        and "/" not in name
        and not any(c.isspace() for c in name)
    )


def term_cost(term: Term) -> int:
    """1 when the term itself causes a DNS lookup (RFC 7208 §4.6.4), else 0."""
    if term.qualifier == "=":
        return 1 if term.name == "redirect" else 0
    return 1 if term.name in LOOKUP_TERMS else 0


def count_lookups(domain: str, dns: Lookup, *, depth: int = 0) -> int:
    """The DNS-querying terms of `domain`'s SPF record with every include and redirect expanded.

    The count a receiver reaches for a sender matching nothing (the worst case); above
    LOOKUP_LIMIT the record is a permerror for everyone. Stops counting past LOOKUP_LIMIT + 5
    (loops). SpfPermError when the record is missing or doubled or does not parse.
    """
    records = spf_records(dns.txt(domain))
    if len(records) != 1:
        raise SpfPermError(f"{domain} has {len(records)} SPF records")
    terms = parse_spf(records[0])
    total = 0
    has_all = any(t.name == "all" and t.qualifier != "=" for t in terms)
    for term in terms:
        if term.qualifier == "=" and (term.name != "redirect" or has_all):
            continue
        total += term_cost(term)
        if "%" in term.value:  # a macro: known only per message; counted once, not expanded
            continue
        if term.name in ("include", "redirect") and depth < LOOKUP_LIMIT + 5:
            total += count_lookups(term.value, dns, depth=depth + 1)
        if total > LOOKUP_LIMIT + 5:
            break
    return total


@dataclass
class _Run:
    """One evaluation's counters (shared by nested includes)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str
    dns: Lookup
    lookups: int = 0
    voids: int = 0

    def charge(self) -> None:
        self.lookups += 1
        if self.lookups > LOOKUP_LIMIT:
            raise SpfPermError(f"more than {LOOKUP_LIMIT} DNS lookups")

    def void(self, answers: list[str]) -> list[str]:
        if not answers:
            self.voids += 1
            if self.voids > VOID_LIMIT:
                raise SpfPermError(f"more than {VOID_LIMIT} lookups found nothing")
        return answers


def check_host(ip: str, domain: str, sender: str, dns: Lookup) -> str:
    """The SPF result for mail from `sender` (envelope address) sent by `ip`, RFC 7208 §4.

    One of pass, fail, softfail, neutral, none, permerror (DnsError propagates: temperror).
    """
    return evaluate(ip, domain, sender, dns)[0]


def evaluate(ip: str, domain: str, sender: str, dns: Lookup) -> tuple[str, str]:
    """check_host's result, and for a permerror why ("" for any other result)."""
    run = _Run(ipaddress.ip_address(ip), sender, dns)
    try:
        return _check(run, domain, depth=0), ""
    except SpfPermError as e:
        return "permerror", str(e)


def _check(run: _Run, domain: str, depth: int) -> str:
    records = spf_records(run.dns.txt(domain))
    if not records:
        return "none"
    if len(records) > 1:
        raise SpfPermError(f"{domain} has {len(records)} SPF records")
    terms = parse_spf(records[0])
    for term in terms:
        if term.qualifier != "=" and _matches(run, term, domain, depth):
            return QUALIFIERS[term.qualifier]
    redirect = next((t for t in terms if t.qualifier == "=" and t.name == "redirect"), None)
    if redirect is None:
        return "neutral"
    run.charge()
    result = _check(run, _target(redirect.value, run, domain), depth + 1)
    if result == "none":
        raise SpfPermError(f"redirect to {redirect.value}, which has no SPF record")
    return result


def _matches(run: _Run, term: Term, domain: str, depth: int) -> bool:
    """Whether one mechanism matches the sending address."""
    if term.name == "all":
        return True
    if term.name in ("ip4", "ip6"):
        try:
            return run.ip in ipaddress.ip_network(term.value, strict=False)
        except ValueError:
            raise SpfPermError(f"bad address {term.text()!r}") from None
    run.charge()
    spec, v4, v6 = _cidr(term.value)
    target = _target(spec, run, domain) if spec else domain
    if term.name == "include":
        if depth >= LOOKUP_LIMIT:
            raise SpfPermError("includes nested too deep")
        result = _check(run, target, depth + 1)
        if result in ("none",):
            raise SpfPermError(f"include:{target} has no SPF record")
        return result == "pass"
    if term.name == "exists":
        return bool(run.void(run.dns.addresses(target, 4)))
    if term.name == "ptr":
        return False
    hosts = [target]
    if term.name == "mx":
        hosts = run.void(run.dns.mx(target))
        if len(hosts) > MX_LIMIT:
            raise SpfPermError(
                f"mx:{target} has {len(hosts)} MX hosts, more than the {MX_LIMIT} a receiver "
                "looks up (RFC 7208 §4.6.4): list the sending hosts with ip4:/ip6: instead"
            )
    prefix = v4 if run.ip.version == 4 else v6
    for host in hosts:
        for address in run.void(run.dns.addresses(host, run.ip.version)):
            if run.ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False):
                return True
    return False


def _target(spec: str, run: _Run, domain: str) -> str:
    """A domain-spec expanded, cut to 253 characters from the left (RFC 7208 §7.3); permerror
    when the result is no domain name DNS could be asked for."""
    target = expand(spec, run, domain)
    length = len(target.rstrip("."))
    if length > 253:
        # The labels left of the first dot from which 253 characters remain go, in one cut: a
        # loop dropping one label at a time copied the rest each time, quadratic in a long
        # expansion (a 60 KB record of %{i} took seconds per relay).
        dot = target.find(".", length - 254)
        target = target[dot + 1 :] if dot != -1 else target[target.rfind(".") + 1 :]
    if not valid_domain(target):
        raise SpfPermError(f"{spec!r} expands to a bad domain name")
    return target


def _cidr(value: str) -> tuple[str, int, int]:
    """A domain-spec and its dual CIDR lengths: "example.org/24//64" → (example.org, 24, 64)."""
    spec, _, lengths = value.partition("/")
    v4_text, _, v6_text = lengths.partition("//")
    if lengths.startswith("/"):  # only an IPv6 length: "//64"
        v4_text, v6_text = "", lengths[1:]
    try:
        v4 = int(v4_text) if v4_text else 32
        v6 = int(v6_text) if v6_text else 128
    except ValueError:
        raise SpfPermError(f"bad prefix length in {value!r}") from None
    if not (0 <= v4 <= 32 and 0 <= v6 <= 128):
        raise SpfPermError(f"bad prefix length in {value!r}")
    return spec, v4, v6


def expand(spec: str, run: _Run, domain: str) -> str:
    """A domain-spec with its macros expanded (RFC 7208 §7)."""
    local, _, sender_domain = run.sender.rpartition("@")
    ip = run.ip
    dotted = str(ip) if ip.version == 4 else ".".join(ip.exploded.replace(":", ""))
    values: dict[str, str] = {
        "s": run.sender,
        "l": local or "postmaster",
        "o": sender_domain,
        "d": domain,
        "i": dotted,
        "p": "unknown",
        "v": "in-addr" if ip.version == 4 else "ip6",
        "h": sender_domain,
    }

    def one(match: re.Match[str]) -> str:
        letter, digits, reverse, delimiters = match.groups()
        # Linear: one character class, no quantifier; each position is tried once.
        parts = re.split("[" + re.escape(delimiters or ".") + "]", values.get(letter.lower(), ""))
        if reverse:
            parts.reverse()
        if digits:
            parts = parts[-int(digits) :] if int(digits) else parts
        return ".".join(parts)

    text = spec.replace("%%", "\0").replace("%_", " ").replace("%-", "%20")
    return _MACRO.sub(one, text).replace("\0", "%")


def suggest_spf(
    records: list[str], relay_ips: list[str], cost: Callable[[Term], int]
) -> tuple[str, list[str]]:
    """One SPF record that lets the relays send and stays within the lookup limit.

    The terms of every record found are kept in order (duplicates once), the relays' addresses
    added in front, one `all` last (the first record's, else -all); DNS-querying terms that
    would pass LOOKUP_LIMIT (their cost, includes expanded, from `cost`) are left out and named.
    """
    kept: list[str] = [f"ip{ipaddress.ip_address(ip).version}:{ip}" for ip in relay_ips]
    dropped: list[str] = []
    ending = "-all"
    budget = 0
    for record in records:
        try:
            terms = parse_spf(record)
        except SpfPermError:
            continue
        for term in terms:
            text = term.text()
            if term.name == "all" and term.qualifier != "=":
                # The first record's ending, if it refuses others (+all or ?all would not).
                if record == records[0] and term.qualifier in "~-":
                    ending = text
                continue
            if term.qualifier == "=" and term.name == "redirect":
                continue  # an all ends the record: a redirect would be ignored
            if text in kept or text in dropped:
                continue
            spent = cost(term)
            if budget + spent > LOOKUP_LIMIT:
                dropped.append(text)
                continue
            budget += spent
            kept.append(text)
    return " ".join(["v=spf1", *kept, ending]), dropped
