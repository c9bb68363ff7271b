"""The sender: claim a batch, re-check who may still be mailed, build, send, record.

A batch is claimed in one short transaction (with a lease, and this worker's name), then sent over
as many lanes as the transport has connections. Each lane hands its message's outcome to the
ledger's writer, and its next message's final dot (the moment the server may accept it) waits
until that outcome is committed, together with whatever other lanes' outcomes wait by then: a
sender killed at any moment leaves at most one accepted-but-unrecorded message per connection,
and that one goes again with the same Message-ID. A watcher re-reads
the campaigns' states twice a second (pause, cancel, an alert due), renews the leases of live
claims and puts back the claims of sender processes on this host that no longer exist. A message
goes only while its campaign may send and its reader was found subscribed within the last
second: one that waited longer (for a rate limit, an hourly cap) is looked at again first.
Whatever this worker still holds when it stops (the database knows: claimed by it) is released.

Database calls run in threads (the producer's, the watcher's, the writer's), not on the event
loop that drives the connections; the one exception is the writer's common write on PostgreSQL,
a single statement the loop waits for like any other socket (ledger.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import random
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.audience import UNTHREADED, on_its_way, takes_newcomers, thread_states
from newsletter.bounces import verp_address
from newsletter.campaigns import finish_if_done
from newsletter.clock import Clock
from newsletter.config import Settings, SmtpSettings
from newsletter.db import unit_of_work
from newsletter.db.models import (
    Campaign,
    CampaignKind,
    DeliveryStatus,
    DiscreetMode,
    KeyProblemChoice,
    KeyStatus,
)
from newsletter.db.queries import (
    ClaimedRow,
    alert_due,
    case_of,
    claim_batch,
    claim_holders,
    count_due,
    earlier_case_messages,
    extend_leases,
    load_claimed,
    load_variant,
    owe_key_notices,
    postpone_claims,
    release_claims,
    release_claims_of,
    release_own_claims,
    running_campaigns,
    skip_left,
    stopped_campaigns,
    withhold,
)
from newsletter.dkim import DkimSigner, IdentitySigners, load_discreet_signer, load_signer
from newsletter.errors import MissingVariantError, PermanentDeliveryError
from newsletter.i18n import N_
from newsletter.ledger import (
    LedgerWriter,
    Recorded,
    RecordError,
    Ticket,
    pause_running,
    retry_delay,
)
from newsletter.message import Identity, ListInfo, MessageTemplate, Recipient, identity_for
from newsletter.openpgp import (
    OBSCURED_SUBJECT,
    KeyProblem,
    encrypt_message,
    load_signing_key,
)
from newsletter.openpgp import Signer as PgpSigner
from newsletter.readers import recheck_key
from newsletter.render import RenderedVariant, render_pointer
from newsletter.smtp import Chain, Outcome, Result, Transport, open_pool
from newsletter.smtp_wire import NotReady, Wire
from newsletter.tokens import make_copy_token, page_url

__all__ = [
    "BurstGuard",
    "Job",
    "JobQueue",
    "SendControl",
    "SendReport",
    "count_due_now",
    "deliver_all",
    "deliver_queued",
    "retry_delay",
    "worker_name",
]

log = logging.getLogger("newsletter.send")

WATCH_SECONDS = 0.5
# A message goes only if its reader was found still subscribed this recently: a job that waited
# longer (for a rate limit, behind others) is looked at again, its whole claim in one read.
FRESH_SECONDS = 1.0
# A live worker renews its leases this many times per [smtp] lease_seconds, so a lease runs out
# only after that many renewals in a row were missed (a database hiccup, not a slow message).
RENEWALS_PER_LEASE = 6


@dataclass
class SendReport:
    """What a sender did: counts by outcome, and campaigns finished or paused on the way."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    suppressed: int = 0
    withheld: int = 0  # readers whose key cannot be used and who chose nothing in the clear
    released: int = 0
    finished: list[int] = field(default_factory=list)
    paused: dict[int, str] = field(default_factory=dict)
    stopped: bool = False

    def add(self, other: SendReport) -> None:
        """Fold another report into this one."""
        self.sent += other.sent
        self.deferred += other.deferred
        self.failed += other.failed
        self.suppressed += other.suppressed
        self.withheld += other.withheld
        self.released += other.released
        self.finished += other.finished
        self.paused |= other.paused
        self.stopped = self.stopped or other.stopped

    @classmethod
    def of(cls, recorded: Recorded) -> SendReport:
        """The report of one commit of the ledger's writer."""
        return cls(
            sent=recorded.sent,
            deferred=recorded.deferred,
            failed=recorded.failed,
            paused=recorded.paused,
        )


@dataclass(eq=False)
class Claim:
    """The rows of one claim made into jobs, and when their readers were last found still
    subscribed (on the monotonic clock); the rows of those found gone since are in `left`."""

    ids: list[int] = field(default_factory=list)
    checked_at: float = field(default_factory=time.monotonic)
    left: set[int] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one lane reads for all

    def fresh(self) -> bool:
        """Whether the last look at its readers is recent enough to send on."""
        return time.monotonic() - self.checked_at < FRESH_SECONDS

    def vouches_for(self, delivery_id: int) -> bool:
        """Whether this row's reader was found still subscribed, recently enough."""
        return self.fresh() and delivery_id not in self.left


