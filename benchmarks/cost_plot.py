"""Run benchmarks/send.py for several recipient counts and plot what a message costs.

    .venv/bin/python benchmarks/cost_plot.py [--sizes 10000,100000,1000000] [--out /tmp/cost.svg]
        [--save results.jsonl] [SEND.PY OPTIONS, e.g. --cli or --workers 2 or --database URL]
    .venv/bin/python benchmarks/cost_plot.py --from-file results.jsonl [--out /tmp/cost.svg]

Each run of send.py prints `RESULT {json}` lines; this collects them (or reads them from a file
of such lines, with or without the `RESULT ` prefix), prints the table it plots and writes an SVG
of four panels (% of the ceiling, msg/s, CPU ms per message and peak MB) against recipients
(log x axis), one line per kind of sender (in-process, workers N, cli).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from html import escape
from pathlib import Path
from typing import Any

SEND = Path(__file__).resolve().parent / "send.py"
PANELS = (
    ("ratio_pct", "% of the sink's ceiling, same run"),
    ("msg_per_s", "messages per second"),
    ("cpu_ms_per_msg", "CPU ms per message"),
    ("peak_mb", "peak memory, MB"),
)
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
WIDTH, HEIGHT = 330, 260  # one panel
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 30, 42  # its margins


def run_sizes(sizes: list[int], extra: list[str]) -> list[dict[str, Any]]:
    """Run send.py once per size, echoing its output; returns its RESULT records."""
    results = []
    for n in sizes:
        command = [sys.executable, str(SEND), "--n", str(n), *extra]
        print("$ " + " ".join(command[1:]), flush=True)
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(line, end="", flush=True)
                if line.startswith("RESULT "):
                    results.append(derived(json.loads(line.removeprefix("RESULT "))))
        if proc.returncode != 0:
            raise SystemExit(f"send.py --n {n} failed with exit code {proc.returncode}")
    return results


def derived(record: dict[str, Any]) -> dict[str, Any]:
    """A result with the figures plotted but not printed by send.py (the ratio in percent)."""
    return record | {"ratio_pct": record["ratio"] * 100}


def read_results(path: Path) -> list[dict[str, Any]]:
    """Records from a file of JSON lines, each with or without the `RESULT ` prefix."""
    records = []
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("RESULT ").strip()
        if line:
            records.append(derived(json.loads(line)))
    return records


def print_table(results: list[dict[str, Any]]) -> None:
    """The plotted figures, one row per run."""
    print(
        f"{'recipients':>10}  {'sender':<12} {'msg/s':>8} {'ceiling':>8} "
        f"{'CPU ms/msg':>10} {'peak MB':>8}"
    )
    for r in sorted(results, key=lambda r: (r["label"], r["recipients"])):
        print(
            f"{r['recipients']:>10}  {r['label']:<12} {r['msg_per_s']:>8,.0f} "
            f"{r['ratio']:>8.0%} {r['cpu_ms_per_msg']:>10.3f} {r['peak_mb']:>8.0f}"
        )


def nice_step(top: float) -> float:
    """A round tick step giving about five ticks from 0 to top."""
    raw = top / 5 if top > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)


def panel(results: list[dict[str, Any]], key: str, title: str, x0: float) -> list[str]:
    """The SVG elements of one panel: frame, axes with ticks, one line per sender."""
    ns = [r["recipients"] for r in results]
    lo, hi = math.floor(math.log10(min(ns))), math.ceil(math.log10(max(ns)))
    if hi == lo:
        hi += 1
    top = float(max(r[key] for r in results)) * 1.05
    step = nice_step(top)
    ymax = max(step * math.ceil(top / step), step)
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(n: float) -> float:
        return x0 + LEFT + (math.log10(n) - lo) / (hi - lo) * w

    def py(v: float) -> float:
        return TOP + h - v / ymax * h

    out = [
        f'<text x="{x0 + LEFT + w / 2}" y="18" text-anchor="middle" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    for d in range(lo, hi + 1):  # decades
        x = px(10**d)
        out.append(f'<line x1="{x}" y1="{TOP}" x2="{x}" y2="{TOP + h}" stroke="#ddd"/>')
        out.append(f'<text x="{x}" y="{TOP + h + 15}" text-anchor="middle">10^{d}</text>')
    tick = 0.0
    while tick <= ymax + step / 1000:
        y = py(tick)
        label = f"{tick:,.0f}" if step >= 1 else f"{tick:.3g}"
        out.append(f'<line x1="{x0 + LEFT}" y1="{y}" x2="{x0 + LEFT + w}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{x0 + LEFT - 4}" y="{y + 4}" text-anchor="end">{label}</text>')
        tick += step
    out.append(
        f'<rect x="{x0 + LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#444"/>'
    )
    out.append(
        f'<text x="{x0 + LEFT + w / 2}" y="{HEIGHT - 8}" text-anchor="middle">recipients</text>'
    )
    for color, label in zip(COLORS, labels(results), strict=False):
        runs = sorted((r for r in results if r["label"] == label), key=lambda r: r["recipients"])
        points = " ".join(f"{px(r['recipients']):.1f},{py(r[key]):.1f}" for r in runs)
        out.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for r in runs:
            cx, cy = px(r["recipients"]), py(r[key])
            out.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{color}"/>')
    return out


def labels(results: list[dict[str, Any]]) -> list[str]:
    """The kinds of sender in the results, in the order first seen."""
    return list(dict.fromkeys(r["label"] for r in results))


def svg(results: list[dict[str, Any]]) -> str:
    """The whole plot: three panels side by side and a legend under them."""
    total_w, total_h = WIDTH * len(PANELS), HEIGHT + 24
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{total_w}" height="{total_h}" fill="white"/>',
    ]
    for i, (key, title) in enumerate(PANELS):
        parts += panel(results, key, title, i * WIDTH)
    first = results[0]
    legend = f"sink {first.get('sink', '?')}, {first.get('database', '?')}:"
    parts.append(f'<text x="{LEFT}" y="{total_h - 8}">{escape(legend)}</text>')
    x = LEFT + 8 + 6.5 * len(legend)
    for color, label in zip(COLORS, labels(results), strict=False):
        parts.append(f'<rect x="{x}" y="{total_h - 17}" width="12" height="10" fill="{color}"/>')
        parts.append(f'<text x="{x + 16}" y="{total_h - 8}">{escape(label)}</text>')
        x += 30 + 7 * len(label)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    """Gather or read the results, print the table, write the SVG."""
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options are passed on to send.py.",
    )
    ap.add_argument("--sizes", default="10000,100000,1000000", help="recipient counts")
    ap.add_argument("--out", type=Path, default=Path("/tmp/cost.svg"), help="the SVG to write")
    ap.add_argument("--from-file", type=Path, help="plot these results instead of running")
    ap.add_argument("--save", type=Path, help="also append the results to this JSON-lines file")
    args, extra = ap.parse_known_args()
    if args.from_file:
        if extra:
            ap.error(f"send.py options with --from-file: {' '.join(extra)}")
        results = read_results(args.from_file)
    else:
        results = run_sizes([int(s) for s in args.sizes.split(",")], extra)
        if args.save:
            with args.save.open("a") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in results)
    if not results:
        raise SystemExit("no results to plot")
    print()
    print_table(results)
    args.out.write_text(svg(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
