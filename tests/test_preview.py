"""Previews people can look at: files per language, and PNGs taken with Debian's chromium."""

from __future__ import annotations

import re
import struct
from email import message_from_bytes, policy
from html.parser import HTMLParser
from pathlib import Path

import pytest

from newsletter.screenshot import ScreenshotError, find_chromium, measure_page
from tests.conftest import SECRET, SmtpServer, require_chromium
from tests.test_cli import ROOT, run, write_config
from tests.test_notices import check_preheader, parse_style

SAMPLE_FEED = ROOT / "newsletter" / "data" / "portal-feed.xml"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """An initialised service folder with the sample feed ingested."""
    (tmp_path / "config.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "n.db"}"\n[security]\nsecret = "{SECRET}"\n'
    )
    run(["init"], tmp_path)
    run(["ingest", str(SAMPLE_FEED)], tmp_path)
    return tmp_path


def test_digest_preview_writes_html_text_and_eml_per_language(project: Path) -> None:
    """One .html, .txt and .eml per language; the .eml parses with both parts; check verdict."""
    result = run(["digest", "preview", "--out", "out"], project)
    out = project / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"digest.{lang}.{ext}" for lang in ("en", "be", "ru") for ext in ("html", "txt", "eml")
    )
    message = message_from_bytes((out / "digest.be.eml").read_bytes(), policy=policy.default)
    assert message.get_body(("html",)) is not None and message.get_body(("plain",)) is not None
    assert "Штотыднёвы дайджэст" in (out / "digest.be.html").read_text()
    assert "the check finds no problem" in result.stdout


def test_preview_changes_nothing(project: Path) -> None:
    """A preview leaves the digest to be sent: preview twice, then send finds the items."""
    run(["digest", "preview", "--out", "out"], project)
    run(["digest", "preview", "--out", "out"], project)
    assert "dry run" in run(["digest", "send", "--dry-run"], project).stdout


@pytest.mark.parametrize(
    ("command", "stem"),
    [
        pytest.param(["digest", "preview", "--lang", "ru"], "digest", id="digest"),
        pytest.param(
            [
                "alert",
                "preview",
                "--item",
                "https://portal.example.org/2014/06/ales-bialiatski-released/",
            ],
            "alert",
            id="alert",
        ),
    ],
)
def test_screenshot_writes_pngs_at_375_and_800_light_and_dark(
    project: Path, command: list[str], stem: str
) -> None:
    """--screenshot adds full-page PNGs 375 and 800 px wide, light and dark, for each language."""
    require_chromium()
    run([*command, "--out", "out", "--screenshot"], project)
    lang = "ru" if stem == "digest" else "be"
    heights = []
    for width in (375, 800):
        light = project / "out" / f"{stem}.{lang}.{width}.png"
        dark = project / "out" / f"{stem}.{lang}.{width}.dark.png"
        assert png_size(light)[0] == width and png_size(dark)[0] == width
        assert png_size(light)[1] == png_size(dark)[1]
        assert light.read_bytes() != dark.read_bytes()
        heights.append(png_size(light)[1])
    # The whole page, not one window: the narrow page wraps more and is taller.
    assert heights[0] > heights[1] > 300