@dataclass(frozen=True)
class Job:
    """One claimed delivery made ready to send."""

    delivery_id: int
    campaign_id: int
    subscriber_id: int
    email: str
    attempts: int
    retry_from: datetime
    envelope_from: str
    message: bytes
    error: str = ""  # set when no message could be built: fail without sending
    # Builds the message when its lane is about to send it (a plain one): on the event loop,
    # one at a time, so a batch's messages are never all in memory and the builder thread
    # does not fight the lanes for the GIL. Raises PermanentDeliveryError as building does.
    build: Callable[[], bytes] | None = None
    claim: Claim | None = None  # None: never looked at again before it goes

    def payload(self) -> bytes:
        """The message bytes, built now if they are built late."""
        return self.build() if self.build is not None else self.message


# --- who holds a claim: worker names name the host and the process --------------------------


def worker_name() -> str:
    """A name for this sender process, unique enough to tell its claims from others'."""
    return f"{_host_id()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _host_id() -> str:
    """This host as claims name it: the host name, and on Linux the PID namespace.

    Two containers may share a host name but not a PID namespace; a worker only judges the
    processes it can see.
    """
    host = socket.gethostname()[:30].replace(":", "_")
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return f"{host}/{''.join(c for c in namespace if c.isdigit())}"


def is_gone(worker: str) -> bool:
    """Whether a claim holder was a process on this host that no longer runs."""
    host, _, rest = worker.partition(":")
    pid, _, _tag = rest.partition(":")
    if host != _host_id() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not _process_runs(int(pid))


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:  # a zombie (killed, not yet reaped by its parent) sends nothing more
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


# --- what may be sent ---------------------------------------------------------------------


@dataclass
class SendControl:
    """What may be sent right now: a stop request, and campaigns no longer running.

    `held` is written by one hand only: the sender's watcher, from the database.
    """

    stopping: bool = False
    held: set[int] = field(default_factory=set)
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    def request_stop(self) -> None:
        """Finish what is in flight, send nothing new (SIGTERM / SIGINT)."""
        self.stopping = True
        for callback in list(self.on_stop):
            callback()

    def may_send(self, campaign_id: int) -> bool:
        """Whether a message of this campaign may start now."""
        return not self.stopping and campaign_id not in self.held


class BurstGuard:
    """Holds back a campaign whose deliveries fail [smtp] failure_burst times in a row.

    The outcome that trips it carries the pause to the ledger's writer, which commits both
    together; the campaign is held from that moment. The hold ends once the watcher has read the
    campaign's state after that commit: paused by then (held by the watcher), or resumed.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._streaks: dict[int, int] = {}
        self._holding: dict[int, bool] = {}  # campaign -> its pause is committed

    def observe(self, campaign_id: int, outcome: Outcome, *, held: bool) -> str | None:
        """Count one outcome; the pause's reason when it trips the campaign, else None."""
        failed = outcome.result is not Result.SENT
        streak = self._streaks.get(campaign_id, 0) + 1 if failed else 0
        self._streaks[campaign_id] = streak
        if not self.limit or streak < self.limit or held or campaign_id in self._holding:
            return None
        self._holding[campaign_id] = False
        return (
            f"paused after {streak} failed deliveries in a row; last reply: {outcome.reply[:200]}"
        )

    def holds(self, campaign_id: int) -> bool:
        """Whether this campaign is held for a failure burst."""
        return campaign_id in self._holding

    def committed(self, campaign_id: int) -> None:
        """The pause that tripped this campaign is in the database."""
        if campaign_id in self._holding:
            self._holding[campaign_id] = True

    def committed_ones(self) -> set[int]:
        """Campaigns held whose pause is committed (taken before the watcher reads states)."""
        return {cid for cid, done in self._holding.items() if done}

    def settle(self, read_after_commit: set[int]) -> None:
        """The watcher read these campaigns' states after their pause: its word holds now."""
        for cid in read_after_commit:
            self._holding.pop(cid, None)


class JobQueue:
    """Messages built and waiting for a lane, and how many lanes are sending one.

    The producer puts a batch and waits until the queue is down to a low mark, or idle; each
    lane takes one job at a time and says when it is done with it. A take wakes the producer
    only once the low mark is reached: waking it at every take cost the sender 2-3% of its CPU.
    Urgent jobs (alerts) are taken before any other job waiting.
    """

    def __init__(self) -> None:
        self._urgent: deque[Job] = deque()
        self._jobs: deque[Job] = deque()
        self._in_flight = 0
        self._open = True
        self._low = -1  # the producer waits for the queue to be down to this many jobs
        self._available = asyncio.Event()  # jobs are waiting, or the queue is closed
        self._changed = asyncio.Event()  # the producer should look again

    def __len__(self) -> int:
        return len(self._urgent) + len(self._jobs)

    def idle(self) -> bool:
        """Nothing waiting and nothing being sent."""
        return not self and self._in_flight == 0

    def has_urgent(self) -> bool:
        """Whether an urgent job is waiting for a lane."""
        return bool(self._urgent)

    def put(self, jobs: Iterable[Job], *, urgent: bool = False) -> None:
        """Add a batch's jobs for the lanes; `urgent` ones go before every other job waiting."""
        (self._urgent if urgent else self._jobs).extend(jobs)
        if self:
            self._available.set()

    def put_back(self, job: Job) -> None:
        """A job a lane took and gave way with (an alert came): first of the others again."""
        self._jobs.appendleft(job)
        self._available.set()

    async def take(self) -> Job | None:
        """The next job, counted in flight; None once the queue is closed and empty."""
        while not self:
            if not self._open:
                return None
            self._available.clear()
            await self._available.wait()
        return self._pop()

    def take_next(self, accept: Callable[[Job], bool]) -> Job | None:
        """The next job, counted in flight, if one is waiting and `accept` takes it."""
        waiting = self._urgent or self._jobs
        if not waiting or not accept(waiting[0]):
            return None
        return self._pop()

    def _pop(self) -> Job:
        self._in_flight += 1
        job = (self._urgent or self._jobs).popleft()
        if len(self) <= self._low:
            self._changed.set()
        return job

    def done(self) -> None:
        """A job taken is finished with (recorded, or set aside)."""
        self._in_flight -= 1
        if self.idle():
            self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool], *, low: int = -1) -> None:
        """Wait until the predicate holds; it is checked whenever the queue is down to `low`
        jobs, goes idle, or is woken."""
        self._low = low
        try:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()
        finally:
            self._low = -1

    def wake(self) -> None:
        """Let the producer look again (a stop was asked, an alert is due)."""
        self._changed.set()

    def close(self) -> None:
        """No more jobs will come: each lane ends once the queue is empty."""
        self._open = False
        self._available.set()
        self._changed.set()


