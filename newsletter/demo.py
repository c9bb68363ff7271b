"""The whole flow once, on embedded defaults: feed → digest and alert → a local SMTP server."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.clock import Clock, SystemClock
from newsletter.config import Settings, load_settings
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import Campaign, Delivery, Item
from newsletter.devsmtp import MaildirHandler, free_port, start_dev_smtp
from newsletter.enqueue import launch_campaign
from newsletter.errors import CampaignError, ConfigError
from newsletter.importer import import_rows
from newsletter.ingest import ingest_all
from newsletter.lists import read_lists, sync_lists
from newsletter.message import ListInfo
from newsletter.preview import write_previews
from newsletter.send import deliver_all
from newsletter.subscriber_csv import read_csv
from newsletter.variants import render_campaign

PROJECT = Path(__file__).resolve().parents[1]
SAMPLE_FEED = Path(__file__).resolve().parent / "data" / "portal-feed.xml"
ACTOR = "demo"


@dataclass(frozen=True)
class DemoSummary:
    counts: dict[str, int]
    paths: dict[str, Path]


def demo_settings(directory: Path) -> Settings:
    """Embedded defaults, with a database, secret and SMTP port of the demo's own."""
    base = load_settings(None, {})
    return replace(
        base,
        database=replace(base.database, url=f"sqlite:///{directory / 'newsletter.db'}"),
        security=replace(base.security, secret=secrets.token_urlsafe(32)),
        smtp=replace(base.smtp, port=free_port()),
        source_path="(demo defaults)",
    )


def run_demo(
    *, directory: Path | None, say: Callable[[str], None], clock: Clock | None = None
) -> DemoSummary:
    """Run every step once and return what happened; `say` reports progress."""
    clock = clock or SystemClock()
    directory = (directory or Path(tempfile.mkdtemp(prefix="newsletter-demo-"))).resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / ".write-test").touch()
        (directory / ".write-test").unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot use {directory} as the demo folder ({e.strerror}): pass --dir with a "
            "folder you can write to"
        ) from None
    say(f"demo folder: {directory}")
    settings = demo_settings(directory)
    engine = make_engine(settings.database.url)
    migrate(engine)
    factory = make_sessionmaker(engine)
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(PROJECT / "subscribers" / "lists.toml"))
        imported = import_rows(
            session=session,
            rows=read_csv(PROJECT / "subscribers" / "example.csv"),
            default_list=None,
            confirmed=True,
            secret=settings.security.secret,
            now=clock.now(),
            actor=ACTOR,
        )
    say(f"subscribers imported: {imported.imported + imported.updated + imported.unchanged}")
    [report] = ingest_all(
        factory=factory,
        sources=[(str(SAMPLE_FEED), "portal sample", "en")],
        settings=settings.sources,
        clock=clock,
    )
    say(f"ingested {report.new} new items from the sample feed")
    maildir = directory / "maildir"
    handler = MaildirHandler(maildir)
    controller = start_dev_smtp(
        host=settings.smtp.host, port=settings.smtp.port, maildir=maildir, handler=handler
    )
    say(f"dev SMTP server on {settings.smtp.host}:{settings.smtp.port}")
    try:
        preview_dir = directory / "preview"
        digest_id = _send_digest(factory, settings, clock, preview_dir)
        alert_id = _send_alert(factory, settings, clock)
        sent = deliver_all(factory=factory, settings=settings, clock=clock)
    finally:
        controller.stop()
    with unit_of_work(factory) as session:
        counts = {
            "items ingested": _count(session, Item),
            "campaigns": _count(session, Campaign),
            "recipients (deliveries)": _count(session, Delivery),
            "messages sent": sent.sent,
            "messages accepted by the SMTP server": handler.count,
        }
    say(f"digest = campaign {digest_id}, alert = campaign {alert_id}")
    return DemoSummary(
        counts=counts,
        paths={
            "preview HTML": preview_dir / f"digest.{settings.render.default_language}.html",
            "Maildir": maildir,
            "database": directory / "newsletter.db",
            "config, for `newsletter --config FILE web`": write_config(directory, settings),
        },
    )


def write_config(directory: Path, settings: Settings) -> Path:
    """The demo's database and secret as a config file, so its links work with `web`."""
    path = directory / "config.toml"
    path.write_text(
        "# Written by `newsletter demo`: its database and the secret that signed its links.\n"
        f'[database]\nurl = "{settings.database.url}"\n'
        f'[security]\nsecret = "{settings.security.secret}"\n',
        encoding="utf-8",
    )
    path.chmod(0o600)
    return path


def _send_digest(
    factory: sessionmaker[Session], settings: Settings, clock: Clock, preview_dir: Path
) -> int:
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session,
            list_slug=settings.digest.list,
            now=clock.now(),
            actor=ACTOR,
            settings=settings,
        )
        if campaign is None:
            raise CampaignError(
                f"the sample feed {SAMPLE_FEED} gave no items: reinstall the package"
            )
        ml = campaign.mailing_list
        write_previews(
            variants=render_campaign(campaign, settings=settings),
            out_dir=preview_dir,
            stem="digest",
            mlist=ListInfo(ml.id, ml.slug, ml.list_id),
            settings=settings,
            now=clock.now(),
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor=ACTOR
        )
        return campaign.id


def _send_alert(factory: sessionmaker[Session], settings: Settings, clock: Clock) -> int:
    with unit_of_work(factory) as session:
        urgent = session.scalars(select(Item).where(Item.urgent.is_(True))).first()
        if urgent is None:
            raise CampaignError(
                f"the sample feed {SAMPLE_FEED} has no urgent item: reinstall the package"
            )
        campaign, _ = assemble_alert(
            session=session,
            list_slug=settings.alerts.list,
            now=clock.now(),
            actor=ACTOR,
            item=urgent,
        )
        launch_campaign(
            session=session, campaign=campaign, settings=settings, now=clock.now(), actor=ACTOR
        )
        return campaign.id


def _count(session: Session, model: type) -> int:
    return int(session.scalar(select(func.count()).select_from(model)) or 0)
