"""A reader's signed links go only where the templates put them, whatever a feed or staff writes.

Feed items and staff alerts carry the link markers in every form an attacker might try (literal,
entities, percent-encoding, case, look-alikes, nested, split across fields, inside links and the
text part); they are ingested from a real HTTP server, rendered, checked and sent to aiosmtpd,
and every message that arrives carries each signed token only in its own footer link, its own
text line and the List-Unsubscribe header. The check refuses a variant whose markers are out of
place, and the sender never fills them in, for variants stored by an older version too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from lxml import html as lxml_html
from sqlalchemy import select
from sqlalchemy import text as sa_text
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.check import check_campaign, check_variant, require_clean
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import MIGRATIONS, make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import (
    Campaign,
    Delivery,
    DeliveryStatus,
    MailingList,
    Subscriber,
    Subscription,
    Variant,
)
from newsletter.enqueue import launch_campaign
from newsletter.errors import PermanentDeliveryError
from newsletter.ingest import ingest_all
from newsletter.lists import read_lists, sync_lists
from newsletter.message import ListInfo, MessageTemplate, Recipient, link_urls
from newsletter.render import (
    PREFERENCES_URL,
    UNSUBSCRIBE_URL,
    CampaignView,
    ItemView,
    RenderedVariant,
    render_variant,
)
from newsletter.send import deliver_all
from newsletter.variants import store_variants
from tests.conftest import SECRET, FeedHttp, SmtpServer, make_settings, rss

ROOT = Path(__file__).resolve().parents[1]

U, P = UNSUBSCRIBE_URL, PREFERENCES_URL
EVIL = "https://evil.example/"
# Every form of the markers a feed might use to make the sender fill in a reader's links.
FORMS = [
    U,
    P,
    U.lower(),
    "%%Unsubscribe_Url%%",
    "&#37;&#37;UNSUBSCRIBE_URL&#37;&#37;",
    "&#x25;&#x25;PREFERENCES_URL&#x25;&#x25;",
    "%25%25UNSUBSCRIBE_URL%25%25",
    "%%UNSUB%%UNSUBSCRIBE_URL%%SCRIBE_URL%%",  # what a one-pass strip leaves is a marker again
    "%%PREF%%PREFERENCES_URL%%ERENCES_URL%%",
    "\uff05\uff05UNSUBSCRIBE_URL\uff05\uff05",  # fullwidth percent signs
    "%%UNSUBSCRIBE_URL_0123456789abcdef0123456789abcdef%%",  # a guess at this version's form
]


def hostile_items() -> list[dict[str, object]]:
    """Feed items with a marker form in the title, link, summary and categories."""
    items: list[dict[str, object]] = []
    for i, form in enumerate(FORMS):
        items.append(
            {
                "title": f"Win a prize {form}",
                "link": f"{EVIL}?t={form}&n={i}",
                "guid": f"hostile-{i}",
                "date": datetime(2026, 11, 22, 9, i, tzinfo=UTC),
                "categories": [form, f"News {i}"],
                "summary": (
                    f'<p>Claim it: <a href="{EVIL}?u={form}">here</a> or '
                    f'<a href="{form}">there</a> or <img src="{EVIL}p.gif?{form}" alt="{form}">. '
                    f"Unsubscribe: {form}\nsee {EVIL}?x={form}</p>"
                ),
            }
        )
    # Split across fields and joined by the templates: a title that ends a marker's first half,
    # a summary that starts with its second half.
    items.append(
        {
            "title": "Split %%UNSUBSCRIBE",
            "link": f"{EVIL}split",
            "guid": "hostile-split",
            "date": datetime(2026, 11, 22, 10, 0, tzinfo=UTC),
            "categories": ["%%UNSUBSCRIBE_", "URL%%"],
            "summary": "_URL%% and <a href='https://evil.example/?a=%%UNSUBSCRIBE'>_URL%%</a>",
        }
    )
    return items


def seed_readers(factory: sessionmaker[Session], now: datetime) -> None:
    """The declared lists, and one reader of each list in each language."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        lists = session.scalars(select(MailingList)).all()
        for lang in ("en", "be", "ru"):
            person = Subscriber(
                email=f"{lang}-reader@example.net", name="Reader", language=lang, created_at=now
            )
            session.add(person)
            session.flush()
            for ml in lists:
                session.add(
                    Subscription(
                        subscriber_id=person.id, list_id=ml.id, status="active", created_at=now
                    )
                )


def settings_for(database_url: str, smtpd: SmtpServer) -> Settings:
    """Test settings, with every link host allowed so only the link checks can refuse."""
    base = make_settings(database_url, smtpd)
    return dataclasses.replace(base, check=dataclasses.replace(base.check, allowed_link_hosts=()))