# How long a case's update waits, when its reader's first message is still on its way.
HOLD_FOLLOW_UP = timedelta(minutes=5)


# --- building messages --------------------------------------------------------------------


class TemplateCache:
    """Message templates, built once per (campaign, language, discreet mode, sealed or not)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._cache: dict[tuple[int, str, str, bool], MessageTemplate | None] = {}
        self._threads: dict[int, tuple[int, ...]] = {}
        self._newcomers: dict[int, bool] = {}
        self._identities: dict[str, Identity] = {}

    def identity(self, discreet: str) -> Identity:
        """The sending identity of a reader's discreet mode, made once."""
        if (found := self._identities.get(discreet)) is None:
            found = self._identities[discreet] = identity_for(self._settings, discreet)
        return found

    def thread(self, session: Session, campaign_id: int) -> tuple[int, ...]:
        """The earlier messages of the campaign's case, oldest first (() outside a case)."""
        if campaign_id not in self._threads:
            self._threads[campaign_id] = earlier_case_messages(session, campaign_id)
        return self._threads[campaign_id]

    def takes_newcomers(self, session: Session, campaign_id: int) -> bool:
        """Whether the campaign is a case's update `include_new` (asked once per campaign)."""
        if campaign_id not in self._newcomers:
            self._newcomers[campaign_id] = takes_newcomers(session, campaign_id)
        return self._newcomers[campaign_id]

    def get(
        self,
        session: Session,
        campaign_id: int,
        lang: str,
        discreet: str = "off",
        *,
        sealed: bool = False,
    ) -> MessageTemplate:
        """The template in this language, else the default language's, for this discreet mode;
        `sealed` for a message that will be encrypted (it keeps the real Subject inside)."""
        default = self._settings.render.default_language
        for want in (lang, default):
            key = (campaign_id, want, discreet, sealed)
            if key not in self._cache:
                self._cache[key] = self._build(session, campaign_id, want, discreet, sealed)
            if (found := self._cache[key]) is not None:
                return found
        raise MissingVariantError(campaign_id, lang, default)

    def _build(
        self, session: Session, campaign_id: int, lang: str, discreet: str, sealed: bool
    ) -> MessageTemplate | None:
        found = load_variant(session, campaign_id, lang)
        if found is None:
            return None
        v, ml = found
        settings = self._settings
        identity = self.identity(discreet)
        if identity.discreet and not identity.discreet.configured:
            log.warning(
                "discreet readers' links name [web] base_url's host: set [discreet] base_url"
            )
        variant = RenderedVariant(v.lang, v.subject, v.html, v.text, v.link_nonce)
        if discreet == DiscreetMode.POINTER:
            token = make_copy_token(
                secret=settings.security.require_secret(), campaign_id=campaign_id, lang=v.lang
            )
            copy_url = page_url(identity.links_base, "copy", token)
            variant = render_pointer(lang=v.lang, copy_url=copy_url, settings=settings)
        return MessageTemplate.build(
            variant=variant,
            campaign_id=campaign_id,
            mlist=ListInfo(ml.id, ml.slug, ml.list_id),
            settings=settings,
            identity=identity,
            sealed=sealed,
            case_id=case_of(session, campaign_id),
        )


@dataclass(frozen=True)
class Signers:
    """What signs a message: DKIM for each identity, and the portal's OpenPGP key (if any)."""

    dkim: IdentitySigners = field(default_factory=IdentitySigners)
    openpgp: PgpSigner | None = None

    @classmethod
    def load(cls, settings: Settings, dkim: DkimSigner | None) -> Signers:
        """The configured signers; `dkim` is the portal's, loaded by the caller."""
        return cls(
            IdentitySigners(dkim, load_discreet_signer(settings)),
            load_signing_key(settings.openpgp.signing_key_file),
        )


@dataclass
class Prepared:
    """A claim's rows made ready: jobs to send, people who left, deliveries withheld."""

    jobs: list[Job] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    withheld: list[tuple[int, str]] = field(default_factory=list)
    key_notices: list[tuple[int, str, str]] = field(default_factory=list)
    # A case's later message whose reader's first message is still on its way: it waits.
    held: list[int] = field(default_factory=list)
    # A case's later message none of whose earlier messages reached its reader: never sent.
    unthreaded: list[int] = field(default_factory=list)


def key_trouble(session: Session, row: ClaimedRow, now: datetime) -> KeyProblem | None:
    """Why a reader's key cannot be used now; None when they have none or it is good.

    The stored key passed openpgp.read_key when it was given (readers.set_key), and what that
    judged cannot change for the same text but with time: so the check before each send is the
    stored state and expiry, with no parse (which cost more than encrypting). Once a signature
    of the key dated later counts (recheck_at), the key is judged again in full and the
    judgement stored, so only one message pays for it.
    """
    if row.key_status is None:
        return None
    if row.key_status == KeyStatus.REVOKED:
        return _trouble("revoked", N_("this key has been revoked"))
    if row.key_status == KeyStatus.REMOVED or not row.key_armored:
        return _trouble("removed", N_("the key was removed"))
    if row.key_expires_at is not None and row.key_expires_at <= now:
        return _trouble("expired", N_("this key expired"))
    if row.key_recheck_at is not None and row.key_recheck_at <= now:
        return recheck_key(
            session,
            subscriber_id=row.subscriber_id,
            fingerprint=row.key_fingerprint or "",
            armored=row.key_armored,
            email=row.email,
            now=now,
        )
    return None


