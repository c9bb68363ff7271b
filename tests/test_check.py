"""The check before every send: each refusal is one line saying what and where."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from newsletter.assemble import assemble_alert, assemble_digest
from newsletter.check import (
    CheckError,
    Problem,
    check_campaign,
    check_message,
    check_variant,
    require_clean,
)
from newsletter.clock import FrozenClock
from newsletter.config import Settings
from newsletter.db import unit_of_work
from newsletter.db.models import Campaign, Event, Item, Source
from newsletter.lists import read_lists, sync_lists
from newsletter.message import ListInfo, Recipient, build_message, link_urls
from newsletter.render import (
    CampaignView,
    ItemView,
    RenderedVariant,
    render_variant,
)
from tests.conftest import SECRET, make_settings
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]
MLIST = ListInfo(1, "weekly-digest", "weekly-digest.portal.example.org")
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)
LONG_SUMMARY = (
    "<p>" + "Ales Bialiatski, head of the Human Rights Centre “Viasna”, spoke about the 1,000 days "
    "he spent in prison and about the political prisoners still behind bars in Belarus. "
    * 12
    + "</p>"
)


def settings(**check: object) -> Settings:
    """Defaults with a secret, an https base URL and the given [check] values."""
    base = Settings()
    return dataclasses.replace(
        base,
        web=dataclasses.replace(base.web, base_url="https://news.portal.example.org"),
        security=dataclasses.replace(base.security, secret=SECRET),
        check=dataclasses.replace(base.check, **check),  # type: ignore[arg-type]
    )


def item(i: int, **changes: object) -> ItemView:
    """A portal item with https links."""
    view = ItemView(
        title=f"Ales Bialiatski meets the EU commissioner, part {i}",
        link=f"https://portal.example.org/2014/07/meeting-{i}/",
        summary_html='<p>Met in Strasbourg. <a href="https://www.fidh.org/en/">FIDH</a></p>',
        published_at=datetime(2014, 7, 2, tzinfo=UTC) - timedelta(hours=i),
        categories=("Viasna",),
    )
    return dataclasses.replace(view, **changes)  # type: ignore[arg-type]


def digest(*items: ItemView) -> CampaignView:
    """A digest of these items (or of three ordinary ones)."""
    return CampaignView(
        kind="digest", list_name="Weekly", items=items or tuple(item(i) for i in range(3))
    )


def rendered(lang: str = "en", view: CampaignView | None = None) -> RenderedVariant:
    """A variant as render.py makes it, with the URL markers in."""
    return render_variant(view or digest(), lang=lang, settings=settings())


def problems_of(variant: RenderedVariant, config: Settings | None = None) -> list[str]:
    """The check's lines for one variant."""
    found = check_variant(variant, mlist=MLIST, settings=config or settings(), now=NOW)
    return [str(p) for p in found]


def test_ordinary_digest_and_alert_pass() -> None:
    """A digest and an alert as rendered, in every language, have no problem."""
    alert = CampaignView(kind="alert", list_name="Alerts", items=(item(0),))
    for lang in ("en", "be", "ru"):
        assert problems_of(rendered(lang)) == []
        assert problems_of(rendered(lang, alert)) == []


def edit_html(old: str, new: str) -> Callable[[RenderedVariant], RenderedVariant]:
    """A change to a rendered variant's HTML (which must contain `old`)."""

    def change(v: RenderedVariant) -> RenderedVariant:
        assert old in v.html
        return dataclasses.replace(v, html=v.html.replace(old, new, 1))

    return change


def edit(**changes: str) -> Callable[[RenderedVariant], RenderedVariant]:
    """A rendered variant with some fields replaced."""
    return lambda v: dataclasses.replace(v, **changes)


