"""The service's own timetable: poll sources, the weekly digest per list, send, tidy up.

The logic lives in `Scheduler`, whose methods do whatever is due at `clock.now()` and are safe
to call again: a digest belongs to a cron slot recorded on its list, so a restarted, repeated or
second scheduler never sends the same slot twice, and a slot missed while the service was down
is sent once when it comes back (within the grace). APScheduler only decides *when* to call them;
its job store lives in our database so a restart keeps the timetable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from newsletter import throttle
from newsletter.alerts import alerts_for_urgent_items
from newsletter.assemble import assemble_digest
from newsletter.cases import cases_for_urgent_items, send_due_reminders
from newsletter.check import CheckError
from newsletter.clock import Clock
from newsletter.config import FeedSource, Settings
from newsletter.db import unit_of_work
from newsletter.db.models import ListKind, MailingList, Source
from newsletter.db.queries import release_expired
from newsletter.enqueue import launch_campaign
from newsletter.ingest import IngestReport, describe_report, ingest_all, source_key
from newsletter.lock import acquire_lock, release_lock
from newsletter.signup import purge_signups
from newsletter.staff_sessions import prune_sessions

log = logging.getLogger("newsletter.schedule")
LOCK_NAME = "scheduler"


def digest_trigger(settings: Settings) -> CronTrigger:
    """The weekly digest's cron trigger, in the configured time zone."""
    sched = settings.schedule
    return CronTrigger.from_crontab(sched.digest_cron, timezone=sched.timezone)


def latest_slot(trigger: CronTrigger, now: datetime, *, lookback: timedelta) -> datetime | None:
    """The trigger's most recent fire time at or before `now`, at most `lookback` ago."""
    slot, at = None, now - lookback
    while True:
        fire = trigger.get_next_fire_time(None, at)
        if fire is None or fire > now:
            return slot
        slot, at = fire, fire + timedelta(seconds=1)


def claim_digest_slot(session: Session, *, list_id: int, slot: datetime) -> bool:
    """Record that this list's digest for `slot` is being made; False if it already was.

    One conditional UPDATE, so two schedulers racing for the same slot cannot both win.
    """
    won = session.execute(
        update(MailingList)
        .where(
            MailingList.id == list_id,
            or_(MailingList.last_digest_slot.is_(None), MailingList.last_digest_slot < slot),
        )
        .values(last_digest_slot=slot)
        .returning(MailingList.id)
        .execution_options(synchronize_session=False)
    ).scalar()
    return won is not None


def source_is_due(source: Source | None, feed: FeedSource, *, now: datetime, default: int) -> bool:
    """A source is due when never fetched or when its poll interval has passed."""
    if source is None or source.last_fetched_at is None:
        return True
    minutes = feed.poll_minutes or default
    return now - source.last_fetched_at >= timedelta(minutes=minutes) - timedelta(seconds=5)