def _trouble(code: str, message: str) -> KeyProblem:
    problem = KeyProblem.of(message)
    problem.code = code
    return problem


def prepare_jobs(
    session: Session,
    ids: list[int],
    *,
    settings: Settings,
    templates: TemplateCache,
    signer: DkimSigner | Signers | None,
    now: datetime,
) -> tuple[list[Job], list[int]]:
    """Build messages for claimed rows; returns the jobs and the rows of people who left.

    Deliveries withheld for a key problem are marked in this transaction, with the notices owed.
    Raises MissingVariantError when a campaign has no variant to build a message from.
    """
    signers = signer if isinstance(signer, Signers) else Signers(IdentitySigners(signer))
    prepared = prepare(
        session, ids, settings=settings, templates=templates, signers=signers, now=now
    )
    withhold(session, prepared.withheld)
    owe_key_notices(session, prepared.key_notices, now=now)
    postpone_claims(session, prepared.held, until=now + HOLD_FOLLOW_UP)
    skip_left(session, prepared.unthreaded, reason=UNTHREADED)
    return prepared.jobs, prepared.gone


def prepare(
    session: Session,
    ids: list[int],
    *,
    settings: Settings,
    templates: TemplateCache,
    signers: Signers,
    now: datetime,
    claim: Claim | None = None,
) -> Prepared:
    """Each claimed row as a job, or set aside: left the list, withheld for a key problem, or a
    case's later message held for an earlier one still on its way, or given up without one.
    Each job names `claim`, the look at its reader it goes on."""
    out = Prepared()
    rows = load_claimed(session, ids)
    threads, waiting, unthreaded = _threads(session, rows, templates)
    for row in rows:
        if not row.may_be_mailed:
            out.gone.append(row.delivery_id)
            continue
        if row.delivery_id in waiting:
            out.held.append(row.delivery_id)
            continue
        if row.delivery_id in unthreaded:
            out.unthreaded.append(row.delivery_id)
            continue
        trouble = key_trouble(session, row, now)
        if trouble is None and row.key_armored:
            try:
                out.jobs.append(
                    _job(
                        session,
                        row,
                        thread=threads.get(row.delivery_id, ()),
                        encrypt=True,
                        settings=settings,
                        templates=templates,
                        signers=signers,
                        now=now,
                        claim=claim,
                    )
                )
                continue
            except KeyProblem as problem:  # Sequoia could not encrypt to it after all
                trouble = problem
        if trouble is not None:
            out.key_notices.append((row.subscriber_id, row.key_fingerprint or "", trouble.code))
            if row.on_key_problem != KeyProblemChoice.PLAIN:
                # The code, not the message: a message may name the reader's address.
                out.withheld.append((row.delivery_id, f"withheld: key {trouble.code}"))
                continue
        out.jobs.append(
            _job(
                session,
                row,
                thread=threads.get(row.delivery_id, ()),
                encrypt=False,
                settings=settings,
                templates=templates,
                signers=signers,
                now=now,
                claim=claim,
            )
        )
    return out


def _threads(
    session: Session, rows: list[ClaimedRow], templates: TemplateCache
) -> tuple[dict[int, tuple[int, ...]], set[int], set[int]]:
    """For each row of a case's later message: the earlier messages of the case its reader was
    sent (its thread); whether one of them is still on its way to them (then it waits, so that
    nobody gets an update before the message it updates); and whether none of them reached or
    can still reach them (then it is never sent: an update is for those who got what it
    updates, unless it is `include_new`). One query per claim, and none when the claim holds no
    such row."""
    wanted = {row.campaign_id: templates.thread(session, row.campaign_id) for row in rows}
    earlier = {c for thread in wanted.values() for c in thread}
    if not earlier:
        return {}, set(), set()
    states = thread_states(session, earlier, {row.subscriber_id for row in rows})
    threads: dict[int, tuple[int, ...]] = {}
    waiting: set[int] = set()
    unthreaded: set[int] = set()
    for row in rows:
        thread = wanted[row.campaign_id]
        if not thread:
            continue
        mine = [(c, states.get((c, row.subscriber_id))) for c in thread]
        sent = tuple(c for c, state in mine if state and state[0] == DeliveryStatus.SENT)
        threads[row.delivery_id] = sent
        if any(state and on_its_way(*state) for _c, state in mine):
            waiting.add(row.delivery_id)
        elif not sent and not templates.takes_newcomers(session, row.campaign_id):
            unthreaded.add(row.delivery_id)
    return threads, waiting, unthreaded