def pad_html(kb: int) -> Callable[[RenderedVariant], RenderedVariant]:
    """A rendered variant with `kb` KB of text added to its HTML."""
    return edit_html("</body>", f"<p>{'x' * kb * 1024}</p></body>")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(pad_html(101), "en HTML: 1", id="html-over-100-kb"),
        pytest.param(
            lambda v: edit_html(
                f'href="{v.markers["unsubscribe"]}"', 'href="https://portal.example.org/"'
            )(v),
            "en HTML: no link to the unsubscribe page",
            id="no-unsubscribe-in-html",
        ),
        pytest.param(
            lambda v: dataclasses.replace(v, text=v.text.replace(v.markers["unsubscribe"], "")),
            "en text: no unsubscribe link",
            id="no-unsubscribe-in-text",
        ),
        pytest.param(edit(subject=""), "en subject: empty", id="empty-subject"),
        pytest.param(edit(subject="x" * 151), "en subject: 151 characters, over 150", id="long"),
        pytest.param(
            edit(subject="Free them\nBcc: x@example.org"),
            "en subject: contains a line break",
            id="subject-newline",
        ),
        pytest.param(
            edit(subject="Free them\u2028now"),
            "en subject: contains a line break",
            id="subject-unicode-line-separator",
        ),
        pytest.param(
            edit_html("</h3>", "<script>alert(1)</script></h3>"),
            "en HTML, item «Ales Bialiatski meets the EU commissioner, part 0»: a <script> element",
            id="script",
        ),
        pytest.param(
            edit_html("<h3", '<h3 onmouseover="steal()"'),
            "an event handler <h3 onmouseover=...>",
            id="event-handler",
        ),
        pytest.param(
            edit_html(
                'href="https://www.fidh.org/en/"', 'href=" Java\tScript:alert(document.domain)"'
            ),
            "a javascript: URL in <a href>",
            id="javascript-url",
        ),
        pytest.param(
            edit_html('href="https://www.fidh.org/en/"', 'href="http://www.fidh.org/en/"'),
            "en HTML, item «Ales Bialiatski meets the EU commissioner, part 0»: "
            "not https: http://www.fidh.org/en/",
            id="http-link",
        ),
        pytest.param(
            edit_html("</body>", '<img src="https://tracker.example/p.gif" alt=""></body>'),
            "en HTML, body: host tracker.example is not in [check] allowed_link_hosts",
            id="remote-image-host",
        ),
        pytest.param(
            edit_html('href="https://www.fidh.org/en/"', 'href="ftp://files.example/x"'),
            "not a web link: ftp://files.example/x",
            id="ftp-link",
        ),
    ],
)
def test_each_problem_is_one_line_saying_what_and_where(
    change: Callable[[RenderedVariant], RenderedVariant], expected: str
) -> None:
    """A broken variant gets a line naming the language, the part (and item) and the fault."""
    config = settings(allowed_link_hosts=("portal.example.org", ".fidh.org", ".example.org"))
    lines = problems_of(change(rendered("en")), config)
    assert any(expected in line for line in lines), lines
    assert all("\n" not in line for line in lines)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("List-Unsubscribe", "List-Unsubscribe has no https link", id="unsubscribe"),
        pytest.param(
            "List-Unsubscribe-Post",
            "List-Unsubscribe-Post is not List-Unsubscribe=One-Click",
            id="one-click",
        ),
        pytest.param("List-Id", "no List-Id", id="list-id"),
    ],
)
def test_missing_list_headers_are_refused(header: str, expected: str) -> None:
    """A message without one of the List-* headers fails with the header named."""
    recipient = Recipient(1, "reader@example.org", "Reader")
    config = settings()
    message = build_message(
        variant=rendered(),
        campaign_id=1,
        recipient=recipient,
        mlist=MLIST,
        settings=config,
        now=NOW,
    )
    del message[header]
    url = link_urls(recipient=recipient, mlist=MLIST, settings=config)["unsubscribe"]
    found = check_message(message, lang="en", subject="Hi", unsubscribe_url=url, settings=config)
    assert [str(p) for p in found] == [f"en headers: {expected}"]


@pytest.mark.parametrize(
    ("allowed", "link", "refused"),
    [
        pytest.param((), "https://anything.example/x", False, id="empty-list-allows-all"),
        pytest.param(("portal.example.org",), "https://portal.example.org/x", False, id="exact"),
        pytest.param(("portal.example.org",), "https://evil.example/x", True, id="other-host"),
        pytest.param((".example.org",), "https://news.example.org/x", False, id="subdomain"),
        pytest.param(("portal.example.org",), "https://xportal.example.org/", True, id="suffix"),
    ],
)
def test_link_hosts_follow_the_allow_list(
    allowed: tuple[str, ...], link: str, refused: bool
) -> None:
    """Links must point at an allowed host; the service's own pages are always allowed."""
    view = digest(item(0, link=link, summary_html="<p>Short.</p>"))
    config = settings(allowed_link_hosts=allowed)
    lines = problems_of(render_variant(view, lang="en", settings=config), config)
    assert any("allowed_link_hosts" in line for line in lines) is refused, lines


@pytest.mark.parametrize(
    ("require_https", "base_url", "refused"),
    [
        pytest.param(True, "http://news.example.org", True, id="http-base-url-refused"),
        pytest.param(True, "http://127.0.0.1:8000", False, id="loopback-for-trying-out"),
        pytest.param(False, "http://news.example.org", False, id="https-not-required"),
    ],
)
def test_http_links_follow_require_https(require_https: bool, base_url: str, refused: bool) -> None:
    """An http link (here the unsubscribe page) is refused when https is required."""
    config = dataclasses.replace(
        settings(require_https=require_https),
        web=dataclasses.replace(Settings().web, base_url=base_url),
    )
    lines = problems_of(rendered(), config)
    assert any("not https" in line for line in lines) is refused, lines


