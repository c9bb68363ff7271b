"""The SMTP transport against real TLS, real AUTH and hostile or broken servers.

TLS (STARTTLS and implicit) with a certificate made here, AUTH PLAIN / LOGIN / CRAM-MD5, a
server that floods, stalls, drops or lies, the final dot waiting for `ready`, and the Wire
form's dot-stuffing. Every case ends in an Outcome within a bounded time, or raises on purpose.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from newsletter.config import SmtpSettings, load_settings
from newsletter.devsmtp import free_port
from newsletter.smtp import Chain, Outcome, Result, SmtpPool
from newsletter.smtp_wire import NotReady, SmtpConnection, SmtpProtocol, Wire, stuff
from tests.conftest import SECRET

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
LIMIT = 10.0  # no test may take longer than this on the event loop: a hang fails, not blocks
SENDER = "bounces@example.org"
RECIPIENT = "reader@example.net"
AUTH_NOT_TLS = "ignore:Requiring AUTH while not requiring TLS:UserWarning"


def body(n: int) -> bytes:
    """A small message, different for each n, so the server's copies can be told apart."""
    return f"Subject: message {n}\r\nMIME-Version: 1.0\r\n\r\nbody {n}\r\n".encode()


def smtp_settings(port: int, **changes: Any) -> SmtpSettings:
    """[smtp] pointed at 127.0.0.1:port with one connection; `changes` override the rest."""
    base = load_settings(None, {"NEWSLETTER_SECRET": SECRET})
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "pool_size": 1,
        "timeout_seconds": 5.0,
        **changes,
    }
    return replace(base.smtp, **values)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a fresh event loop, failing (not hanging) past LIMIT seconds."""
    return asyncio.run(asyncio.wait_for(coro, LIMIT))


async def send_each(settings: SmtpSettings, messages: list[bytes]) -> list[Outcome]:
    """Send the messages one after the other through a fresh pool, then close it."""
    pool = SmtpPool(settings)
    try:
        return [await pool.send(m, sender=SENDER, recipient=RECIPIENT) for m in messages]
    finally:
        await pool.close()


# --- a certificate authority and a server certificate for 127.0.0.1 ------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA certificate, for SSL_CERT_FILE
    cert: Path  # a server certificate for IP 127.0.0.1
    key: Path
    other_cert: Path  # a server certificate for other.example only
    other_key: Path

    def server_context(self, *, other_name: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if other_name:
            context.load_cert_chain(self.other_cert, self.other_key)
        else:
            context.load_cert_chain(self.cert, self.key)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, san: x509.GeneralName
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("smtp test server"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A fresh CA, a certificate for 127.0.0.1 and one for another name, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("smtp test CA"))
        .issuer_name(_name("smtp test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(
        ca=folder / "ca.pem",
        cert=folder / "server.pem",
        key=folder / "server.key",
        other_cert=folder / "other.pem",
        other_key=folder / "other.key",
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert, key = _issue(ca_key, ca, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    paths.cert.write_bytes(cert)
    paths.key.write_bytes(key)
    cert, key = _issue(ca_key, ca, x509.DNSName("other.example"))
    paths.other_cert.write_bytes(cert)
    paths.other_key.write_bytes(key)
    return paths


# --- aiosmtpd: the well-behaved server -----------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    at: float


@dataclass
class Recorder:
    """An aiosmtpd handler keeping every accepted message, whether it came over TLS, and when."""

    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        transport = server.transport
        tls = session.ssl is not None or (
            transport is not None and transport.get_extra_info("ssl_object") is not None
        )
        with self.lock:
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    tls,
                    time.monotonic(),
                )
            )
        return "250 2.0.0 accepted"

    def contents(self) -> list[bytes]:
        with self.lock:
            return [r.content for r in self.received]


@dataclass
class Accounts:
    """An aiosmtpd authenticator for one user; keeps (mechanism, success) per attempt."""

    user: str
    password: str
    attempts: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.user.encode()
            and auth_data.password == self.password.encode()
        )
        self.attempts.append((mechanism, ok))
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@contextlib.contextmanager
def smtpd(handler: Recorder, **kwargs: Any) -> Iterator[int]:
    """aiosmtpd on 127.0.0.1 at a free port (kwargs go to its SMTP); yields the port."""
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10, **kwargs)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


# --- a scripted server on the test's event loop, for what aiosmtpd will not do -------------


class Peer:
    """One connection to the scripted server: what it reads and how it writes."""

    def __init__(
        self,
        server: Scripted,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        trickle: bool,
    ) -> None:
        self.server, self.reader, self.writer, self.trickle = server, reader, writer, trickle

    async def send(self, data: bytes) -> None:
        """Write `data` in one write, or one byte per write when trickling."""
        if not self.trickle:
            self.writer.write(data)
            await self.writer.drain()
            return
        for i in range(len(data)):
            self.writer.write(data[i : i + 1])
            await self.writer.drain()
            await asyncio.sleep(0.001)

    async def until_closed(self) -> None:
        """Read (and ignore) whatever comes until the client closes."""
        while await self.reader.read(65536):
            pass

    async def flood(self, chunk: bytes) -> None:
        """Write `chunk` again and again until the client goes away."""
        for _ in range(100_000):
            if self.writer.is_closing():
                return
            self.writer.write(chunk)
            await self.writer.drain()


# An answer: bytes to write (then the dialogue goes on; after a 421 it ends), or a coroutine
# given the Peer that returns whether the dialogue goes on.
Answer = bytes | Callable[[Peer], Awaitable[bool]]
Script = Callable[["Scripted", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A raw TCP server on 127.0.0.1: connection i follows scripts[i] (the last one repeats)."""

    def __init__(self, *scripts: Script) -> None:
        self.scripts = scripts
        self.connections = 0
        self.commands: list[bytes] = []
        self.received: list[bytes] = []
        self.logins: list[bool] = []
        self.port = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1
        try:
            await script(self, reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client hung up on us: what these servers are for
        except asyncio.CancelledError:
            pass  # the test is over (asyncio's stream callback would log a cancelled task)
        finally:
            self._tasks.discard(task)
            writer.transport.abort()  # at once, whatever state a handshake left it in


def ehlo_reply(extensions: tuple[bytes, ...]) -> bytes:
    lines = [b"hostile.test", *extensions]
    return b"".join(
        b"250" + (b" " if i == len(lines) - 1 else b"-") + line + b"\r\n"
        for i, line in enumerate(lines)
    )


def session(
    *,
    greeting: Answer | None = b"220 hostile.test ESMTP\r\n",
    extensions: tuple[bytes, ...] = (b"PIPELINING",),
    answers: Mapping[bytes, Answer] | None = None,
    trickle: bool = False,
    tls: ssl.SSLContext | None = None,
    inject: bytes = b"",
) -> Script:
    """A minimal SMTP server; `answers` replace its reply to a verb once ("." = the final dot).

    With `tls` it offers STARTTLS, writes `inject` right after its 220 (in the same write, so in
    clear) and then upgrades the connection.
    """

    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: Any) -> None:
        peer = Peer(srv, reader, writer, trickle)
        pending = dict(answers or {})
        secure = False
        envelope = {b"MAIL": False, b"RCPT": False}

        async def answer(verb: bytes, default: bytes) -> bool:
            reply = pending.pop(verb, default)
            if callable(reply):
                return await reply(peer)
            await peer.send(reply)
            return not reply.startswith(b"421")

        if greeting is None:
            await peer.until_closed()
            return
        if callable(greeting):
            await greeting(peer)
            return
        await peer.send(greeting)
        while line := await reader.readline():
            srv.commands.append(line)
            words = line.split(b":")[0].split()
            verb = words[0].upper() if words else b""
            if verb == b"EHLO":
                offered = extensions + ((b"STARTTLS",) if tls and not secure else ())
                going = await answer(verb, ehlo_reply(offered))
            elif verb == b"HELO":
                going = await answer(verb, b"250 hostile.test\r\n")
            elif verb == b"STARTTLS" and tls and not secure:
                going = await answer(verb, b"220 2.0.0 go ahead\r\n" + inject)
                # Bounded: a client that refuses to go on leaves the handshake half-done.
                await asyncio.wait_for(writer.start_tls(tls), 3)
                secure = True
            elif verb in (b"MAIL", b"RCPT"):
                # As a real server: no RCPT without MAIL, no DATA without a recipient.
                ok = verb == b"MAIL" or envelope[b"MAIL"]
                reply = pending.pop(
                    verb, b"250 2.0.0 ok\r\n" if ok else b"503 5.5.1 MAIL first\r\n"
                )
                envelope[verb] = isinstance(reply, bytes) and reply.startswith(b"2")
                pending[verb] = reply
                going = await answer(verb, b"")
            elif verb in (b"RSET", b"NOOP"):
                if verb == b"RSET":
                    envelope[b"MAIL"] = envelope[b"RCPT"] = False
                going = await answer(verb, b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                ok = envelope[b"RCPT"]
                envelope[b"MAIL"] = envelope[b"RCPT"] = False
                default = b"354 go ahead\r\n" if ok else b"554 5.5.1 no valid recipients\r\n"
                reply = pending.pop(verb, default)
                if callable(reply):
                    going = await reply(peer)
                else:
                    await peer.send(reply)
                    going = not reply.startswith(b"421")
                    if reply.startswith(b"354"):
                        going = await _read_body(peer, answer)
            elif verb == b"QUIT":
                await peer.send(b"221 2.0.0 bye\r\n")
                return
            else:
                going = await answer(verb, b"500 5.5.1 what?\r\n")
            if not going:
                return

    return script


async def _read_body(peer: Peer, answer: Callable[[bytes, bytes], Awaitable[bool]]) -> bool:
    """Read a message up to its final dot, undo the dot-stuffing, keep it, answer the dot."""
    lines: list[bytes] = []
    while (line := await peer.reader.readline()) != b".\r\n":
        if not line:
            return False  # the client hung up mid-message: nothing is kept
        lines.append(line[1:] if line.startswith(b"..") else line)
    peer.server.received.append(b"".join(lines))
    return await answer(b".", b"250 2.0.0 queued\r\n")


@pytest.fixture
def chunks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every piece of data the client's protocol was handed, in order."""
    seen: list[bytes] = []
    original = SmtpProtocol.data_received

    def data_received(self: SmtpProtocol, data: bytes) -> None:
        seen.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(SmtpProtocol, "data_received", data_received)
    return seen


# --- 1. STARTTLS ----------------------------------------------------------------------------


def test_starttls_delivers_the_message_over_tls(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a trusted certificate for 127.0.0.1 the message goes after STARTTLS, encrypted."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    handler = Recorder()
    with smtpd(handler, tls_context=pki.server_context(), require_starttls=True) as port:
        (outcome,) = run(send_each(smtp_settings(port, security="starttls"), [body(1)]))
    assert outcome.result is Result.SENT, outcome
    assert [(r.content, r.rcpt_tos, r.tls) for r in handler.received] == [
        (body(1), [RECIPIENT], True)
    ]


def test_auth_offered_only_after_starttls_logs_in_over_tls(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AUTH appears only in the EHLO after STARTTLS: the client asks again and logs in."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    handler, accounts = Recorder(), Accounts("sender", "s3cret")
    with smtpd(
        handler,
        tls_context=pki.server_context(),
        require_starttls=True,
        authenticator=accounts,
        auth_required=True,
    ) as port:
        settings = smtp_settings(port, security="starttls", username="sender", password="s3cret")
        (outcome,) = run(send_each(settings, [body(1)]))
    assert outcome.result is Result.SENT, outcome
    assert accounts.attempts == [("PLAIN", True)]
    assert [r.tls for r in handler.received] == [True]


def test_starttls_required_but_not_offered_sends_nothing_in_clear() -> None:
    """A server without STARTTLS gets a failure outcome and no message (aiosmtpd)."""
    handler = Recorder()
    with smtpd(handler) as port:
        (outcome,) = run(send_each(smtp_settings(port, security="starttls"), [body(1)]))
    assert outcome.result in (Result.TEMPORARY, Result.PERMANENT), outcome
    assert handler.received == []


def test_starttls_not_offered_sends_neither_envelope_nor_password_in_clear() -> None:
    """Without STARTTLS the client stops after EHLO: no AUTH, no MAIL, no message on the wire."""

    async def go() -> tuple[Outcome, Scripted]:
        async with Scripted(session(extensions=(b"PIPELINING", b"AUTH PLAIN LOGIN"))) as srv:
            settings = smtp_settings(
                srv.port, security="starttls", username="sender", password="s3cret"
            )
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert outcome.result in (Result.TEMPORARY, Result.PERMANENT), outcome
    verbs = [c.split()[0].upper() for c in srv.commands if c.split()]
    assert b"AUTH" not in verbs and b"MAIL" not in verbs, srv.commands
    assert srv.received == []


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_an_untrusted_certificate_is_refused(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    """No trust in the server's CA: the TLS handshake fails, the message is not handed over."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    handler = Recorder()
    tls: dict[str, Any] = (
        {"tls_context": pki.server_context(), "require_starttls": True}
        if security == "starttls"
        else {"ssl_context": pki.server_context()}
    )
    with smtpd(handler, **tls) as port:
        (outcome,) = run(send_each(smtp_settings(port, security=security), [body(1)]))
    assert outcome.result is Result.TEMPORARY, outcome
    assert "certificate" in outcome.reply.lower(), outcome
    assert handler.received == []


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_a_certificate_for_another_name_is_refused(
    pki: Pki, monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    """A certificate from a trusted CA but for other.example does not do for 127.0.0.1."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    handler = Recorder()
    context = pki.server_context(other_name=True)
    tls: dict[str, Any] = (
        {"tls_context": context, "require_starttls": True}
        if security == "starttls"
        else {"ssl_context": context}
    )
    with smtpd(handler, **tls) as port:
        (outcome,) = run(send_each(smtp_settings(port, security=security), [body(1)]))
    assert outcome.result is Result.TEMPORARY, outcome
    assert handler.received == []


def test_a_starttls_handshake_that_never_answers_times_out() -> None:
    """220 to STARTTLS, then silence: the handshake costs timeout_seconds, not forever."""

    async def silent(peer: Peer) -> bool:
        await peer.send(b"220 2.0.0 go ahead\r\n")
        await peer.until_closed()
        return False

    async def go() -> tuple[Outcome, float, Scripted]:
        async with Scripted(
            session(extensions=(b"STARTTLS",), answers={b"STARTTLS": silent})
        ) as srv:
            start = time.monotonic()
            settings = smtp_settings(srv.port, security="starttls", timeout_seconds=0.5)
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, time.monotonic() - start, srv

    outcome, elapsed, srv = run(go())
    assert outcome.result is Result.TEMPORARY, outcome
    assert elapsed < 3, elapsed
    assert srv.received == []


def test_a_server_answering_starttls_in_clear_is_not_trusted() -> None:
    """220 to STARTTLS, then plain text instead of a handshake: a TLS failure, nothing sent."""

    async def plain(peer: Peer) -> bool:
        await peer.send(b"220 2.0.0 go ahead\r\n")
        await peer.reader.read(4096)  # the ClientHello
        await peer.send(b"250 2.0.0 still in clear\r\n")
        await peer.until_closed()
        return False

    async def go() -> tuple[Outcome, Scripted]:
        async with Scripted(
            session(extensions=(b"STARTTLS",), answers={b"STARTTLS": plain})
        ) as srv:
            settings = smtp_settings(srv.port, security="starttls", timeout_seconds=2)
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert outcome.result is Result.TEMPORARY, outcome
    assert srv.received == []
    assert not any(c.startswith(b"MAIL") for c in srv.commands)


def test_replies_injected_in_clear_with_the_starttls_220_are_not_believed(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that came in clear before the handshake is not taken as the encrypted EHLO's."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    injected = b"250-hostile.test\r\n250 X-INJECTED\r\n"

    async def go() -> tuple[dict[str, str] | None, Scripted]:
        script = session(tls=pki.server_context(), inject=injected)
        async with Scripted(script) as srv:
            relay = smtp_settings(srv.port, security="starttls").all_relays()[0]
            try:
                conn = await SmtpConnection.open(relay)
            except OSError:
                return None, srv  # refusing the connection is as good as ignoring the injection
            try:
                return conn.extensions, srv
            finally:
                await conn.quit()

    extensions, _srv = run(go())
    assert extensions is None or ("x-injected" not in extensions and "pipelining" in extensions), (
        extensions
    )


# --- 2. implicit TLS ------------------------------------------------------------------------


def test_implicit_tls_delivers_the_message(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    """security = "tls": TLS from the first byte (port 465 style), the message arrives."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki.ca))
    handler = Recorder()
    with smtpd(handler, ssl_context=pki.server_context()) as port:
        outcomes = run(send_each(smtp_settings(port, security="tls"), [body(1), body(2)]))
    assert [o.result for o in outcomes] == [Result.SENT, Result.SENT], outcomes
    assert [(r.content, r.tls) for r in handler.received] == [(body(1), True), (body(2), True)]


def test_implicit_tls_to_a_server_speaking_clear_text_fails() -> None:
    """A plain SMTP server where TLS was configured: a failure outcome, nothing sent."""

    async def go() -> tuple[Outcome, Scripted]:
        async with Scripted(session()) as srv:
            settings = smtp_settings(srv.port, security="tls", timeout_seconds=1)
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert outcome.result is Result.TEMPORARY, outcome
    assert srv.received == []
    assert not any(c.startswith(b"MAIL") for c in srv.commands), srv.commands


# --- 3. AUTH --------------------------------------------------------------------------------


@pytest.mark.filterwarnings(AUTH_NOT_TLS)
@pytest.mark.parametrize(
    ("exclude", "password", "mechanism"),
    [
        pytest.param([], "s3cret", "PLAIN", id="plain"),
        pytest.param(["PLAIN"], "s3cret", "LOGIN", id="login-only"),
        pytest.param([], "pässwörd-Пароль-🔑", "PLAIN", id="plain-utf8-password"),
        pytest.param(["PLAIN"], "pässwörd-Пароль-🔑", "LOGIN", id="login-utf8-password"),
    ],
)
def test_auth_with_the_right_password_delivers(
    exclude: list[str], password: str, mechanism: str
) -> None:
    """The server's AUTH mechanism is used with the configured credentials (UTF-8 included)."""
    handler, accounts = Recorder(), Accounts("sender@example.org", password)
    with smtpd(
        handler,
        authenticator=accounts,
        auth_required=True,
        auth_require_tls=False,
        auth_exclude_mechanism=exclude,
    ) as port:
        settings = smtp_settings(port, username="sender@example.org", password=password)
        outcomes = run(send_each(settings, [body(1), body(2)]))
    assert [o.result for o in outcomes] == [Result.SENT, Result.SENT], outcomes
    assert accounts.attempts == [(mechanism, True)]  # one login, the connection reused
    assert handler.contents() == [body(1), body(2)]


@pytest.mark.filterwarnings(AUTH_NOT_TLS)
@pytest.mark.parametrize("exclude", [[], ["PLAIN"]], ids=["plain", "login"])
def test_auth_with_a_wrong_password_fails_for_good(exclude: list[str]) -> None:
    """535 from AUTH is a permanent outcome and the message is not sent."""
    handler, accounts = Recorder(), Accounts("sender@example.org", "s3cret")
    with smtpd(
        handler,
        authenticator=accounts,
        auth_required=True,
        auth_require_tls=False,
        auth_exclude_mechanism=exclude,
    ) as port:
        settings = smtp_settings(port, username="sender@example.org", password="wrong")
        (outcome,) = run(send_each(settings, [body(1)]))
    assert outcome.result is Result.PERMANENT and outcome.code == 535, outcome
    assert [ok for _m, ok in accounts.attempts] == [False]
    assert handler.received == []


def _cram_md5(
    user: bytes, password: bytes, challenge: bytes = b"<1896.697170952@hostile.test>"
) -> Callable[[Peer], Awaitable[bool]]:
    """An AUTH answer that checks a CRAM-MD5 login (RFC 2195) and notes whether it was right."""

    async def auth(peer: Peer) -> bool:
        await peer.send(b"334 " + base64.b64encode(challenge) + b"\r\n")
        answer = base64.b64decode((await peer.reader.readline()).strip())
        got_user, _, digest = answer.partition(b" ")
        expected = hmac.new(password, challenge, "md5").hexdigest().encode()
        ok = got_user == user and hmac.compare_digest(digest, expected)
        peer.server.logins.append(ok)
        await peer.send(b"235 2.7.0 ok\r\n" if ok else b"535 5.7.8 bad credentials\r\n")
        return True

    return auth


@pytest.mark.parametrize(
    ("password", "expected"),
    [
        pytest.param("s3cret", Result.SENT, id="right"),
        pytest.param("wrong", Result.PERMANENT, id="wrong"),
    ],
)
def test_auth_cram_md5_answers_the_challenge(password: str, expected: Result) -> None:
    """Only CRAM-MD5 offered: the client answers the HMAC of the server's challenge."""

    async def go() -> tuple[Outcome, Scripted]:
        script = session(
            extensions=(b"AUTH CRAM-MD5",),
            answers={b"AUTH": _cram_md5(b"sender", b"s3cret")},
        )
        async with Scripted(script) as srv:
            settings = smtp_settings(srv.port, username="sender", password=password)
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert outcome.result is expected, outcome
    assert srv.logins == [expected is Result.SENT]
    assert srv.received == ([body(1)] if expected is Result.SENT else [])


def test_a_cram_md5_challenge_that_is_not_base64_is_an_outcome() -> None:
    """A garbled 334 challenge is the server's fault: an Outcome, not an exception."""

    async def garbled(peer: Peer) -> bool:
        await peer.send(b"334 abc\r\n")  # not valid base64 (bad padding)
        await peer.until_closed()
        return False

    async def go() -> Outcome:
        script = session(extensions=(b"AUTH CRAM-MD5",), answers={b"AUTH": garbled})
        async with Scripted(script) as srv:
            settings = smtp_settings(srv.port, username="sender", password="s3cret")
            (outcome,) = await send_each(settings, [body(1)])
            return outcome

    assert run(go()).result in (Result.TEMPORARY, Result.PERMANENT)


def test_auth_configured_but_not_offered_sends_nothing() -> None:
    """Credentials set, no AUTH in EHLO: a failure outcome and no MAIL command."""

    async def go() -> tuple[Outcome, Scripted]:
        async with Scripted(session()) as srv:
            settings = smtp_settings(srv.port, username="sender", password="s3cret")
            (outcome,) = await send_each(settings, [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert outcome.result in (Result.TEMPORARY, Result.PERMANENT), outcome
    assert not any(c.upper().startswith(b"MAIL") for c in srv.commands)
    assert srv.received == []


# --- 4. hostile and broken servers ----------------------------------------------------------


async def _long_line(peer: Peer) -> bool:
    await peer.send(b"250-" + b"x" * (8192 + 100))  # no line end, ever
    await peer.until_closed()
    return False


async def _flood(peer: Peer) -> bool:
    await peer.flood(b"250-x\r\n" * 512)
    return False


async def _silence(peer: Peer) -> bool:
    await peer.until_closed()
    return False


async def _hang_up(peer: Peer) -> bool:
    return False


async def _hang_up_after_354(peer: Peer) -> bool:
    await peer.send(b"354 go ahead\r\n")
    return False


async def _hang_up_mid_body(peer: Peer) -> bool:
    await peer.send(b"354 go ahead\r\n")
    await peer.reader.readline()  # the first line of the message, then gone
    return False


async def _greeting_long_line(peer: Peer) -> None:
    await peer.send(b"220 " + b"x" * 10_000)
    await peer.until_closed()


async def _greeting_flood(peer: Peer) -> None:
    await peer.flood(b"220-hello\r\n" * 512)


async def _greeting_then_hang_up(peer: Peer) -> None:
    await peer.send(b"220 hostile.test\r\n")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipe", "plain"])
@pytest.mark.parametrize(
    ("dialogue", "expected", "code"),
    [
        pytest.param(dict(greeting=None), Result.TEMPORARY, None, id="greeting-never-comes"),
        pytest.param(
            dict(greeting=_greeting_long_line), Result.PERMANENT, 500, id="greeting-too-long"
        ),
        pytest.param(dict(greeting=_greeting_flood), Result.PERMANENT, 500, id="greeting-endless"),
        pytest.param(
            dict(greeting=b"2x0 hello\r\n"), Result.TEMPORARY, -1, id="greeting-code-not-digits"
        ),
        pytest.param(
            dict(greeting=b"\x00\xff\xfe garbage\r\n"), Result.TEMPORARY, -1, id="greeting-binary"
        ),
        pytest.param(
            dict(greeting=_greeting_then_hang_up), Result.TEMPORARY, None, id="hang-up-at-ehlo"
        ),
        pytest.param(
            dict(answers={b"EHLO": _long_line}), Result.PERMANENT, 500, id="ehlo-too-long"
        ),
        pytest.param(dict(answers={b"EHLO": _flood}), Result.PERMANENT, 500, id="ehlo-endless"),
        pytest.param(dict(answers={b"MAIL": _silence}), Result.TEMPORARY, None, id="mail-silent"),
        pytest.param(
            dict(answers={b"MAIL": b"4x1 what\r\n"}), Result.TEMPORARY, -1, id="mail-not-digits"
        ),
        pytest.param(
            dict(answers={b"MAIL": _long_line}), Result.PERMANENT, 500, id="mail-too-long"
        ),
        pytest.param(dict(answers={b"RCPT": _flood}), Result.PERMANENT, 500, id="rcpt-endless"),
        pytest.param(dict(answers={b"RCPT": _hang_up}), Result.TEMPORARY, None, id="rcpt-hang-up"),
        pytest.param(
            dict(answers={b"DATA": _hang_up_after_354}),
            Result.TEMPORARY,
            None,
            id="hang-up-after-354",
        ),
        pytest.param(
            dict(answers={b"DATA": _hang_up_mid_body}),
            Result.TEMPORARY,
            None,
            id="hang-up-mid-body",
        ),
        pytest.param(
            dict(answers={b"DATA": b"354 go ahead\r\n250 2.0.0 stray\r\n"}),
            Result.TEMPORARY,
            -1,
            id="reply-after-354",
        ),
        pytest.param(dict(answers={b".": _silence}), Result.TEMPORARY, None, id="dot-silent"),
        pytest.param(dict(answers={b".": _flood}), Result.PERMANENT, 500, id="dot-endless"),
        pytest.param(
            dict(answers={b".": b"xyz not a reply\r\n"}),
            Result.TEMPORARY,
            -1,
            id="dot-code-not-digits",
        ),
    ],
)
@pytest.mark.parametrize("chained", [False, True], ids=["alone", "chained"])
def test_a_hostile_server_gives_an_outcome_and_the_next_message_goes(
    dialogue: dict[str, Any], expected: Result, code: int | None, pipelining: bool, chained: bool
) -> None:
    """Flood, silence, hang-up or garbage: an Outcome within the time-out, never a hang or a
    raise; the message after it is delivered (a new connection where the old one is gone),
    also when its envelope went with the first one's final dot."""

    async def go() -> tuple[list[Outcome], float, Scripted]:
        extensions = (b"PIPELINING",) if pipelining else ()
        first = session(extensions=extensions, **dialogue)
        async with Scripted(first, session(extensions=extensions)) as srv:
            settings = smtp_settings(srv.port, timeout_seconds=0.5, final_reply_timeout_seconds=0.5)
            if chained:
                start = time.monotonic()
                outcomes = await send_chained(settings, [body(1), body(2)])
                return outcomes, time.monotonic() - start, srv
            pool = SmtpPool(settings)
            try:
                start = time.monotonic()
                bad = await pool.send(body(1), sender=SENDER, recipient=RECIPIENT)
                elapsed = time.monotonic() - start
                after = await pool.send(body(2), sender=SENDER, recipient=RECIPIENT)
            finally:
                await pool.close()
            return [bad, after], elapsed, srv

    (bad, after), elapsed, srv = run(go())
    assert bad.result is expected, bad
    assert bad.code == code, bad
    assert elapsed < 3, elapsed  # at most a time-out or two, not the 10 s limit
    assert after.result is Result.SENT, after
    # A server that broke down before the final dot kept nothing; one that broke its reply to
    # the dot has the message (the retry may duplicate it: the client cannot know).
    at_dot = b"." in dialogue.get("answers", {})
    assert srv.received == ([body(1)] if at_dot else []) + [body(2)]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipe", "plain"])
@pytest.mark.parametrize("stage", [b"MAIL", b"RCPT", b"."], ids=["mail", "rcpt", "dot"])
def test_a_421_closes_the_connection_and_the_next_message_opens_a_new_one(
    stage: bytes, pipelining: bool
) -> None:
    """421 (service closing): TEMPORARY, the connection is dropped, the next one is new."""

    async def go() -> tuple[list[Outcome], Scripted]:
        extensions = (b"PIPELINING",) if pipelining else ()
        first = session(extensions=extensions, answers={stage: b"421 4.3.2 closing\r\n"})
        async with Scripted(first, session(extensions=extensions)) as srv:
            outcomes = await send_each(smtp_settings(srv.port), [body(1), body(2)])
            return outcomes, srv

    (bad, after), srv = run(go())
    assert (bad.result, bad.code) == (Result.TEMPORARY, 421), bad
    assert after.result is Result.SENT, after
    assert srv.connections == 2
    expected = [body(1), body(2)] if stage == b"." else [body(2)]
    assert srv.received == expected  # a 421 to the dot: the server kept it, said it would not


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipe", "plain"])
def test_replies_written_one_byte_at_a_time_still_parse(
    pipelining: bool, chunks: list[bytes]
) -> None:
    """Every reply split over many tiny TCP writes, CR and LF apart: the dialogue works."""

    async def go() -> tuple[list[Outcome], Scripted]:
        extensions = (b"PIPELINING", b"SIZE 1000000", b"8BITMIME") if pipelining else ()
        async with Scripted(session(extensions=extensions, trickle=True)) as srv:
            outcomes = await send_each(smtp_settings(srv.port), [body(1), body(2)])
            return outcomes, srv

    outcomes, srv = run(go())
    assert [o.result for o in outcomes] == [Result.SENT, Result.SENT], outcomes
    assert outcomes[0].reply == "250 2.0.0 queued"
    assert srv.received == [body(1), body(2)]
    assert srv.connections == 1
    assert len(chunks) > 100 and b"\r" in chunks and b"\n" in chunks  # really byte by byte


def test_several_replies_in_one_tcp_write_are_each_read(chunks: list[bytes]) -> None:
    """Pipelined MAIL/RCPT/DATA answered in a single write: three replies, in order."""

    async def batched(srv: Scripted, reader: asyncio.StreamReader, writer: Any) -> None:
        peer = Peer(srv, reader, writer, trickle=False)
        await peer.send(b"220 hostile.test\r\n")
        await reader.readline()  # EHLO
        await peer.send(b"250-hostile.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        for _ in range(2):
            commands = [await reader.readline() for _ in range(3)]
            srv.commands.extend(commands)
            await peer.send(b"250 2.1.0 sender ok\r\n250 2.1.5 rcpt ok\r\n354 go ahead\r\n")

            async def dot(verb: bytes, default: bytes) -> bool:
                await peer.send(default)
                return True

            await _read_body(peer, dot)
        await reader.readline()  # QUIT
        await peer.send(b"221 bye\r\n")

    async def go() -> tuple[list[Outcome], Scripted]:
        async with Scripted(batched) as srv:
            outcomes = await send_each(smtp_settings(srv.port), [body(1), body(2)])
            return outcomes, srv

    outcomes, srv = run(go())
    assert [o.result for o in outcomes] == [Result.SENT, Result.SENT], outcomes
    assert [c.split(b":")[0] for c in srv.commands] == [b"MAIL FROM", b"RCPT TO", b"DATA\r\n"] * 2
    assert srv.received == [body(1), body(2)]
    batch = b"250 2.1.0 sender ok\r\n250 2.1.5 rcpt ok\r\n354 go ahead\r\n"
    assert chunks.count(batch) == 2  # each batch reached the client as one piece


@pytest.mark.parametrize(
    ("script", "settings"),
    [
        pytest.param(session(answers={b"DATA": b"250 2.0.0 ok\r\n"}), {}, id="250-to-data"),
        pytest.param(session(greeting=b"250 hello\r\n"), {}, id="250-greeting"),
        pytest.param(
            session(extensions=(b"STARTTLS",), answers={b"STARTTLS": b"250 2.0.0 ok\r\n"}),
            {"security": "starttls"},
            id="250-to-starttls",
        ),
        pytest.param(
            session(extensions=(b"AUTH PLAIN",), answers={b"AUTH": b"250 2.0.0 ok\r\n"}),
            {"username": "sender", "password": "s3cret"},
            id="250-to-auth",
        ),
        pytest.param(
            session(greeting=b"220 hostile.test\r\n220 again\r\n", extensions=()),
            {},
            id="duplicated-greeting-desyncs",
        ),
    ],
)
def test_a_2xx_where_another_code_belongs_is_never_sent(
    script: Script, settings: dict[str, Any]
) -> None:
    """A server that says 250 where the dialogue needs 220/235/354: the message did not go, so
    its outcome must not be SENT."""

    async def go() -> tuple[Outcome, Scripted]:
        async with Scripted(script) as srv:
            (outcome,) = await send_each(smtp_settings(srv.port, **settings), [body(1)])
            return outcome, srv

    outcome, srv = run(go())
    assert srv.received == []
    assert outcome.result is not Result.SENT, outcome


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipe", "plain"])
@pytest.mark.parametrize(
    ("stage", "recipient_level"),
    [(b"RCPT", True), (b"MAIL", False)],
    ids=["rcpt", "mail"],
)
def test_a_5xx_refusal_followed_by_a_hang_up_stays_permanent(
    stage: bytes, recipient_level: bool, pipelining: bool
) -> None:
    """ "550 no such user" and then a closed connection: still PERMANENT (recipient level)."""

    async def refuse_and_hang_up(peer: Peer) -> bool:
        await peer.send(b"550 5.1.1 no such user\r\n")
        return False

    async def go() -> tuple[list[Outcome], Scripted]:
        extensions = (b"PIPELINING",) if pipelining else ()
        first = session(extensions=extensions, answers={stage: refuse_and_hang_up})
        async with Scripted(first, session(extensions=extensions)) as srv:
            outcomes = await send_each(smtp_settings(srv.port), [body(1), body(2)])
            return outcomes, srv

    (bad, after), srv = run(go())
    assert after.result is Result.SENT
    assert srv.received == [body(2)]
    assert (bad.result, bad.code, bad.recipient_level) == (
        Result.PERMANENT,
        550,
        recipient_level,
    ), bad


# --- 5. `ready`: the final dot waits ------------------------------------------------------


@pytest.mark.parametrize(
    ("padding", "delay"),
    [
        pytest.param(0, 0.1, id="small-body-fails-later"),
        pytest.param(4_000_000, 0.0, id="4mb-body-fails-at-once"),
    ],
)
def test_a_failed_ready_drops_the_connection_before_the_final_dot(
    padding: int, delay: float
) -> None:
    """`ready` fails while the body is out: NotReady (caused by it) raises, the server keeps
    nothing, and the next message goes on a new connection."""
    handler = Recorder()
    message = body(1) + (b"x" * 76 + b"\r\n") * (padding // 78)  # lines of a real message

    async def go(port: int) -> tuple[BaseException | None, Outcome]:
        loop = asyncio.get_running_loop()
        pool = SmtpPool(smtp_settings(port))
        try:
            ready: asyncio.Future[None] = loop.create_future()
            loop.call_later(delay, ready.set_exception, RuntimeError("commit failed"))
            with pytest.raises(NotReady) as caught:
                await pool.send(message, sender=SENDER, recipient=RECIPIENT, ready=ready)
            after = await pool.send(body(2), sender=SENDER, recipient=RECIPIENT)
            return caught.value.__cause__, after
        finally:
            await pool.close()

    with smtpd(handler) as port:
        cause, after = run(go(port))
        time.sleep(0.2)  # let the server finish with the dropped connection
    assert isinstance(cause, RuntimeError) and str(cause) == "commit failed"
    assert after.result is Result.SENT
    assert handler.contents() == [body(2)]


def test_the_final_dot_waits_for_ready() -> None:
    """The message is accepted only after `ready` resolves, 0.2 s later."""
    handler = Recorder()

    async def go(port: int) -> tuple[Outcome, float, list[bytes]]:
        loop = asyncio.get_running_loop()
        pool = SmtpPool(smtp_settings(port))
        try:
            ready: asyncio.Future[None] = loop.create_future()
            task = asyncio.create_task(
                pool.send(body(1), sender=SENDER, recipient=RECIPIENT, ready=ready)
            )
            await asyncio.sleep(0.2)
            before = handler.contents()
            released = time.monotonic()
            ready.set_result(None)
            return await task, released, before
        finally:
            await pool.close()

    with smtpd(handler) as port:
        outcome, released, before = run(go(port))
    assert before == []
    assert outcome.result is Result.SENT
    assert [r.content for r in handler.received] == [body(1)]
    assert handler.received[0].at >= released


# --- 6. dot-stuffing with the Wire marker ---------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b".starts with a dot\r\nsecond\r\n", id="message-starts-with-dot"),
        pytest.param(b"a\r\n.\r\nb\r\n", id="a-lone-dot-line"),
        pytest.param(b"a\r\n..two\r\n...three\r\n.x\r\n", id="several-dots"),
        pytest.param(b"Subject: x\r\n\r\nno final line end\r\n.", id="ends-with-a-dot"),
        pytest.param(b".", id="only-a-dot"),
        pytest.param(b"\r\n.\r\n\r\n.\r\n", id="dot-lines-between-blanks"),
    ],
)
def test_a_wire_message_arrives_exactly_as_built(raw: bytes) -> None:
    """Wire(stuff(raw)) is sent as it is (not stuffed twice): the server gets exactly raw,
    the same as for raw bytes the transport stuffs itself."""
    handler = Recorder()
    with smtpd(handler) as port:
        outcomes = run(send_each(smtp_settings(port), [Wire(stuff(raw)), raw]))
    assert [o.result for o in outcomes] == [Result.SENT, Result.SENT], outcomes
    expected = raw if raw.endswith(b"\r\n") else raw + b"\r\n"
    assert handler.contents() == [expected, expected]


# --- 7. the next message's envelope with the final dot (RFC 2920 3.1) ------------------------


async def send_chained(settings: SmtpSettings, messages: list[bytes]) -> list[Outcome]:
    """Send the messages as a sender's lane does: each final dot carries the next envelope."""
    pool = SmtpPool(settings)
    waiting = list(enumerate(messages))
    following: list[tuple[int, bytes]] = []

    def follow() -> tuple[str, str] | None:
        if not waiting:
            return None
        following.append(waiting.pop(0))
        return SENDER, f"reader{following[-1][0]}@example.net"

    chain = Chain(follow)
    outcomes = []
    try:
        while following or waiting:
            n, message = following.pop() if following else waiting.pop(0)
            recipient = f"reader{n}@example.net"
            outcomes.append(
                await pool.send(message, sender=SENDER, recipient=recipient, chain=chain)
            )
        return outcomes
    finally:
        chain.drop()
        await pool.close()


def looking_ahead(messages: int) -> Script:
    """A server that answers each final dot but the last only once the next message's MAIL,
    RCPT and DATA have come: a client waiting for that answer first is stuck here (1 s)."""

    async def script(srv: Scripted, reader: asyncio.StreamReader, writer: Any) -> None:
        peer = Peer(srv, reader, writer, trickle=False)
        await peer.send(b"220 hostile.test\r\n")
        await reader.readline()  # EHLO
        await peer.send(ehlo_reply((b"PIPELINING",)))
        envelope = [await reader.readline() for _ in range(3)]
        for n in range(messages):
            srv.commands.extend(envelope)
            await peer.send(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
            lines = []
            while (line := await reader.readline()) != b".\r\n":
                lines.append(line)
            srv.received.append(b"".join(lines))
            if n < messages - 1:
                try:
                    envelope = [await asyncio.wait_for(reader.readline(), 1) for _ in range(3)]
                except TimeoutError:
                    srv.commands.append(b"no envelope before the reply to the dot")
                    return
            await peer.send(b"250 2.0.0 queued\r\n")
        await reader.readline()  # QUIT
        await peer.send(b"221 bye\r\n")

    return script


def test_the_next_envelope_goes_with_the_final_dot() -> None:
    """Three messages on one connection, each next MAIL, RCPT and DATA sent before the reply
    to the final dot: one round trip a message, not two. The same server keeps a client that
    waits for the reply (as without a chain) stuck, so the test tells the two apart."""

    async def go(chained: bool) -> tuple[list[Outcome], Scripted]:
        async with Scripted(looking_ahead(3)) as srv:
            settings = smtp_settings(srv.port)
            messages = [body(0), body(1), body(2)]
            sent = await (send_chained if chained else send_each)(settings, messages)
            return sent, srv

    outcomes, srv = run(go(True))
    assert [o.result for o in outcomes] == [Result.SENT] * 3, outcomes
    assert srv.received == [body(0), body(1), body(2)]
    assert srv.connections == 1
    rcpts = [c for c in srv.commands if c.startswith(b"RCPT")]
    assert rcpts == [f"RCPT TO:<reader{n}@example.net>\r\n".encode() for n in range(3)]
    outcomes, srv = run(go(False))
    assert outcomes[0].result is Result.TEMPORARY  # no reply to its dot ever came
    assert srv.commands[-1] == b"no envelope before the reply to the dot"


async def _accept_then_hang_up(peer: Peer) -> bool:
    await peer.send(b"250 2.0.0 queued\r\n")
    return False


def test_a_server_that_hangs_up_after_a_message_defers_nothing() -> None:
    """A relay that closes each connection after one message (its limit), never reading the
    envelope that came with the dot: the next message goes on a new connection, accepted."""

    async def go() -> tuple[list[Outcome], Scripted]:
        first = session(answers={b".": _accept_then_hang_up})
        async with Scripted(first, first, session()) as srv:
            outcomes = await send_chained(smtp_settings(srv.port), [body(0), body(1), body(2)])
            return outcomes, srv

    outcomes, srv = run(go())
    assert [o.result for o in outcomes] == [Result.SENT] * 3, outcomes
    assert srv.received == [body(0), body(1), body(2)]
    assert srv.connections == 3


async def _accept_then_fall_silent(peer: Peer) -> bool:
    await peer.send(b"250 2.0.0 queued\r\n")
    await peer.until_closed()
    return False


def test_a_server_silent_after_a_message_defers_the_carried_one_once() -> None:
    """A relay that accepts a message, then answers nothing: the message whose envelope went
    with its dot is deferred after one time-out (not tried again on a new connection while a
    pause may have come); the one after it goes on a new connection."""

    async def go() -> tuple[list[Outcome], float, Scripted]:
        first = session(answers={b".": _accept_then_fall_silent})
        async with Scripted(first, session()) as srv:
            settings = smtp_settings(srv.port, timeout_seconds=0.5)
            start = time.monotonic()
            outcomes = await send_chained(settings, [body(0), body(1), body(2)])
            return outcomes, time.monotonic() - start, srv

    outcomes, elapsed, srv = run(go())
    assert [o.result for o in outcomes] == [Result.SENT, Result.TEMPORARY, Result.SENT], outcomes
    assert srv.received == [body(0), body(2)]
    assert srv.connections == 2
    assert elapsed < 1.5, elapsed  # one time-out, not two


def test_a_dropped_chain_leaves_the_carried_message_undelivered() -> None:
    """A lane that will not send the message whose envelope went ahead (a pause came) drops
    the connection mid-DATA: the server keeps nothing of it, and the next send opens anew."""

    async def go() -> tuple[Outcome, Outcome, Scripted]:
        async with Scripted(session(), session()) as srv:
            pool = SmtpPool(smtp_settings(srv.port))
            chain = Chain(lambda: (SENDER, "paused@example.net"))
            try:
                first = await pool.send(body(0), sender=SENDER, recipient=RECIPIENT, chain=chain)
                chain.drop()
                await asyncio.sleep(0.1)
                after = await pool.send(body(1), sender=SENDER, recipient=RECIPIENT)
            finally:
                await pool.close()
            return first, after, srv

    first, after, srv = run(go())
    assert (first.result, after.result) == (Result.SENT, Result.SENT)
    assert srv.received == [body(0), body(1)]  # nothing for paused@, not even an empty one
    assert srv.connections == 2
    assert b"RCPT TO:<paused@example.net>\r\n" in srv.commands
