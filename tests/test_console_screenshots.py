"""The README's pictures of the console, made by the suite's browser at phone width.

The compose page, an alert's preview and a campaign's progress, 375 x 800 px, as small PNGs
(quantised to a palette by pngquant when it is installed). They go to the test's own folder, or
to NEWSLETTER_SCREENSHOTS=DIR when set (`NEWSLETTER_SCREENSHOTS=docs` remakes docs/console-*.png).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from newsletter.compose import DraftInput, LanguageText, create_draft
from newsletter.db import unit_of_work
from newsletter.db.models import Delivery, Subscriber, Subscription
from newsletter.enqueue import launch_campaign
from newsletter.lists import get_list
from tests.conftest import SmtpServer
from tests.test_console_pages_browser import World, serve_world, sign_in, submit

PHONE = {"width": 375, "height": 800}
MAX_BYTES = 150_000
PNG = b"\x89PNG\r\n\x1a\n"


def out_dir(tmp_path: Path) -> Path:
    """Where the pictures go: NEWSLETTER_SCREENSHOTS, else the test's own folder."""
    chosen = os.environ.get("NEWSLETTER_SCREENSHOTS")
    path = Path(chosen) if chosen else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def shrink(path: Path) -> None:
    """Quantise a PNG to a 64-colour palette with pngquant, when it is installed."""
    pngquant = shutil.which("pngquant")
    if pngquant:
        subprocess.run(
            [pngquant, "--force", "--skip-if-larger", "--strip", "--speed", "1",
             "--output", str(path), "64", "--", str(path)],
            check=False,
        )  # fmt: skip


def shoot(page: Any, path: Path, top: str) -> None:
    """The viewport with the element `top` scrolled to its top edge, as a small PNG."""
    page.locator(top).evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(100)
    page.screenshot(path=str(path), animations="disabled", caret="hide")
    shrink(path)


def busy_campaign(world: World, readers: int) -> int:
    """An alert launched to `readers` people, two thirds sent over the last ten minutes."""
    now = world.clock.now()
    with unit_of_work(world.factory) as session:
        alerts = get_list(session, "urgent-actions").id
        for i in range(readers):
            person = Subscriber(
                email=f"supporter{i}@example.net", language="enberu"[i % 3 * 2 :][:2],
                created_at=now,
            )  # fmt: skip
            session.add(person)
            session.flush()
            session.add(Subscription(subscriber_id=person.id, list_id=alerts, status="active",
                                     created_at=now))  # fmt: skip
    texts = {"en": LanguageText("Write to Maria before her hearing on Friday", "Please.")}
    with unit_of_work(world.factory) as session:
        campaign = create_draft(session, draft=DraftInput("urgent-actions", None, None, texts),
                                settings=world.site.settings, now=now, actor="t")  # fmt: skip
        launch_campaign(session=session, campaign=campaign, settings=world.site.settings,
                        now=now - timedelta(minutes=10), actor="t")  # fmt: skip
        ids = list(session.scalars(select(Delivery.id).where(Delivery.campaign_id == campaign.id)))
        sent = ids[: len(ids) * 2 // 3]
        for i, delivery_id in enumerate(sent):
            at = now - timedelta(seconds=600 * (len(sent) - i) // len(sent))
            session.execute(
                update(Delivery).where(Delivery.id == delivery_id).values(status="sent", sent_at=at)
            )
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids[-3:]))
            .values(status="failed", attempts=1, last_reply="550 5.1.1 <…>: mailbox unknown")
        )
        return campaign.id


def test_screenshots_of_compose_preview_and_progress(
    tmp_path: Path, smtpd: SmtpServer, browser: Any
) -> None:
    """Three phone-width PNGs, each a real picture of its page and under 150 KB."""
    folder = out_dir(tmp_path)
    with serve_world(tmp_path, smtpd, training=False) as world:
        campaign_id = busy_campaign(world, 1200)
        context = browser.new_context(viewport=PHONE, device_scale_factor=1)
        page = context.new_page()
        try:
            sign_in(world, page, "editor")
            page.goto(f"{world.url}/alerts/new")
            page.fill("#title_en", "Write to Maria before her hearing on Friday")
            page.fill("#body_en", "Her trial starts on **Friday**. A letter takes two minutes.")
            page.fill("#title_be", "Напішыце Марыі да суда ў пятніцу")
            page.select_option("#list", "urgent-actions")
            page.wait_for_function("document.querySelector('#recipients strong').textContent > 0")
            shoot(page, folder / "console-compose.png", "form.compose fieldset:nth-of-type(2)")

            page.fill("#body_be", "Суд пачынаецца ў **пятніцу**.")
            submit(page, "button[value=save]")
            page.frame_locator("iframe.frame-phone").locator("body").wait_for()
            shoot(page, folder / "console-preview.png", "#h-preview")

            page.goto(f"{world.url}/campaigns/{campaign_id}")
            shoot(page, folder / "console-progress.png", "body")
        finally:
            context.close()
    for name in ("console-compose.png", "console-preview.png", "console-progress.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG) and len(data) < MAX_BYTES, (name, len(data))
        size = (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
        assert size == (PHONE["width"], PHONE["height"]), (name, size)  # IHDR width, height