@dataclass
class Scheduler:
    """Does what is due now; every method is safe to repeat and to run in two processes."""

    factory: sessionmaker[Session]
    settings: Settings
    clock: Clock
    holder: str
    actor: str = "scheduler"
    ingest_log: list[IngestReport] = field(default_factory=list)
    refusals: dict[str, str] = field(default_factory=dict)
    # A poll and a webhook call may run at once on two threads: they make alerts one at a time.
    alerts_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def hold_lock(self) -> bool:
        """Take or renew the scheduler lease; only its holder schedules."""
        with unit_of_work(self.factory) as session:
            return acquire_lock(
                session,
                name=LOCK_NAME,
                holder=self.holder,
                now=self.clock.now(),
                seconds=self.settings.schedule.lock_seconds,
            )

    def let_go(self) -> None:
        """Release the lease at a clean stop, so a standby takes over at once."""
        with unit_of_work(self.factory) as session:
            release_lock(session, name=LOCK_NAME, holder=self.holder)

    def poll_sources(self, *, force: bool = False) -> list[IngestReport]:
        """Ingest every source whose interval has passed, then make alerts for urgent items."""
        now, settings = self.clock.now(), self.settings
        with unit_of_work(self.factory) as session:
            known = {s.url: s for s in session.scalars(select(Source))}
            due = [
                f
                for f in settings.sources.feeds
                if force
                or source_is_due(
                    known.get(source_key(f.url)), f, now=now, default=settings.schedule.poll_minutes
                )
            ]
        reports = (
            ingest_all(
                factory=self.factory,
                sources=[(f.url, f.name, f.lang) for f in due],
                settings=settings.sources,
                clock=self.clock,
            )
            if due
            else []
        )
        for report in reports:  # busy and failing sources are news, not errors of the service
            log.info(
                "ingest %s: new %d, updated %d, %s",
                report.source,
                report.new,
                report.updated,
                describe_report(report),
            )
        self.ingest_log = (self.ingest_log + reports)[-100:]
        self.make_alerts()
        self.make_cases()
        return reports

    def make_cases(self) -> list[int]:
        """Draft cases, held for staff, for recent urgent items ([actions] from_urgent_items)."""
        with self.alerts_lock:
            try:
                ids = self._make_cases()
            except IntegrityError:  # another process made one of them at the same moment
                ids = self._make_cases()
        for case_id in ids:
            log.info("case %d drafted from an urgent item; held for staff", case_id)
        return ids

    def _make_cases(self) -> list[int]:
        with unit_of_work(self.factory) as session:
            made = cases_for_urgent_items(
                session, settings=self.settings, now=self.clock.now(), actor=self.actor
            )
            return [c.id for c in made]

    def send_reminders(self) -> list[int]:
        """Start each open case's deadline reminder when it is due (once per case)."""
        with unit_of_work(self.factory) as session:
            started = send_due_reminders(
                session, settings=self.settings, now=self.clock.now(), actor=self.actor
            )
            ids = [c.id for c in started]
        for campaign_id in ids:
            log.info("case reminder campaign %d started", campaign_id)
        return ids

    def make_alerts(self) -> list[int]:
        """Alerts for recent urgent items (started now in auto mode, else held)."""
        with self.alerts_lock:
            try:
                ids = self._make_alerts()
            except IntegrityError:  # another process made one of them at the same moment
                log.info("another process made alerts at the same time; looking again")
                ids = self._make_alerts()
        for cid in ids:
            log.info("alert campaign %d made (%s mode)", cid, self.settings.alerts.mode)
        return ids

    def _make_alerts(self) -> list[int]:
        """One transaction of alerts_for_urgent_items (an alert's unique key rolls it back)."""
        with unit_of_work(self.factory) as session:
            made = alerts_for_urgent_items(
                session=session, settings=self.settings, now=self.clock.now(), actor=self.actor
            )
            return [c.id for c in made]

    def run_digests(self) -> list[int]:
        """Send each digest list's digest if its weekly slot is due; returns new campaign ids."""
        trigger = digest_trigger(self.settings)
        grace = timedelta(hours=self.settings.schedule.grace_hours)
        now, made = self.clock.now(), []
        slot = latest_slot(trigger, now, lookback=grace)
        if slot is None:
            return []
        with unit_of_work(self.factory) as session:
            lists = session.scalars(select(MailingList).where(MailingList.kind == ListKind.DIGEST))
            targets = [(ml.id, ml.slug) for ml in lists]
        for list_id, slug in targets:
            try:
                campaign_id = self._digest_for(list_id, slug, slot, now)
            except CheckError as e:  # nothing moved: retried on the next tick, once fixed
                if str(e) != self.refusals.get(slug):
                    log.error("digest for %s refused: %s", slug, e)
                    self.refusals[slug] = str(e)
                continue
            self.refusals.pop(slug, None)
            if campaign_id is not None:
                made.append(campaign_id)
        return made

    def _digest_for(self, list_id: int, slug: str, slot: datetime, now: datetime) -> int | None:
        """Claim the slot, assemble, check and start one list's digest, in one transaction."""
        with unit_of_work(self.factory) as session:
            if not claim_digest_slot(session, list_id=list_id, slot=slot):
                return None
            campaign = assemble_digest(
                session=session, list_slug=slug, now=now, actor=self.actor, settings=self.settings
            )
            if campaign is None:
                log.info("digest %s for %s: nothing new", slug, slot.isoformat())
                return None
            launch_campaign(
                session=session,
                campaign=campaign,
                settings=self.settings,
                now=now,
                actor=self.actor,
            )
            log.info("digest campaign %d for %s started", campaign.id, slug)
            return campaign.id

    def release_expired_claims(self) -> int:
        """Put back claims whose lease ran out (their worker died), so counts stay true."""
        with unit_of_work(self.factory) as session:
            return release_expired(session, now=self.clock.now())

    def prune_console(self) -> int:
        """Delete dead staff sessions and rate-limit windows older than a day."""
        with unit_of_work(self.factory) as session:
            now = self.clock.now()
            return prune_sessions(session, now=now, settings=self.settings) + throttle.prune(
                session, now=now
            )

    def purge_signups(self) -> int:
        """Forget web signups nobody confirmed in time, and expired marks and tickets."""
        with unit_of_work(self.factory) as session:
            return purge_signups(session, now=self.clock.now(), settings=self.settings)


