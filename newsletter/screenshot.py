"""PNG screenshots of rendered emails with a headless Chromium (Debian's `chromium` package).

Only the chromium binary is needed: no Playwright, no browser download. Each picture takes two
runs. The first lays the email out in an iframe exactly `width` pixels wide and reads the page's
height and width (`--dump-dom`, which cannot make a window narrower than 500 px itself); the
second takes a window of that size (`--screenshot`). Dark pictures use `--force-dark-mode`, which
makes `prefers-color-scheme: dark` match, as a mail app in dark mode does.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from newsletter.errors import RenderError

WIDTHS = (375, 800)
SCHEMES = ("light", "dark")
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAX_HEIGHT_PX = 16_000
TIMEOUT_SECONDS = 60
# Linear: a literal, then digit runs each followed by a fixed non-digit character; the title is
# our harness's, searched in the browser's DOM dump.
_SIZE = re.compile(r"<title>size:(\d+)x(\d+)</title>")
_HARNESS = """<!DOCTYPE html><html><head><title>measuring</title></head>
<body style="margin:0"><iframe id="email" style="border:0;width:{width}px;height:100px"
srcdoc="{srcdoc}"></iframe><script>
addEventListener("load", () => {{
  const page = document.getElementById("email").contentDocument.documentElement;
  page.style.overflow = "hidden";  // no scrollbar: the layout gets the whole width
  document.title = "size:" + page.scrollWidth + "x" + page.scrollHeight;
}});
</script></body></html>"""


class ScreenshotError(RenderError):
    """Chromium is missing or could not take a screenshot."""


@dataclass(frozen=True)
class Screenshot:
    path: Path
    width: int
    scheme: str
    page_width: int
    page_height: int

    @property
    def overflows(self) -> bool:
        """True when the page is wider than the window: the reader would scroll sideways."""
        return self.page_width > self.width


def find_chromium(explicit: str | None = None) -> str:
    """The chromium executable to use, or a one-line ScreenshotError saying how to get one."""
    if explicit:
        if shutil.which(explicit) or os.access(explicit, os.X_OK):
            return shutil.which(explicit) or explicit
        raise ScreenshotError(f"chromium not found at {explicit!r}")
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise ScreenshotError(
        "screenshots need Chromium, which is not installed: apt-get install chromium "
        "(or pass --chromium PATH)"
    )


def take_screenshots(
    html_paths: Iterable[Path],
    *,
    chromium: str,
    widths: Sequence[int] = WIDTHS,
    schemes: Sequence[str] = SCHEMES,
) -> list[Screenshot]:
    """PNG screenshots of each HTML file at each width and colour scheme, beside the file."""
    jobs = [(path, w) for path in html_paths for w in widths]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = [
            pool.submit(_shoot_width, path, width, schemes, chromium) for path, width in jobs
        ]
        return [shot for future in futures for shot in future.result()]


def _shoot_width(
    html_path: Path, width: int, schemes: Sequence[str], chromium: str
) -> list[Screenshot]:
    # The layout is the same in both colour schemes: measure once per width.
    size = measure_page(html_path.read_text(encoding="utf-8"), width, chromium)
    return [
        screenshot_html(html_path, width=width, scheme=s, chromium=chromium, size=size)
        for s in schemes
    ]


def screenshot_html(
    html_path: Path,
    *,
    width: int,
    scheme: str,
    chromium: str,
    size: tuple[int, int] | None = None,
) -> Screenshot:
    """One full-page PNG of an HTML file: STEM.WIDTH.png, or STEM.WIDTH.dark.png."""
    if size is None:
        size = measure_page(html_path.read_text(encoding="utf-8"), width, chromium)
    page_width, height = size
    suffix = f".{width}.dark.png" if scheme == "dark" else f".{width}.png"
    out = html_path.with_name(html_path.stem + suffix)
    out.unlink(missing_ok=True)
    args = [
        f"--screenshot={out}",
        f"--window-size={width},{min(max(height, 1), MAX_HEIGHT_PX)}",
        "--hide-scrollbars",
    ]
    if scheme == "dark":
        args.append("--force-dark-mode")
    _run(chromium, [*args, html_path.resolve().as_uri()])
    if not out.is_file():
        raise ScreenshotError(f"chromium wrote no screenshot of {html_path}")
    return Screenshot(out, width, scheme, page_width, height)


def measure_page(page: str, width: int, chromium: str) -> tuple[int, int]:
    """(scroll width, scroll height) in px of an HTML page laid out `width` px wide."""
    harness = _HARNESS.format(width=width, srcdoc=html.escape(page, quote=True))
    with tempfile.TemporaryDirectory(prefix="newsletter-measure-") as tmp:
        path = Path(tmp) / "measure.html"
        path.write_text(harness, encoding="utf-8")
        dom = _run(chromium, ["--dump-dom", path.as_uri()])
    match = _SIZE.search(dom)
    if not match:
        raise ScreenshotError("chromium could not lay out the email to measure it")
    return int(match.group(1)), int(match.group(2))


def _run(chromium: str, args: list[str]) -> str:
    """Run headless chromium with a throwaway profile; returns its standard output."""
    with tempfile.TemporaryDirectory(prefix="newsletter-chromium-") as profile:
        command = [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *(["--no-sandbox"] if _is_root() else []),
            *args,
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ScreenshotError(f"chromium failed: {e}") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ScreenshotError(f"chromium exited with {done.returncode}: {last}")
    return done.stdout


def _is_root() -> bool:
    # Chromium refuses to start as root with its sandbox on (containers, CI).
    return hasattr(os, "geteuid") and os.geteuid() == 0