def _job(
    session: Session,
    row: ClaimedRow,
    *,
    thread: tuple[int, ...] = (),
    encrypt: bool,
    settings: Settings,
    templates: TemplateCache,
    signers: Signers,
    now: datetime,
    claim: Claim | None = None,
) -> Job:
    """One reader's message: spliced from the template, encrypted to their key, DKIM-signed."""
    identity = templates.identity(row.discreet)
    discreet = identity.discreet is not None
    message, error, build = b"", "", None
    try:
        sealed = encrypt and bool(row.key_armored)
        template = templates.get(
            session, row.campaign_id, row.language, row.discreet, sealed=sealed
        )
        recipient = Recipient(row.subscriber_id, row.email, row.name, thread)
        if sealed and row.key_armored:
            message = template.render(recipient, settings=settings, now=now)
            message = encrypt_message(
                message,
                armored_key=row.key_armored,
                signer=signers.openpgp,
                outer_subject=identity.subject(OBSCURED_SUBJECT, row.language),
                autocrypt=identity.discreet is None,
                checked=True,  # key_trouble judged the key (in full, if its recheck came)
            )
            message = signers.dkim.sign(message, discreet=discreet)
        else:
            build = functools.partial(
                _plain_message,
                template,
                recipient,
                settings=settings,
                now=now,
                dkim=signers.dkim,
                discreet=discreet,
            )
    except PermanentDeliveryError as e:
        error = str(e)
    envelope = verp_address(
        row.delivery_id, settings=settings, bounce_address=identity.bounce_address
    )
    return Job(
        row.delivery_id,
        row.campaign_id,
        row.subscriber_id,
        row.email,
        row.attempts,
        row.requeued_at or row.created_at,
        envelope,
        message,
        error,
        build,
        claim,
    )


def _plain_message(
    template: MessageTemplate,
    recipient: Recipient,
    *,
    settings: Settings,
    now: datetime,
    dkim: IdentitySigners,
    discreet: bool,
) -> bytes:
    """A plain message: DKIM-signed if its identity signs, else already dot-stuffed."""
    if dkim.discreet if discreet else dkim.plain:
        return dkim.sign(template.render(recipient, settings=settings, now=now), discreet=discreet)
    return Wire(template.render(recipient, settings=settings, now=now, wire=True))


@dataclass
class Batch:
    """One claim: its rows, the messages built from them, and what was set aside."""

    ids: list[int]
    jobs: list[Job] = field(default_factory=list)
    report: SendReport = field(default_factory=SendReport)
    alerts: set[int] = field(default_factory=set)  # the campaigns among them that are alerts


def claim_size(smtp: SmtpSettings) -> int:
    """Rows per claim: [smtp] batch_size, or about a second of sending if every relay is paced.

    A paced sender's claimed messages wait their turn: the fewer there are, the less there is to
    look at again (who left) or put back (a pause), and the sooner an alert's claim comes.
    """
    relays = [r for r in smtp.all_relays() if r.weight > 0]
    if not relays or not all(r.rate_per_second > 0 for r in relays):
        return smtp.batch_size
    second = math.ceil(sum(r.rate_per_second for r in relays))
    return max(1, min(smtp.batch_size, second))


# --- the sender -----------------------------------------------------------------------------