def links_of(
    factory: sessionmaker[Session], settings: Settings, msg: EmailMessage, list_slug: str
) -> dict[str, str]:
    """The signed links this message's reader should have, for the list it came from."""
    email = msg["X-Delivered-To"] or msg["To"].addresses[0].addr_spec
    with factory() as session:
        person = session.scalars(select(Subscriber).where(Subscriber.email == str(email))).one()
        ml = session.scalars(select(MailingList).where(MailingList.slug == list_slug)).one()
        recipient = Recipient(person.id, person.email, person.name)
        return link_urls(
            recipient=recipient, mlist=ListInfo(ml.id, ml.slug, ml.list_id), settings=settings
        )


def assert_links_only_in_place(msg: EmailMessage, urls: dict[str, str]) -> None:
    """Each signed token: once in its footer link, once in its own text line, nowhere else."""
    html_part, text_part = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    page, text = html_part.get_content(), text_part.get_content()
    tree = lxml_html.document_fromstring(page)
    headers = "\n".join(f"{k}: {v}" for k, v in msg.items())
    for key in ("unsubscribe", "preferences"):
        url, token = urls[key], urls[key].rpartition("/")[2]
        hrefs = [a.get("href") for a in tree.iter("a") if token in (a.get("href") or "")]
        assert hrefs == [url], (key, hrefs)
        assert page.count(token) == 1, key
        assert text.count(token) == 1 and url in text.split(), key
        assert next(line for line in text.splitlines() if token in line).endswith(url)
        for element in tree.iter():
            for value in element.attrib.values() if isinstance(element.tag, str) else ():
                assert token not in value or value == url, value  # never in the feed's URLs
        in_headers = 2 if key == "unsubscribe" else 0  # https link, and the mailto's subject
        assert headers.count(token) == in_headers, key
    assert f"<{urls['unsubscribe']}>" in str(msg["List-Unsubscribe"])


def ingest_hostile_feed(factory: sessionmaker[Session], feed_http: FeedHttp, now: datetime) -> None:
    """The hostile feed, served over HTTP and ingested as an English source."""
    feed_http.documents["/feed.xml"] = rss(hostile_items())
    [report] = ingest_all(
        factory=factory,
        sources=[(f"{feed_http.base}/feed.xml", "hostile", "en")],
        settings=Settings().sources,
        clock=FrozenClock(now),
    )
    assert report.error is None and report.new == len(hostile_items())


def test_markers_smuggled_by_a_feed_never_receive_a_readers_links(
    factory: sessionmaker[Session],
    feed_http: FeedHttp,
    smtpd: SmtpServer,
    clock: FrozenClock,
    database_url: str,
) -> None:
    """Ingest → digest → check → send: tokens only in their own places, never in the feed's URLs."""
    settings = settings_for(database_url, smtpd)
    now = clock.now()
    seed_readers(factory, now)
    ingest_hostile_feed(factory, feed_http, now)
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=now, actor="test"
        )
        assert campaign is not None
        assert require_clean(session, campaign, settings, force=False, actor="t", now=now) == []
        launch_campaign(session=session, campaign=campaign, settings=settings, now=now, actor="t")
    report = deliver_all(factory=factory, settings=settings, clock=clock)
    messages = smtpd.messages()
    assert report.sent == len(messages) == 3
    for msg in messages:
        assert_links_only_in_place(msg, links_of(factory, settings, msg, "weekly-digest"))
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert "Win a prize %%UNSUBSCRIBE_URL%%" in text  # inert: shown, never filled in


@pytest.mark.parametrize(
    ("title", "body_html", "url"),
    [
        pytest.param(f"Act now {U}", f"<p>Write: {U} {P}</p>", f"{EVIL}?t={U}", id="literal"),
        pytest.param(
            "Act &#37;&#37;UNSUBSCRIBE_URL&#37;&#37;",
            f'<p><a href="{EVIL}?t=&#37;&#37;PREFERENCES_URL&#37;&#37;">sign</a></p>',
            f"{EVIL}?t=%%UNSUB%%UNSUBSCRIBE_URL%%SCRIBE_URL%%",
            id="entities-and-nested",
        ),
        pytest.param(
            "Act %%UNSUBSCRIBE",
            f'<p>_URL%% <a href="{U}">unsubscribe here</a> <a href="{EVIL}?{P}">p</a></p>',
            f"{EVIL}?p=%%pReFeReNcEs_UrL%%",
            id="split-case-and-own-link",
        ),
    ],
)
def test_markers_in_a_staff_alert_never_receive_a_readers_links(
    factory: sessionmaker[Session],
    smtpd: SmtpServer,
    clock: FrozenClock,
    database_url: str,
    title: str,
    body_html: str,
    url: str,
) -> None:
    """An alert written by staff (or pasted from elsewhere) with markers: they stay inert text."""
    settings = settings_for(database_url, smtpd)
    now = clock.now()
    seed_readers(factory, now)
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=now,
            actor="staff",
            title=title,
            body_html=body_html,
            url=url,
        )
        assert require_clean(session, campaign, settings, force=False, actor="t", now=now) == []
        launch_campaign(session=session, campaign=campaign, settings=settings, now=now, actor="t")
    deliver_all(factory=factory, settings=settings, clock=clock)
    messages = smtpd.messages()
    assert len(messages) == 3
    for msg in messages:
        assert_links_only_in_place(msg, links_of(factory, settings, msg, "urgent-actions"))