def test_markers_never_reach_the_reader() -> None:
    """The check looks at the personalised message: no marker is left for readers to see."""
    config = settings()
    message = build_message(
        variant=rendered(),
        campaign_id=1,
        recipient=Recipient(1, "r@example.org", ""),
        mlist=MLIST,
        settings=config,
        now=NOW,
    )
    raw = message.as_string()
    assert "%%UNSUBSCRIBE_URL" not in raw and "%%PREFERENCES_URL" not in raw


@pytest.mark.parametrize("lang", ["en", "be", "ru"])
def test_forty_long_items_fit_under_the_limit_by_shortening(lang: str) -> None:
    """A made-up digest of 40 long items still passes: summaries shrink to fit under 100 KB."""
    view = digest(*(item(i, summary_html=LONG_SUMMARY) for i in range(40)))
    variant = rendered(lang, view)
    assert problems_of(variant) == []
    assert len(variant.html.encode()) <= 100 * 1024
    for i in range(40):
        assert (
            f"part {i}</a>" in variant.html
            and f"https://portal.example.org/2014/07/meeting-{i}/" in variant.text
        )


def test_digest_too_big_even_as_titles_names_the_limit() -> None:
    """When even titles alone do not fit, the check says which limit it hit and by how much."""
    view = digest(*(item(i, title="Bialiatski " * 40) for i in range(150)))
    lines = problems_of(rendered("en", view))
    assert len(lines) == 1
    assert lines[0].startswith("en HTML: ") and "over the 100 KB limit" in lines[0]


def test_same_problem_in_every_language_is_one_line() -> None:
    """A fault of the content itself is reported once, naming every language."""
    view = digest(item(0, link="http://portal.example.org/x"))
    config = settings()
    found: list[Problem] = []
    for lang in ("en", "be", "ru"):
        variant = render_variant(view, lang=lang, settings=config)
        found += check_variant(variant, mlist=MLIST, settings=config, now=NOW)
    from newsletter.check import merge_languages

    lines = [str(p) for p in merge_languages(found)]
    assert lines == [
        "en, be, ru HTML, item «Ales Bialiatski meets the EU commissioner, part 0»: "
        "not https: http://portal.example.org/x"
    ]


# --- with a database: campaigns, events, the CLI ---------------------------------------------


def add_items(session: Session, links: list[str], now: datetime, lang: str = "en") -> None:
    """Ingested-looking items from one source."""
    source = session.scalar(select(Source).where(Source.lang == lang))
    if source is None:
        source = Source(url=f"https://portal.example.org/{lang}/feed/", name=lang, lang=lang)
        session.add(source)
        session.flush()
    for i, link in enumerate(links):
        session.add(
            Item(
                source_id=source.id,
                guid=link,
                link=link,
                title=f"Item {i} ({lang})",
                summary_html="<p>Summary.</p>",
                published_at=now - timedelta(hours=i),
                categories=["Viasna"],
                content_hash=str(i),
                ingested_at=now,
                updated_at=now,
            )
        )
    session.flush()


def new_digest(factory: sessionmaker[Session], clock: FrozenClock, links: list[str]) -> int:
    """A committed digest campaign of items with these links."""
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        add_items(session, links, clock.now())
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        return campaign.id


def test_require_clean_refuses_then_force_is_recorded_and_remembered(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """A refused campaign raises CheckError; --force records the problems; a later check passes."""
    config = make_settings(database_url)
    cid = new_digest(
        factory, clock, ["http://portal.example.org/a", "https://portal.example.org/b"]
    )
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, cid)
        assert campaign is not None
        with pytest.raises(CheckError) as info:
            require_clean(session, campaign, config, force=False, actor="test", now=clock.now())
    assert "not https: http://portal.example.org/a" in str(info.value)
    assert "\n" not in str(info.value)
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, cid)
        assert campaign is not None
        forced = require_clean(
            session, campaign, config, force=True, actor="staff", now=clock.now()
        )
        assert forced
    with unit_of_work(factory) as session:  # the scheduler, later, without --force
        campaign = session.get(Campaign, cid)
        assert campaign is not None
        assert require_clean(session, campaign, config, force=False, actor="s", now=clock.now())
        events = session.scalars(
            select(Event).where(Event.action == "campaign.check_forced").order_by(Event.id)
        ).all()
    assert [e.actor for e in events] == ["staff", "s"]
    assert events[0].detail["campaign"] == cid
    assert any("http://portal.example.org/a" in line for line in events[0].detail["problems"])