class Sender:
    """One worker's delivery loop; `deliver_queued` is its public face.

    A producer claims and prepares the next batch (in a database thread) while the lanes are
    still sending the current one, so the connections never wait for a claim. Made inside the
    running event loop, which it keeps for waking itself from other threads.
    """

    def __init__(
        self,
        *,
        factory: sessionmaker[Session],
        settings: Settings,
        transport: Transport,
        clock: Clock,
        control: SendControl,
        worker: str,
        campaign_id: int | None,
        rng: random.Random,
        signer: DkimSigner | None,
        on_batch: Callable[[SendReport], None] | None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.factory, self.settings, self.transport = factory, settings, transport
        self.clock, self.control, self.worker = clock, control, worker
        self.campaign_id, self.on_batch = campaign_id, on_batch
        self.signers = Signers.load(settings, signer)
        self.templates = TemplateCache(settings)
        self.writer = LedgerWriter(
            factory=factory, settings=settings, clock=clock, rng=rng, on_commit=self._committed
        )
        self.guard = BurstGuard(settings.smtp.failure_burst)
        self.jobs = JobQueue()
        self.total = SendReport()
        self.active: set[int] = set()  # campaigns this run has claimed rows of
        self.unstarted: list[Job] = []  # taken by a lane but held back: released before a claim
        self.is_alert: dict[int, bool] = {}  # campaign -> an alert? (read by the claim thread)
        self.alert_due = False  # the watcher saw alert deliveries due: claim now
        self.lanes = max(sum(r.pool_size for r in settings.smtp.all_relays() if r.weight > 0), 1)
        # Claims and message building always run on this one thread, so the batches' buffers
        # reuse one malloc arena: spread over the shared pool's threads (to_thread), they raised
        # benchmarks/send.py's peak memory by 20-35 MB.
        self.builder = ThreadPoolExecutor(1, thread_name_prefix="claim")
        control.on_stop.append(transport.interrupt)
        control.on_stop.append(self._poke_threadsafe)

    async def run(self) -> SendReport:
        """Claim, send and record batch after batch until nothing is due or a stop is asked."""
        watcher = asyncio.create_task(self._watch())
        try:
            await self._look(renew=True)  # before the first claim: dead claims, stale holds
            async with asyncio.TaskGroup() as group:
                group.create_task(self._produce())
                for _ in range(self.lanes):
                    group.create_task(self._lane())
        except BaseExceptionGroup as failed:
            raise _first_cause(failed) from None
        finally:
            watcher.cancel()
            await asyncio.to_thread(self.builder.shutdown)  # a claim under way ends first
            self.control.on_stop.remove(self._poke_threadsafe)
            self.control.on_stop.remove(self.transport.interrupt)
            await self.writer.close()  # every outcome in hand is committed before the release
            # Whatever this worker still holds: never attempted, or attempted and unrecorded.
            released = await asyncio.to_thread(self._release_own)
            self._report(SendReport(released=released))
        # Campaigns with nothing left (or no audience) are finished.
        self.total.finished += await asyncio.to_thread(self._finish_running)
        self.total.stopped = self.control.stopping
        return self.total

    # --- the producer: claim and prepare ahead of the lanes ---------------------------------

    async def _produce(self) -> None:
        limit = claim_size(self.settings.smtp)
        to_finish: set[int] = set()
        try:
            while not self.control.stopping:
                await self._release_unstarted()  # e.g. a campaign resumed meanwhile: claim again
                self.alert_due = False  # this claim takes every alert row due first
                batch = await self.loop.run_in_executor(
                    self.builder, self._claim_and_prepare, limit
                )
                if not batch.ids:
                    return
                self._report(batch.report)
                cids = {job.campaign_id for job in batch.jobs}
                self.active |= cids
                to_finish |= cids
                # Claims take alerts first, and alert jobs go before every job waiting: a
                # digest's message starts only once every alert message claimed has started.
                self.jobs.put((j for j in batch.jobs if j.campaign_id in batch.alerts), urgent=True)
                self.jobs.put(j for j in batch.jobs if j.campaign_id not in batch.alerts)
                if self.jobs.has_urgent():  # lanes waiting for a rate limit give way to them
                    self.transport.wake()
                short = len(batch.ids) < limit
                # Nothing more due: let them finish, then close campaigns; unless the watcher
                # sees an alert's deliveries due meanwhile (claim them now).
                if short:
                    await self.jobs.wait_until(lambda: self.jobs.idle() or self.alert_due)
                else:  # claim the next batch when half of this one has gone out
                    await self.jobs.wait_until(
                        lambda: (
                            len(self.jobs) <= limit // 2 or self.control.stopping or self.alert_due
                        ),
                        low=limit // 2,
                    )
                if short and self.jobs.idle():
                    # What went is committed first: a campaign with nothing left finishes.
                    await self.writer.flush()
                    await self._finish_done(to_finish)
                    to_finish = set()
        finally:
            self.jobs.close()

    def _claim_and_prepare(self, limit: int) -> Batch:
        """Claim a batch in one short transaction, then build its messages (a database thread)."""
        with unit_of_work(self.factory) as session:
            ids = claim_batch(
                session,
                now=self.clock.now(),
                lease_seconds=self.settings.smtp.lease_seconds,
                limit=limit,
                campaign_id=self.campaign_id,
                worker=self.worker,
            )
        if not ids:
            return Batch(ids)
        claim = Claim()  # its readers are looked at now (load_claimed, in prepare)
        try:
            with unit_of_work(self.factory) as session:
                now = self.clock.now()
                prepared = prepare(
                    session,
                    ids,
                    settings=self.settings,
                    templates=self.templates,
                    signers=self.signers,
                    now=now,
                    claim=claim,
                )
                skip_left(session, prepared.gone)
                withhold(session, prepared.withheld)
                owe_key_notices(session, prepared.key_notices, now=now)
                postpone_claims(session, prepared.held, until=now + HOLD_FOLLOW_UP)
                skip_left(session, prepared.unthreaded, reason=UNTHREADED)
                alerts = self._alerts_among(session, {job.campaign_id for job in prepared.jobs})
        except MissingVariantError as error:
            return self._set_aside(ids, error)
        claim.ids = [job.delivery_id for job in prepared.jobs]
        suppressed = len(prepared.gone) + len(prepared.unthreaded)
        report = SendReport(suppressed=suppressed, withheld=len(prepared.withheld))
        return Batch(ids, prepared.jobs, report, alerts)

    def _alerts_among(self, session: Session, cids: set[int]) -> set[int]:
        """Which of these campaigns are alerts (each campaign asked once)."""
        if new := cids - self.is_alert.keys():
            stmt = select(Campaign.id).where(
                Campaign.id.in_(new), Campaign.kind == CampaignKind.ALERT
            )
            alerts = set(session.scalars(stmt))
            self.is_alert.update((cid, cid in alerts) for cid in new)
        return {cid for cid in cids if self.is_alert[cid]}

    def _set_aside(self, ids: list[int], error: MissingVariantError) -> Batch:
        """A campaign no message can be built for is paused, with why; the batch goes back."""
        with unit_of_work(self.factory) as session:
            cid, reason = error.campaign_id, str(error)
            paused = pause_running(session, campaign_id=cid, reason=reason, now=self.clock.now())
            released = release_claims(session, ids, worker=self.worker)
        return Batch(
            ids, report=SendReport(released=released, paused={cid: reason} if paused else {})
        )

    # --- the lanes: one message at a time each, recorded before the next --------------------

    async def _lane(self) -> None:
        recording: Ticket | None = None  # this lane's last outcome, handed to the writer
        following: list[Job] = []  # the job whose envelope went with the last final dot

        def follow() -> tuple[str, str] | None:
            job = self.jobs.take_next(lambda job: not job.error and self._vouched(job))
            if job is None:
                return None
            following.append(job)
            return job.envelope_from, job.email

        chain = Chain(follow)
        try:
            while (job := following.pop() if following else await self.jobs.take()) is not None:
                try:
                    recording = await self._one(job, recording, chain) or recording
                except NotReady:  # the previous outcome's commit failed: its own error stops us
                    assert recording is not None
                    await recording
                    raise
                finally:
                    self.jobs.done()
        finally:
            chain.drop()
            for job in following:  # taken for a connection that failed with this lane
                self.unstarted.append(job)
                self.jobs.done()
        if recording is not None:
            await recording

    async def _one(self, job: Job, recording: Ticket | None, chain: Chain) -> Ticket | None:
        """Send one job; the ticket of its outcome's commit (None if it was set aside).

        The message goes while the lane's previous outcome (`recording`) is still waiting for
        its commit: only its final dot, the moment the server may accept it, awaits that commit
        (and so asks for it). So a connection never has more than one accepted-but-unrecorded
        message, and the commit's latency hides behind the next message's envelope and body.
        With PIPELINING, the lane's next job's envelope goes with the final dot (`chain`).
        A job whose reader was last found subscribed too long ago (FRESH_SECONDS) is looked at
        again before it goes, also after waiting for a rate limit; one who left is skipped.
        """
        if not self._may_send(job.campaign_id):
            if recording is not None and recording.done():
                # A failed commit (a burst's pause among them) stops the lane, as at a final
                # dot: else a hold whose pause never reached the database would last forever.
                await recording
            chain.drop()  # its envelope may be waiting on the connection: nothing more goes
            self.unstarted.append(job)
            return None
        outcome = await self._attempt(job, recording, chain)
        if outcome.result is Result.UNSENT:
            if job.claim is not None and job.delivery_id in job.claim.left:
                await self._skip_left(job)
            elif self._gives_way(job) and not self.control.stopping:
                self.jobs.put_back(job)  # an alert's message waits: this one goes after it
            else:  # paused, interrupted, or its reader could not be looked at again
                self.unstarted.append(job)
            return None
        held = job.campaign_id in self.control.held
        pause = self.guard.observe(job.campaign_id, outcome, held=held)
        if pause is not None:  # lanes waiting for a rate limit give their messages back
            self.transport.wake()
        return self.writer.add(job, outcome, pause=pause)

    async def _still_subscribed(self, job: Job, claim: Claim) -> bool:
        """Whether the job's reader may still be mailed: read again, for the whole claim, if
        the claim's last look is too old (one lane reads, the others wait for its answer).
        False, without a verdict, if the database cannot answer: the message goes back."""
        async with claim.lock:
            if not claim.fresh():
                try:
                    claim.left |= await asyncio.to_thread(self._who_left, claim.ids)
                except Exception as error:  # a database hiccup: not a reason to stop the lane
                    log.warning("sender could not look at readers again: %s", _first_line(error))
                    return False
                # Dated when the answer came: a slow read would otherwise be old at once, and
                # the lanes would read again and again.
                claim.checked_at = time.monotonic()
        return job.delivery_id not in claim.left

    def _who_left(self, ids: list[int]) -> set[int]:
        """The rows among these whose reader may no longer be mailed, or that are gone (a
        forgotten reader's deliveries are deleted with them): a database thread."""
        with unit_of_work(self.factory) as session:
            found = {row.delivery_id: row.may_be_mailed for row in load_claimed(session, ids)}
        return {i for i in ids if not found.get(i, False)}

    async def _skip_left(self, job: Job) -> None:
        """A reader who left after the claim: recorded as the claim records those who left."""
        await asyncio.to_thread(self._skip, [job.delivery_id])
        self._report(SendReport(suppressed=1))

    def _skip(self, ids: list[int]) -> None:
        with unit_of_work(self.factory) as session:
            skip_left(session, ids)

    def _committed(self, recorded: Recorded) -> None:
        """A commit of the writer: counted, and the pauses it carried are in the database."""
        self._report(SendReport.of(recorded))
        for campaign_id in recorded.pause_asked:
            self.guard.committed(campaign_id)

    def _may_send(self, campaign_id: int) -> bool:
        return self.control.may_send(campaign_id) and not self.guard.holds(campaign_id)

    def _vouched(self, job: Job) -> bool:
        """Whether the job's message may go now without a read: its campaign may send, and its
        reader was found still subscribed recently enough."""
        return self._may_send(job.campaign_id) and (
            job.claim is None or job.claim.vouches_for(job.delivery_id)
        )

    async def _may_go(self, job: Job) -> bool:
        """Whether the job's message may go, asked right before it does: as `_vouched`, with
        its claim's readers looked at again if that look is too old (one read per claim)."""
        if not self._may_send(job.campaign_id):
            return False
        claim = job.claim
        if claim is None or claim.vouches_for(job.delivery_id):  # the common case: no read
            return True
        return await self._still_subscribed(job, claim)

    def _may_wait(self, job: Job) -> bool:
        """Whether the job may go on waiting for a rate limit: its campaign may send, and no
        alert's message waits for a lane while it is a digest's (`_gives_way`)."""
        return self._may_send(job.campaign_id) and not self._gives_way(job)

    def _gives_way(self, job: Job) -> bool:
        """A job not of an alert, while an alert's message waits for a lane."""
        return self.jobs.has_urgent() and not self.is_alert.get(job.campaign_id, False)

    async def _attempt(self, job: Job, recording: Ticket | None, chain: Chain) -> Outcome:
        if job.error:
            chain.drop()  # its envelope may be waiting on the connection: nothing more goes
            return Outcome(Result.PERMANENT, job.error)
        try:
            message = job.payload()
        except PermanentDeliveryError as error:
            chain.drop()
            return Outcome(Result.PERMANENT, str(error))
        return await self.transport.send(
            message,
            sender=job.envelope_from,
            recipient=job.email,
            ready=recording,
            chain=chain,
            may_wait=functools.partial(self._may_wait, job),
            may_go=functools.partial(self._may_go, job),
            urgent=self.is_alert.get(job.campaign_id, False),
        )

    def _poke_threadsafe(self) -> None:
        """Wake the producer (a stop was asked), from any thread."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.jobs.wake)

    # --- claims handed back, campaigns closed (each in a database thread) ---------------------

    async def _release_unstarted(self) -> None:
        jobs, self.unstarted = self.unstarted, []
        if jobs:
            ids = [job.delivery_id for job in jobs]
            released = await asyncio.to_thread(self._release, ids)
            self._report(SendReport(released=released))

    def _release(self, ids: list[int]) -> int:
        with unit_of_work(self.factory) as session:
            return release_claims(session, ids, worker=self.worker)

    def _release_own(self) -> int:
        with unit_of_work(self.factory) as session:
            return release_own_claims(session, worker=self.worker)

    async def _finish_done(self, cids: set[int]) -> None:
        done = await asyncio.to_thread(self._finish, sorted(cids))
        self._report(SendReport(finished=done))

    def _finish(self, cids: list[int]) -> list[int]:
        with unit_of_work(self.factory) as session:
            now = self.clock.now()
            return [
                cid for cid in cids if finish_if_done(session=session, campaign_id=cid, now=now)
            ]

    def _finish_running(self) -> list[int]:
        with unit_of_work(self.factory) as session:
            ours = [c for c in running_campaigns(session) if self.campaign_id in (None, c)]
        return self._finish(ours)

    def _report(self, report: SendReport) -> None:
        self.total.add(report)
        if self.on_batch:
            self.on_batch(report)

    # --- the watcher ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Look at the database twice a second; renew leases six times per lease."""
        renew_every = max(self.settings.smtp.lease_seconds / RENEWALS_PER_LEASE, WATCH_SECONDS)
        since_renew = 0.0
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            since_renew += WATCH_SECONDS
            renew = since_renew >= renew_every
            if await self._look(renew=renew) and renew:
                since_renew = 0.0

    async def _look(self, *, renew: bool) -> bool:
        """Campaign states into `control.held` (its one writer); False after a database error.

        Recomputed, not accumulated: a campaign resumed meanwhile may be sent again. Lanes
        waiting for a rate limit are woken when it changes, and the producer when an alert's
        deliveries are due. With `renew`, this worker's leases are renewed and dead processes'
        claims put back.
        """
        committed = self.guard.committed_ones()
        try:
            stopped, alerts = await asyncio.to_thread(self._read_states, set(self.active), renew)
        except Exception as error:  # a database hiccup: the lease outlasts a few misses
            log.warning("sender could not read campaign states: %s", _first_line(error))
            return False
        changed = stopped != self.control.held
        self.control.held = stopped
        self.guard.settle(committed)
        if changed:
            self.transport.wake()
        # Alert jobs still waiting are sent first anyway; the next claim takes the rest.
        if alerts and not self.jobs.has_urgent():
            self.alert_due = True
            self.jobs.wake()
        return True

    def _read_states(self, active: set[int], renew: bool) -> tuple[set[int], bool]:
        """The watcher's one transaction (a database thread): the campaigns stopped, and
        whether an alert has deliveries due."""
        with unit_of_work(self.factory) as session:
            stopped = stopped_campaigns(session, active)
            alerts = alert_due(session, now=self.clock.now(), campaign_id=self.campaign_id)
            if renew:
                until = self.clock.now() + timedelta(seconds=self.settings.smtp.lease_seconds)
                extend_leases(session, worker=self.worker, until=until)
                self._put_back_dead(session)
        return stopped, alerts

    def _put_back_dead(self, session: Session) -> None:
        """Claims of sender processes on this host that no longer exist go back at once."""
        dead = [name for name in claim_holders(session) if is_gone(name)]
        if dead and (count := release_claims_of(session, dead)):
            log.info("put back %d claims of %d stopped sender process(es)", count, len(dead))


def _first_cause(group: BaseExceptionGroup) -> BaseException:
    """The error that stopped the sender, not the lanes that stopped because of it."""
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    causes = [e for e in leaves if not isinstance(e, RecordError | asyncio.CancelledError)]
    return (causes or leaves)[0]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


async def deliver_queued(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    transport: Transport,
    clock: Clock,
    campaign_id: int | None = None,
    on_batch: Callable[[SendReport], None] | None = None,
    rng: random.Random | None = None,
    control: SendControl | None = None,
    worker: str | None = None,
    signer: DkimSigner | None = None,
) -> SendReport:
    """Deliver every due delivery of running campaigns, then return what happened."""
    sender = Sender(
        factory=factory,
        settings=settings,
        transport=transport,
        clock=clock,
        control=control or SendControl(),
        worker=worker or worker_name(),
        campaign_id=campaign_id,
        rng=rng or random.Random(),
        signer=signer,
        on_batch=on_batch,
    )
    return await sender.run()


def count_due_now(
    *, factory: sessionmaker[Session], clock: Clock, campaign_id: int | None = None
) -> int:
    """How many deliveries a sender would claim now (for a progress bar's total)."""
    with unit_of_work(factory) as session:
        return count_due(session, now=clock.now(), campaign_id=campaign_id)


def deliver_all(
    *,
    factory: sessionmaker[Session],
    settings: Settings,
    clock: Clock,
    campaign_id: int | None = None,
    on_batch: Callable[[SendReport], None] | None = None,
    share: tuple[int, int] = (0, 1),
    handle_signals: bool = False,
) -> SendReport:
    """Deliver everything due now (of one campaign, or all) over a fresh pool, from sync code.

    The pool is seeded with each capped relay's last hour; `share` = (i, n) for worker i of n.
    With `handle_signals`, SIGTERM and SIGINT stop gracefully: in-flight messages finish and are
    recorded, claims not yet attempted are released.
    """
    signer, control = load_signer(settings), SendControl()

    async def run() -> SendReport:
        if handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, control.request_stop)
        async with open_pool(settings, factory, clock, share=share) as pool:
            return await deliver_queued(
                factory=factory,
                settings=settings,
                transport=pool,
                clock=clock,
                campaign_id=campaign_id,
                control=control,
                signer=signer,
                on_batch=on_batch,
            )

    return asyncio.run(run())