# --- the check, and variants stored by an older version --------------------------------------

MLIST = ListInfo(1, "weekly-digest", "weekly-digest.portal.example.org")
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def check_settings() -> Settings:
    """Defaults with a secret and an https base URL."""
    base = Settings()
    return dataclasses.replace(
        base,
        web=dataclasses.replace(base.web, base_url="https://news.portal.example.org"),
        security=dataclasses.replace(base.security, secret=SECRET),
    )


def rendered() -> RenderedVariant:
    """An ordinary digest, as rendered now."""
    item = ItemView(
        title="Ales Bialiatski meets the EU commissioner",
        link="https://portal.example.org/2014/07/meeting/",
        summary_html="<p>Met in Strasbourg.</p>",
        published_at=datetime(2014, 7, 2, tzinfo=UTC),
        categories=("Viasna",),
    )
    view = CampaignView(kind="digest", list_name="Weekly", items=(item,))
    return render_variant(view, lang="en", settings=check_settings())


def old_variant(extra_html: str = "", extra_text: str = "") -> RenderedVariant:
    """A variant as an older version stored it: the fixed markers, each in its own place."""
    page = (
        f"<html><body><p>News.</p>{extra_html}"
        f'<p class="fine links"><a href="{U}">Unsubscribe</a> <a href="{P}">Settings</a></p>'
        "</body></html>"
    )
    text = f"News.\n{extra_text}\nUnsubscribe: {U}\nSubscription settings: {P}\n"
    return RenderedVariant("en", "Weekly", page, text)


def marker(variant: RenderedVariant, key: str) -> str:
    """The variant's marker for one link (the fixed ones for an old variant)."""
    if not hasattr(variant, "markers"):  # the version before markers had a nonce
        return U if key == "unsubscribe" else P
    return str(variant.markers[key])


Change = Callable[[RenderedVariant], RenderedVariant]


def with_html(extra: str) -> Change:
    """A change adding HTML before the closing </body> tag ({u}, {p}: the variant's markers)."""

    def change(v: RenderedVariant) -> RenderedVariant:
        u, p = marker(v, "unsubscribe"), marker(v, "preferences")
        added = extra.format(u=u, p=p)
        return dataclasses.replace(v, html=v.html.replace("</body>", added + "</body>", 1))

    return change


def with_text(extra: str) -> Change:
    """A change adding a line to the text part, given the variant's markers."""

    def change(v: RenderedVariant) -> RenderedVariant:
        u, p = marker(v, "unsubscribe"), marker(v, "preferences")
        return dataclasses.replace(v, text=v.text + extra.format(u=u, p=p) + "\n")

    return change


def moved(part: str, key: str, into: str) -> Change:
    """A change moving the template's own marker of one link into `into` ({m}: the marker)."""

    def change(v: RenderedVariant) -> RenderedVariant:
        m = marker(v, key)
        return dataclasses.replace(v, **{part: getattr(v, part).replace(m, into.format(m=m))})

    return change


