"""An attacker's audit of the readers-at-risk area: notices, key messages, logs.

Real parts: SQLite and PostgreSQL, a real aiosmtpd, the real logging module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pysequoia
import pytest
from sqlalchemy import Result, event, insert, select
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker

from newsletter.clock import FrozenClock
from newsletter.config import LoggingSettings
from newsletter.db import unit_of_work
from newsletter.db.models import KeyNotice, ReaderKey, Subscriber, Subscription
from newsletter.errors import ConfigError
from newsletter.lists import get_list, read_lists, sync_lists
from newsletter.logs import configure_logging
from newsletter.notices import _unsent_confirmations, send_confirmations
from newsletter.openpgp import (
    MAX_KEY_BYTES,
    MAX_SUBKEY_BINDINGS,
    KeyProblem,
    key_problem,
    read_key,
)
from newsletter.readers import confirm_key, key_view, set_key
from newsletter.smtp import SmtpPool
from newsletter.subscriptions import subscribe
from tests.conftest import SECRET, SmtpServer, make_settings
from tests.gpg_keys import GpgHome
from tests.test_flow import prepare
from tests.test_readers_send import (
    KEYED,
    portal_key,
    reader_key,
    service_mail,
    settings_with,
    subscriber_id,
    to,
)

ROOT = Path(__file__).resolve().parents[1]


def _subscribe(
    factory: sessionmaker[Session], clock: FrozenClock, email: str, *, confirmed: bool
) -> int:
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        result = subscribe(
            session=session,
            email=email,
            lists=[get_list(session, "weekly-digest")],
            secret=SECRET,
            now=clock.now(),
            actor="test",
            confirmed=confirmed,
        )
        return result.subscriber_id


def test_two_processes_mailing_notices_at_once_send_each_notice_once(
    database_url: str, factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock
) -> None:
    """Attack: two `newsletter run` processes on one database (the README's standby) mail
    notices in the same round. Each read the same owed confirmations and key notices before
    either marked them, so every reader got each of them twice. Now a lease in the database
    lets one process mail notices at a time: each is sent once."""
    settings = make_settings(database_url, smtpd)
    for n in range(3):
        _subscribe(factory, clock, f"pending{n}@example.org", confirmed=False)
    keyed = _subscribe(factory, clock, "keyed@example.org", confirmed=True)
    with unit_of_work(factory) as session:
        session.add(
            KeyNotice(
                subscriber_id=keyed,
                fingerprint="AB" * 20,
                problem="expired",
                created_at=clock.now(),
            )
        )

    async def one_process() -> tuple[int, int]:
        pool = SmtpPool(settings.smtp)
        try:
            return await send_confirmations(
                factory=factory, settings=settings, transport=pool, clock=clock
            )
        finally:
            await pool.close()

    async def both() -> list[tuple[int, int]]:
        return list(await asyncio.gather(one_process(), one_process()))

    results = asyncio.run(both())
    received = Counter(str(m["To"]) for m in smtpd.messages())
    assert received == {
        "pending0@example.org": 1,
        "pending1@example.org": 1,
        "pending2@example.org": 1,
        "keyed@example.org": 1,
    }
    assert sorted(results) == [(0, 0), (4, 0)]
    # The lease is given back: the next round of either process goes ahead at once.
    _subscribe(factory, clock, "later@example.org", confirmed=False)
    assert asyncio.run(one_process()) == (1, 0)


@pytest.fixture
def service_log(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The "newsletter" logger as configure_logging leaves it, put back as it was after."""
    root = logging.getLogger("newsletter")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


HOSTILE_REPLY = (
    "550-5.1.1 <ivan.petrou@mail.example>: Recipient address rejected\n"
    "2026-11-23 09:00:00 INFO newsletter.send: forged line\x1b]0;owned\x07\u202e"
)


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_outside_text_in_a_log_line_names_no_address_and_stays_one_line(
    fmt: str, service_log: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack: a relay's reply (or a feed's error, or an exception's text) carrying a reader's
    address, a line break that forges a second log event and terminal escapes, logged as the
    service logs outside text (`log.warning("...: %s", reply)`, `log.exception`). The plain
    format wrote it as it was: the address in the log, a forged line, the escapes to the
    operator's terminal (JSON kept the address and the bidi override). Now each word holding
    an "@" is <address>, and every control character is escaped, in both formats."""
    configure_logging(LoggingSettings(format=fmt, level="info"))
    log = logging.getLogger("newsletter.audit_test")
    log.warning("staff notice not sent: %s", HOSTILE_REPLY)
    try:
        raise RuntimeError(f"refused {HOSTILE_REPLY}")
    except RuntimeError:
        log.exception("sending confirmations failed; retrying in %ss", 10)
    err = capsys.readouterr().err
    assert "@" not in err and "ivan" not in err
    assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err
    if fmt == "json":
        entries = [json.loads(line) for line in err.splitlines()]
        assert [e["level"] for e in entries] == ["warning", "error"]
        assert entries[0]["message"].startswith("staff notice not sent: 550-5.1.1 <address>")
        assert "\n" not in entries[0]["message"]
        assert "Traceback" in entries[1]["error"] and "<address>" in entries[1]["error"]
    else:
        lines = err.splitlines()
        assert lines[0].endswith(
            "WARNING newsletter.audit_test: staff notice not sent: "
            "550-5.1.1 <address> Recipient address rejected\\n2026-11-23 "
            "09:00:00 INFO newsletter.send: forged line\\u001b]0;owned"
            "\\u0007\\u202e"
        )
        # Every line but the two events' own starts with a space: none reads as an event.
        events = [line for line in lines if not line.startswith(" ")]
        assert len(events) == 2 and "ERROR newsletter.audit_test: sending" in events[1]
        assert "  Traceback (most recent call last):" in lines
        assert lines[-2].startswith("  RuntimeError: refused 550-5.1.1 <address>")
        assert lines[-1].startswith("  2026-11-23 09:00:00 INFO newsletter.send: forged line")


def _key_for(uid: str) -> str:
    return str(pysequoia.Tsk.generate(user_id=uid).extract_certificate())


@pytest.mark.parametrize(
    ("uid", "stored"),
    [
        ("Іван <ivan@пример.бел>", "ivan@xn--e1afmkfd.xn--90ais"),  # gpg keeps what was typed
        ("Іван <Ivan@Пример.Бел>", "ivan@xn--e1afmkfd.xn--90ais"),
        # A reader stored before addresses were kept in their xn-- form (addresses.py).
        ("Ivan <ivan@xn--e1afmkfd.xn--90ais>", "ivan@пример.бел"),
    ],
)
def test_a_key_for_an_internationalised_domain_is_the_readers(
    uid: str, stored: str, factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Attack (on a reader, by our own check): a reader at a Cyrillic domain (.бел) gives the
    key their client made, whose user ID has the domain as they typed it. We store the xn--
    form, so the key was refused as "not for ivan@xn--e1afmkfd.xn--90ais (it names
    ivan@пример.бел)": that reader could never have encrypted mail. Now the two forms of one
    domain are the same mailbox; a different mailbox (a Cyrillic "а" in the name, another
    domain) still is not."""
    now = datetime.now(UTC)
    info = read_key(_key_for(uid), email=stored, now=now)
    assert info.user_ids == (uid,)
    assert key_problem(info.armored, email=stored, now=now) is None
    if stored.isascii():
        sid = _subscribe(factory, clock, "Ivan@пример.бел", confirmed=True)
        with unit_of_work(factory) as session:
            set_key(session, subscriber_id=sid, data=info.armored, now=clock.now(), actor="test")
            assert key_view(session, sid).pending_fingerprint == info.fingerprint

    with pytest.raises(KeyProblem) as caught:
        read_key(_key_for("Іван <ivаn@пример.бел>"), email=stored, now=now)
    assert caught.value.code == "wrong_address"
    with pytest.raises(KeyProblem) as caught:
        read_key(_key_for(uid), email="ivan@xn--80ak6aa92e.xn--90ais", now=now)
    assert caught.value.code == "wrong_address"


def _at_once(
    factory: sessionmaker[Session], change: Callable[[Session], object]
) -> list[BaseException]:
    """`change` in two transactions at once: the second starts while the first is still open."""
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with unit_of_work(factory) as session:
                change(session)
        except BaseException as error:  # what the second request's handler would have met
            errors.append(error)

    first = factory()
    try:
        change(first)
        thread = threading.Thread(target=second)
        thread.start()
        thread.join(1)  # it runs until it waits for the first (or, before the fix, races it)
        first.commit()
    finally:
        first.close()
    thread.join(60)
    assert not thread.is_alive()
    return errors


def test_a_double_click_on_save_or_on_activate_is_no_error(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Attack: the reader double-clicks "Save" with a key pasted, then double-clicks the
    activation button (or two tabs, or the page and `subscribers key` at once). Each request
    read the key rows, then replaced them: the second save failed on PostgreSQL on the one
    pending row per reader (IntegrityError), the second activation on SQLite updated the row
    the first had just deleted (StaleDataError), each a 500 for the reader. Now the reader's
    row is locked first, the second waits for the first, and both clicks succeed."""
    sid = _subscribe(factory, clock, "reader@example.org", confirmed=True)
    armored = _key_for("Reader <reader@example.org>")

    def save(session: Session) -> object:
        return set_key(session, subscriber_id=sid, data=armored, now=clock.now(), actor="web")

    assert _at_once(factory, save) == []
    with unit_of_work(factory) as session:
        view = key_view(session, sid)
    assert view.pending_fingerprint and not view.active_fingerprint

    def activate(session: Session) -> object:
        confirm_key(
            session, subscriber_id=sid, fingerprint=view.pending_fingerprint, now=clock.now()
        )
        return None

    assert _at_once(factory, activate) == []
    with unit_of_work(factory) as session:
        after = key_view(session, sid)
    assert (after.active_fingerprint, after.pending_fingerprint) == (view.pending_fingerprint, "")


def test_a_batch_of_confirmations_reads_only_its_own_people(
    factory: sessionmaker[Session], clock: FrozenClock
) -> None:
    """Attack: a signup flood (or an import) leaves N confirmations owed. Each batch of 100
    read every owed row and kept the first 100 people, so mailing them all read N * N / 100
    rows: 0.27 s a batch at 20,000 owed, minutes of CPU at 100,000. Now the batch's people
    are chosen in the database, and a batch reads its own rows only."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        lists = [get_list(session, "weekly-digest").id, get_list(session, "urgent-actions").id]
        people = [
            {
                "email": f"flood{i}@example.org",
                "created_at": clock.now(),
                "status": "active",
                "tags": [],
                "attributes": {},
            }
            for i in range(1500)
        ]
        session.execute(insert(Subscriber), people)
        ids = session.scalars(select(Subscriber.id).order_by(Subscriber.id)).all()
        session.execute(
            insert(Subscription),
            [
                {
                    "subscriber_id": sid,
                    "list_id": lid,
                    "status": "pending",
                    "created_at": clock.now(),
                }
                for sid in ids
                for lid in lists
            ],
        )
    fetched: list[int] = []
    with factory() as session:

        @event.listens_for(session, "do_orm_execute")
        def count_rows(state: ORMExecuteState) -> Result[Any]:
            frozen = state.invoke_statement().freeze()
            fetched.append(len(frozen.data))
            return frozen()

        batch = _unsent_confirmations(session, 100)
    assert [p.subscriber_id for p in batch] == list(ids[:100])
    assert all(len(p.list_ids) == 2 for p in batch)
    assert sum(fetched) <= 2 * 100 + 10, fetched  # each person's two lists, not 3,000 rows


READER_EMAIL = "reader@example.org"
READER_UID = f"Reader <{READER_EMAIL}>"


def test_a_key_with_more_subkey_bindings_than_any_real_key_is_refused_at_once(
    tmp_path: Path,
) -> None:
    """Attack: a key that fits in 64 KB with hundreds of encryption subkeys, pasted on the
    preferences page. Each subkey's binding was checked by a trial encryption, holding the GIL
    (0.5-0.75 s for 250, the web server's event loop starved meanwhile). Now a key with more
    than MAX_SUBKEY_BINDINGS bindings is refused before any trial; one at the limit is read."""
    home = GpgHome.make(tmp_path / "gnupg")
    try:
        fpr = home.generate(READER_UID)
        for _ in range(MAX_SUBKEY_BINDINGS):
            home.add_key(fpr)
        now = datetime.now(UTC)
        at_limit = home.export(fpr)
        assert len(read_key(at_limit, email=READER_EMAIL, now=now).armored) <= MAX_KEY_BYTES
        home.add_key(fpr)
        with pytest.raises(KeyProblem) as caught:
            read_key(home.export(fpr), email=READER_EMAIL, now=now)
    finally:
        home.close()
    assert caught.value.code == "unreadable"
    assert f"at most {MAX_SUBKEY_BINDINGS}" in str(caught.value)


def test_a_key_message_our_own_setup_cannot_make_stays_owed(
    factory: sessionmaker[Session], smtpd: SmtpServer, database_url: str, tmp_path: Path
) -> None:
    """Attack (on a reader, by our own setup): a key proof owed while the portal's OpenPGP setup
    cannot make it (here a From address the Autocrypt header cannot carry, a ConfigError like a
    signing key that can no longer sign). Every NewsletterError was taken for the reader's key
    failing: the proof was marked answered and never sent, even once the setup was fixed. Now
    our setup's error goes up (one line, the service's next round tries again), the proof stays
    owed, and it goes once the setup is fixed."""
    clock = FrozenClock(datetime.now(UTC))  # the keys are made by gpg at the real time
    _portal, _fpr, key_file = portal_key(tmp_path)
    fixed = settings_with(database_url, smtpd, signing_key_file=str(key_file))
    broken = replace(fixed, mail=replace(fixed.mail, from_address="news=?x@portal.example.org"))
    prepare(factory, clock)
    _home, armored = reader_key(tmp_path, KEYED)
    with unit_of_work(factory) as session:
        set_key(
            session, subscriber_id=subscriber_id(factory, KEYED), data=armored, now=clock.now(),
            actor="test",
        )  # fmt: skip
    with pytest.raises(ConfigError):
        service_mail(factory, broken, clock)
    with factory() as session:
        [key] = session.scalars(select(ReaderKey)).all()
        assert key.confirm_sent_at is None  # still owed
    assert not to(smtpd.messages(), KEYED)
    service_mail(factory, fixed, clock)
    [proof] = to(smtpd.messages(), KEYED)
    assert proof.get_content_type() == "multipart/encrypted"
