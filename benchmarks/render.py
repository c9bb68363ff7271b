"""Time the render step: a 20-item digest per language, split into Jinja2, MJML and premailer.

Run: python benchmarks/render.py [--runs N]. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

from newsletter.config import LANGUAGES, Settings
from newsletter.render import (
    CampaignView,
    ItemView,
    compile_mjml,
    inline_css,
    render_mjml_source,
    render_variant,
)

SUMMARY = (
    "<p>On July 1 Ales Bialiatski, head of the Human Rights Centre “Viasna” and Vice-President "
    "of the International Federation for Human Rights (FIDH), visited Brussels. He met with "
    "representatives of the European Union to thank them for their tireless efforts on his "
    'release. <a href="https://www.fidh.org/">FIDH</a> &amp; Viasna&hellip;</p>'
    "<p>He called for the liberation of all political prisoners in Belarus.</p>"
)


def make_digest(n_items: int, summary_repeat: int = 1) -> CampaignView:
    """A digest shaped like a busy week on the portal (summaries `summary_repeat` times long)."""
    start = datetime(2014, 7, 2, 9, 0, tzinfo=UTC)
    categories = ("Viasna", "Statements", "Political prisoners", "International")
    items = tuple(
        ItemView(
            title=f"Ales Bialiatski visits Brussels and Strasbourg, day {i}",
            link=f"https://portal.example.org/2014/07/ales-bialiatski-visits-brussels-{i}/",
            summary_html=SUMMARY * summary_repeat,
            published_at=start - timedelta(hours=8 * i),
            categories=(categories[i % len(categories)],),
        )
        for i in range(n_items)
    )
    return CampaignView(kind="digest", list_name="Weekly digest", items=items)


def time_ms(action: Callable[[], object], runs: int) -> float:
    """Median wall time of `action` in milliseconds."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def measure(view: CampaignView, lang: str, settings: Settings, runs: int) -> tuple[float, ...]:
    """(jinja2 ms, mjml ms, premailer ms, total ms, html KB) for one language."""
    render = partial(render_variant, view, lang=lang, settings=settings)
    fill = partial(render_mjml_source, view, lang=lang, settings=settings)
    render()  # warm the per-language caches (Jinja2 environment, compiled catalogue)
    source = fill()
    compiled = compile_mjml(source)
    return (
        time_ms(fill, runs),
        time_ms(partial(compile_mjml, source), runs),
        time_ms(partial(inline_css, compiled), runs),
        time_ms(render, runs),
        len(render().html.encode()) / 1024,
    )


def main() -> None:
    """Print per-language render figures for a 20-item digest."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument(
        "--long", type=int, default=1, help="Repeat each summary N times (shortening kicks in)."
    )
    args = parser.parse_args()
    view = make_digest(args.items, args.long)
    print(f"{args.items}-item digest (summaries x{args.long}), median of {args.runs} runs")
    header = ("jinja2 ms", "mjml ms", "premailer ms", "total ms", "html KB")
    print(f"{'lang':<6}" + "".join(f"{name:>14}" for name in header))
    for lang in LANGUAGES:
        jinja_ms, mjml_ms, premailer_ms, total_ms, size_kb = measure(
            view, lang, Settings(), args.runs
        )
        figures = (jinja_ms, mjml_ms, premailer_ms, total_ms)
        print(f"{lang:<6}" + "".join(f"{ms:>14.2f}" for ms in figures) + f"{size_kb:>14.1f}")


if __name__ == "__main__":
    main()