def test_check_stores_what_it_checked(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Checking a campaign not yet rendered stores its variants, so the send sends those."""
    config = make_settings(database_url)
    cid = new_digest(factory, clock, ["https://portal.example.org/a"])
    with unit_of_work(factory) as session:
        campaign = session.get(Campaign, cid)
        assert campaign is not None
        assert check_campaign(session, campaign, config) == []
        from newsletter.check import stored_variants

        assert sorted(v.lang for v in stored_variants(session, campaign)) == ["be", "en", "ru"]


def test_digest_gives_each_language_its_feed(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """be readers get the be feed's items, ru readers (no ru feed) the default language's."""
    config = make_settings(database_url)
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        add_items(session, ["https://portal.example.org/en/1"], clock.now(), lang="en")
        add_items(session, ["https://portal.example.org/be/1"], clock.now(), lang="be")
        campaign = assemble_digest(
            session=session, list_slug="weekly-digest", now=clock.now(), actor="test"
        )
        assert campaign is not None
        check_campaign(session, campaign, config)
        from newsletter.check import stored_variants

        texts = {v.lang: v.text for v in stored_variants(session, campaign)}
    assert "portal.example.org/be/1" in texts["be"] and "/en/1" not in texts["be"]
    assert "portal.example.org/en/1" in texts["en"] and "/be/1" not in texts["en"]
    assert "portal.example.org/en/1" in texts["ru"] and "на английском языке" in texts["ru"]


def test_alert_from_staff_text_with_http_link_is_refused(
    factory: sessionmaker[Session], clock: FrozenClock, database_url: str
) -> None:
    """Staff text linking over plain http is refused before anyone gets it."""
    config = make_settings(database_url)
    with unit_of_work(factory) as session:
        sync_lists(session=session, specs=read_lists(ROOT / "subscribers" / "lists.toml"))
        campaign, _ = assemble_alert(
            session=session,
            list_slug="urgent-actions",
            now=clock.now(),
            actor="test",
            title="Write today",
            body_html='<p>See <a href="http://example.net/letter">the letter</a>.</p>',
            url="https://portal.example.org/act",
        )
        lines = [str(p) for p in check_campaign(session, campaign, config)]
    assert lines == ["en, be, ru HTML, main text: not https: http://example.net/letter"]


def write_config(tmp_path: Path) -> dict[str, str]:
    """A config for CLI runs in tmp_path (no SMTP needed: sends are --queue-only)."""
    (tmp_path / "config.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "n.db"}"\n[security]\nsecret = "{SECRET}"\n'
    )
    return {}


def test_cli_check_and_digest_send_refuse_then_force(tmp_path: Path) -> None:
    """`check ID` lists problems and exits 1; `digest send` refuses; --force sends, recorded.
    Items with an http link are set aside, not refused: the mirror link of every message is."""
    feed = tmp_path / "feed.xml"
    sample = (ROOT / "newsletter" / "data" / "portal-feed.xml").read_text()
    feed.write_text(
        sample.replace("https://portal.example.org/2014/07/", "http://portal.example.org/2014/07/")
    )
    env = write_config(tmp_path)
    with (tmp_path / "config.toml").open("a") as config:
        config.write('[brand]\nmirror_url = "http://mirror.example.org/"\n')
    run(["init"], tmp_path, env)
    run(["ingest", str(feed)], tmp_path, env)
    refused = run(["digest", "send", "--queue-only"], tmp_path, env, ok=False)
    assert refused.returncode != 0
    assert "refused: en, be, ru HTML" in refused.stderr
    assert "not https: http://mirror.example.org/" in refused.stderr
    assert "http://portal.example.org/2014/07/" not in refused.stderr  # those items set aside
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    sent = run(["digest", "send", "--queue-only", "--force"], tmp_path, env)
    assert "overridden:" in sent.stderr and "campaign 1: digest of 8 items" in sent.stdout
    check = run(["check", "1"], tmp_path, env, ok=False)
    assert check.returncode == 1
    lines = [line for line in check.stderr.splitlines() if line.startswith("refused:")]
    assert lines and all("not https" in line for line in lines)
    forced = run(["check", "1", "--force"], tmp_path, env)
    assert "overridden (--force)" in forced.stdout


def test_cli_check_passes_clean_campaign(tmp_path: Path) -> None:
    """A clean campaign passes `newsletter check` with exit code 0."""
    env = write_config(tmp_path)
    run(["init"], tmp_path, env)
    run(["ingest", str(ROOT / "newsletter" / "data" / "portal-feed.xml")], tmp_path, env)
    run(["digest", "send", "--queue-only"], tmp_path, env)
    assert "campaign 1 passes the check" in run(["check", "1"], tmp_path, env).stdout
    missing = run(["check", "99"], tmp_path, env, ok=False)
    assert missing.returncode != 0 and "no campaign 99" in missing.stderr
