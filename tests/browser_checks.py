"""What every page test checks in the browser: its element shown, no sideways scrolling at
phone width, and no WCAG 2.1 A/AA violation found by axe-core."""

from __future__ import annotations

from typing import Any

from axe_playwright_python.sync_playwright import Axe

WCAG_AA = {"runOnly": {"type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]}}
PHONE = {"width": 375, "height": 740}


def check_page(page: Any, selector: str, label: str, width: int = PHONE["width"]) -> None:
    """The page, loaded: `selector` shown, nothing wider than `width`, no axe violation."""
    page.wait_for_load_state()
    assert page.locator(selector).first.is_visible(), f"{label}: {selector} not shown"
    wide = page.evaluate("document.documentElement.scrollWidth")
    assert wide <= width, f"{label}: {wide}px wide"
    violations = Axe().run(page, options=WCAG_AA).response["violations"]
    assert violations == [], [(v["id"], v["help"]) for v in violations]