EVIL_QUERY = "https://evil.example/?t={m}"
OURS = "https://news.portal.example.org"
MISPLACED = [
    pytest.param(with_html(f'<a href="{EVIL}?t={{u}}">win</a>'), "HTML", True, id="in-a-query"),
    pytest.param(with_html('<a href="{u}">win a prize</a>'), "HTML", True, id="a-second-link"),
    pytest.param(with_html(f'<img src="{EVIL}{{p}}" alt="">'), "HTML", True, id="in-img-src"),
    pytest.param(with_html('<p title="{p}">hover</p>'), "HTML", True, id="in-other-attribute"),
    pytest.param(with_html("<p>{u}</p>"), "HTML", True, id="in-html-text"),
    pytest.param(with_html("<!-- {u} -->"), "HTML", True, id="in-a-comment"),
    pytest.param(moved("html", "unsubscribe", EVIL_QUERY), "HTML", True, id="own-moved-to-query"),
    pytest.param(with_text(f"Win: {EVIL}?x={{u}}"), "text", True, id="text-in-a-query"),
    pytest.param(with_text("Again: {p}"), "text", True, id="text-twice"),
    pytest.param(moved("text", "preferences", EVIL_QUERY), "text", True, id="text-own-moved"),
    pytest.param(moved("text", "preferences", ""), "text", False, id="text-missing"),
    pytest.param(moved("html", "preferences", ""), "HTML", False, id="html-missing"),
    # Someone's own link, pasted into an alert: it would act for them, whoever clicks it.
    pytest.param(
        with_html(f'<a href="{OURS}/u/WzEsMV0.pasted">stop</a>'), "HTML", False, id="pasted"
    ),
    pytest.param(
        with_text(f"See {OURS}/preferences/WzEsMV0.pasted"), "text", False, id="pasted-text"
    ),
]


@pytest.mark.parametrize(("change", "part", "sender_refuses"), MISPLACED)
@pytest.mark.parametrize("make", [rendered, old_variant], ids=["rendered", "old-markers"])
def test_a_marker_out_of_place_is_refused(
    change: Change, part: str, sender_refuses: bool, make: Callable[[], RenderedVariant]
) -> None:
    """The check refuses a marker extra, elsewhere or missing in one line; the sender too, but a
    missing one (which can send no link astray)."""
    variant = change(make())
    found = check_variant(variant, mlist=MLIST, settings=check_settings(), now=NOW)
    lines = [str(p) for p in found if p.code == "links"]
    assert lines and all(line.startswith(f"en {part}") for line in lines), found
    assert all("\n" not in str(p) for p in found)
    settings = check_settings()
    if sender_refuses:
        with pytest.raises(PermanentDeliveryError, match="links would go astray"):
            MessageTemplate.build(variant=variant, campaign_id=1, mlist=MLIST, settings=settings)


@pytest.mark.parametrize("make", [rendered, old_variant], ids=["rendered", "old-markers"])
def test_check_passes_markers_in_their_own_places(make: Callable[[], RenderedVariant]) -> None:
    """The same variants, untouched, pass: old variants' markers in place still send."""
    variant = make()
    assert check_variant(variant, mlist=MLIST, settings=check_settings(), now=NOW) == []


def store_old_campaign(
    factory: sessionmaker[Session], now: datetime, *, started: bool, variant: RenderedVariant
) -> int:
    """A digest campaign whose variants an older version stored (no nonce), its deliveries."""
    with unit_of_work(factory) as session:
        ml = session.scalars(select(MailingList).where(MailingList.slug == "weekly-digest")).one()
        campaign = Campaign(
            kind="digest",
            list_id=ml.id,
            dedupe_key="old",
            created_at=now,
            status="running" if started else "draft",
            started_at=now if started else None,
        )
        session.add(campaign)
        session.flush()
        for lang in ("en", "be", "ru"):
            session.add(
                Variant(
                    campaign_id=campaign.id,
                    lang=lang,
                    subject=variant.subject,
                    html=variant.html,
                    text=variant.text,
                )
            )
        if started:
            from newsletter.audience import enqueue_audience

            enqueue_audience(session, campaign=campaign, now=now)
        return campaign.id


def test_old_variant_with_its_markers_in_place_still_sends(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """A running campaign stored by the older version sends, links in their own places."""
    settings = settings_for(database_url, smtpd)
    seed_readers(factory, clock.now())
    store_old_campaign(factory, clock.now(), started=True, variant=old_variant())
    report = deliver_all(factory=factory, settings=settings, clock=clock)
    assert report.sent == 3
    for msg in smtpd.messages():
        assert_links_only_in_place(msg, links_of(factory, settings, msg, "weekly-digest"))


def test_old_variant_with_a_smuggled_marker_is_never_filled_in(
    factory: sessionmaker[Session], smtpd: SmtpServer, clock: FrozenClock, database_url: str
) -> None:
    """A running old campaign whose feed smuggled a marker in: refused, nothing sent, one line."""
    settings = settings_for(database_url, smtpd)
    seed_readers(factory, clock.now())
    smuggled = old_variant(f'<a href="{EVIL}?t={U}">win</a>', f"Win: {EVIL}?t={P}")
    cid = store_old_campaign(factory, clock.now(), started=True, variant=smuggled)
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, cid)
        assert campaign is not None
        lines = [str(p) for p in check_campaign(session, campaign, settings)]
    assert any("unsubscribe link" in line for line in lines), lines
    deliver_all(factory=factory, settings=settings, clock=clock)
    assert smtpd.messages() == []
    with factory() as session:
        rows = session.scalars(select(Delivery).where(Delivery.campaign_id == cid)).all()
    assert {r.status for r in rows} == {DeliveryStatus.FAILED}
    for row in rows:
        reply = row.last_reply or ""
        assert "links would go astray" in reply and "\n" not in reply
        assert "@" not in reply  # no subscriber data in the reason