# --- the APScheduler wiring ------------------------------------------------------------------

JOBS_TABLE = "apscheduler_jobs"

# APScheduler's job store keeps jobs as "module:function" references, so the jobs below find the
# running scheduler here rather than in their (pickled) arguments. `active` says whether this
# process holds the scheduler lease; only then do the jobs act.
_RUNNING: dict[str, tuple[Scheduler, Callable[[], bool]]] = {}


def register(scheduler: Scheduler, *, active: Callable[[], bool]) -> None:
    """Make `scheduler` the one the stored jobs call, while `active()` is true."""
    _RUNNING["scheduler"] = (scheduler, active)


def unregister() -> None:
    """Forget the running scheduler (the service is stopping)."""
    _RUNNING.pop("scheduler", None)


def _active() -> Scheduler | None:
    entry = _RUNNING.get("scheduler")
    if entry is None or not entry[1]():
        return None
    return entry[0]


def job_poll() -> None:
    """Scheduled: ingest due sources, make alerts and draft cases, retry a digest the check held
    back, and start the cases' deadline reminders that are due."""
    if (scheduler := _active()) is not None:
        scheduler.poll_sources()
        scheduler.run_digests()
        scheduler.send_reminders()


def job_digests() -> None:
    """Scheduled: send each digest list's digest if its slot is due."""
    if (scheduler := _active()) is not None:
        scheduler.run_digests()


def job_cleanup() -> None:
    """Scheduled: put back claims whose worker died; forget unconfirmed web signups; delete dead
    console sessions and old rate-limit windows."""
    if (scheduler := _active()) is not None:
        scheduler.release_expired_claims()
        scheduler.purge_signups()
        scheduler.prune_console()


def make_apscheduler(*, engine: Engine, settings: Settings) -> AsyncIOScheduler:
    """The timetable, kept in the service's own database so a restart keeps it."""
    sched = settings.schedule
    apscheduler = AsyncIOScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=engine, tablename=JOBS_TABLE)},
        job_defaults={
            "coalesce": True,
            "max_instances": 1,
            "misfire_grace_time": sched.grace_hours * 3600,
        },
        timezone=sched.timezone,
    )
    jobs: list[tuple[str, Callable[[], None], Any]] = [
        ("poll", job_poll, IntervalTrigger(minutes=1)),
        ("digests", job_digests, digest_trigger(settings)),
        ("cleanup", job_cleanup, IntervalTrigger(minutes=5)),
    ]
    for job_id, func, trigger in jobs:
        apscheduler.add_job(
            f"{__name__}:{func.__name__}", trigger, id=job_id, replace_existing=True
        )
    return apscheduler