def test_screenshot_without_chromium_says_so_in_one_line(project: Path) -> None:
    """With no chromium the command stops with one line saying what to install."""
    result = run(
        [
            "digest",
            "preview",
            "--out",
            "out",
            "--screenshot",
            "--chromium",
            "/nonexistent/chromium",
        ],
        project,
        ok=False,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "chromium not found" in lines[0]
    assert not (project / "out").exists()


def test_find_chromium_names_the_package_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without any chromium on PATH the error says how to install it."""
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ScreenshotError, match="apt-get install chromium"):
        find_chromium()


def test_measure_page_lays_out_at_the_given_width() -> None:
    """A page is measured at exactly the width asked for; a wide element shows as overflow."""
    chromium = require_chromium()
    page = "<html><body style='margin:0'><p>Hello</p></body></html>"
    assert measure_page(page, 375, chromium)[0] == 375
    wide = "<html><body style='margin:0'><div style='width:900px'>x</div></body></html>"
    assert measure_page(wide, 375, chromium)[0] == 900


class _Images(HTMLParser):
    """Collects the attributes of every <img>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append({name: value or "" for name, value in attrs})


def test_logo_keeps_its_pixel_width_after_css_inlining(tmp_path: Path) -> None:
    """With [brand] logo_url the <img> says width="180", not the 100% premailer copied from CSS."""
    logo = "https://portal.example.org/logo.png"
    (tmp_path / "config.toml").write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "n.db"}"\n[security]\nsecret = "{SECRET}"\n'
        f'[brand]\nlogo_url = "{logo}"\n'
    )
    run(["init"], tmp_path)
    run(["ingest", str(SAMPLE_FEED)], tmp_path)
    run(["digest", "preview", "--out", "out"], tmp_path)
    for lang in ("en", "be", "ru"):
        finder = _Images()
        finder.feed((tmp_path / "out" / f"digest.{lang}.html").read_text())
        [img] = [attrs for attrs in finder.images if attrs.get("src") == logo]
        assert img["width"] == "180", img
        assert parse_style(img.get("style", "")).get("width", "180px") == "180px", img
        assert img["alt"]


@pytest.mark.parametrize(
    ("command", "stem"),
    [
        pytest.param(["digest", "preview"], "digest", id="digest"),
        pytest.param(
            [
                "alert",
                "preview",
                "--item",
                "https://portal.example.org/2014/06/ales-bialiatski-released/",
            ],
            "alert",
            id="alert",
        ),
    ],
)
def test_preheader_is_hidden_without_text_coloured_like_the_page(
    project: Path, command: list[str], stem: str
) -> None:
    """The preheader is display:none and sets no colour (SpamAssassin's HTML_FONT_LOW_CONTRAST)."""
    run([*command, "--out", "out"], project)
    for lang in ("en", "be", "ru"):
        check_preheader((project / "out" / f"{stem}.{lang}.html").read_text())


def without_links(text: str) -> str:
    """A text part with LF line ends and each recipient's own links taken out."""
    return re.sub(r"https?://\S+/(?:u|preferences)/\S+", "LINK", "\n".join(text.splitlines()))


def test_preview_last_writes_the_digest_that_went_out(
    tmp_path: Path, smtpd: SmtpServer, database_url: str
) -> None:
    """After a send, plain preview points to --last; --last writes that digest's files."""
    env = write_config(tmp_path, smtpd, database_url)
    run(["init"], tmp_path, env)
    example = str(ROOT / "subscribers" / "example.csv")
    run(["subscribers", "import", example, "--confirmed"], tmp_path, env)
    before = run(["digest", "preview", "--last", "--out", "out"], tmp_path, env).stdout
    assert "nothing to preview" in before and not (tmp_path / "out").exists()
    run(["ingest", str(SAMPLE_FEED)], tmp_path, env)
    run(["digest", "send"], tmp_path, env)
    sent = smtpd.messages()
    assert len(sent) == 9

    nothing = run(["digest", "preview", "--out", "out"], tmp_path, env).stdout
    assert "nothing to preview" in nothing and "--last" in nothing
    assert not (tmp_path / "out").exists()
    result = run(["digest", "preview", "--last", "--out", "out"], tmp_path, env).stdout
    assert "last digest (campaign 1" in result and "of 10 items" in result
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"digest.{lang}.{ext}" for lang in ("en", "be", "ru") for ext in ("html", "txt", "eml")
    )
    previews = {}
    for lang in ("en", "be", "ru"):
        eml = message_from_bytes((out / f"digest.{lang}.eml").read_bytes(), policy=policy.default)
        text = (out / f"digest.{lang}.txt").read_text()
        previews[eml["Subject"]] = without_links(text)
    for msg in sent:  # each reader's email is the preview of their language, links aside
        text = msg.get_body(("plain",)).get_content()  # type: ignore[union-attr]
        assert without_links(text) == previews[msg["Subject"]]
    # Looking changed nothing: no new campaign, nothing more sent, still nothing new to send.
    assert "nothing new" in run(["digest", "send"], tmp_path, env).stdout
    assert len(smtpd.messages()) == 9