def test_old_draft_is_rendered_again_by_the_check(
    factory: sessionmaker[Session], feed_http: FeedHttp, clock: FrozenClock, database_url: str
) -> None:
    """A campaign not started, stored by the older version, is re-rendered with fresh markers."""
    now = clock.now()
    seed_readers(factory, now)
    ingest_hostile_feed(factory, feed_http, now)
    smuggled = old_variant(f'<a href="{EVIL}stored?t={U}">win</a>')
    settings = make_settings(database_url)
    settings = dataclasses.replace(
        settings, check=dataclasses.replace(settings.check, allowed_link_hosts=())
    )
    with unit_of_work(factory) as session:
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=now, actor="test"
        )
        assert campaign is not None
        for lang in ("en", "be", "ru"):
            session.add(
                Variant(
                    campaign_id=campaign.id,
                    lang=lang,
                    subject=smuggled.subject,
                    html=smuggled.html,
                    text=smuggled.text,
                )
            )
        session.flush()
        assert check_campaign(session, campaign, settings) == []
        stored = session.scalars(select(Variant).where(Variant.campaign_id == campaign.id)).all()
        assert len(stored) == 3 and all(len(v.link_nonce) == 32 for v in stored)
        assert all(f"{EVIL}stored" not in v.html for v in stored)


def test_a_feed_title_that_looks_encoded_adds_no_header(
    factory: sessionmaker[Session],
    feed_http: FeedHttp,
    smtpd: SmtpServer,
    clock: FrozenClock,
    database_url: str,
) -> None:
    """An alert on an item titled like an encoded-word: the subject decodes to it, no new header."""
    settings = settings_for(database_url, smtpd)
    now = clock.now()
    seed_readers(factory, now)
    title = "Free them =?utf-8?q?=0D=0ABcc:_victim@example.org=0D=0AX-Evil:_1?="
    item = {"title": title, "link": f"{EVIL}a", "guid": "a", "date": now, "summary": "<p>x</p>"}
    feed_http.documents["/feed.xml"] = rss([item])
    ingest_all(
        factory=factory,
        sources=[(f"{feed_http.base}/feed.xml", "hostile", "en")],
        settings=Settings().sources,
        clock=clock,
    )
    with unit_of_work(factory) as session:
        campaign, _ = assemble_alert(
            session=session, list_slug="urgent-actions", now=now, actor="t", item_ref=f"{EVIL}a"
        )
        launch_campaign(session=session, campaign=campaign, settings=settings, now=now, actor="t")
    deliver_all(factory=factory, settings=settings, clock=clock)
    messages = smtpd.messages()
    assert len(messages) == 3
    for msg in messages:
        assert "Bcc" not in msg and "X-Evil" not in msg
        assert title in str(msg["Subject"]) and "\n" not in str(msg["Subject"])


def test_downgrade_gives_the_older_version_its_markers_and_nothing_more(database_url: str) -> None:
    """Migrating down to 0002 turns a render's markers into the fixed ones, feed lookalikes not."""
    from newsletter.render import misplaced_links  # (imported here: the base commit lacks it)

    engine = make_engine(database_url)
    migrate(engine)
    variant = with_text("Win: %%%UNSUBSCRIBE_URL%%%")(with_html(f"<p>{U} {P}</p>")(rendered()))
    with unit_of_work(make_sessionmaker(engine)) as session:
        ml = MailingList(slug="l", name="L", kind="digest", list_id="l.example.org")
        session.add(ml)
        session.flush()
        campaign = Campaign(kind="digest", list_id=ml.id, dedupe_key="k", created_at=NOW)
        session.add(campaign)
        session.flush()
        store_variants(session, campaign, [variant])
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
    with engine.connect() as connection:
        html, text = connection.execute(sa_text("select html, text from variants")).one()
    engine.dispose()
    old = RenderedVariant("en", variant.subject, html, text)  # what the older version reads
    assert misplaced_links(old, expect_all=True) == []  # each once, in the footer, as rendered
    assert "Win: %%%UNSUBSCRIBE-URL%%%" in text
