"""Where the sender's time goes: a py-spy raw profile summed into the parts of a message's life.

    .venv/bin/python benchmarks/send.py --n 50000 --cli --profile prof.txt --gil
    .venv/bin/python benchmarks/profile_summary.py prof.txt --messages 50000 [--rate 250]

Each sample is a stack of frames; it is counted in the first part (in the order below) any of
whose frames it holds, so a token signed while a message is built counts as signing. With
`--gil` the samples are the interpreter's own time: samples / rate / messages is the Python
time a message costs in that part. `--top N` also lists the functions with the most samples of
their own.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

# (part, frame names that put a sample in it), first match wins.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    (
        "start-up and launch (imports, check, render, queue)",
        ("_find_and_load", "load_commands", "launch_campaign", "render_campaign", "check_campaign"),
    ),
    ("signing the links and Message-ID", ("make_token", "sign_ints", "message_id", "verp_address")),
    ("building the message (splice, headers)", ("Job.payload", "_plain_message")),
    (
        "ledger: write and commit",
        ("LedgerWriter._write", "LedgerWriter._commit", "record_outcomes", "outcome_arrays"),
    ),
    ("claim and load rows", ("Sender._claim_and_prepare",)),
    (
        "hand-offs between the loop and threads",
        ("run_in_executor", "ThreadPoolExecutor.submit", "_chain_future", "_read_from_self"),
    ),
    (
        "SMTP exchange",
        (
            "SmtpPool.send",
            "ConnectionPool.send",
            "SmtpConnection.send",
            "SmtpProtocol",
            "_read_ready",
        ),
    ),
    ("ledger: handing outcomes over", ("LedgerWriter",)),
]
OTHER = "event loop, lanes and the rest"


def frame_name(frame: str) -> str:
    """`func (file:line)` -> `func`."""
    return frame.split(" (", 1)[0]


def part_of(frames: list[str]) -> str:
    """The part a stack belongs to."""
    for part, markers in PARTS:
        if any(marker in frame for frame in frames for marker in markers):
            return part
    return OTHER


def summarise(lines: list[str]) -> tuple[Counter[str], Counter[str], int]:
    """Samples per part, samples per innermost function, and the total."""
    parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame_name(f) for f in stack.split(";")[1:]]  # [0] names the process
        parts[part_of(frames)] += int(count)
        own[frames[-1] if frames else "?"] += int(count)
        total += int(count)
    return parts, own, total


def main() -> None:
    """Read the profile, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--messages", type=int, required=True, help="messages the run sent")
    ap.add_argument("--rate", type=int, default=250, help="py-spy's samples per second")
    ap.add_argument("--top", type=int, default=0)
    args = ap.parse_args()
    parts, own, total = summarise(args.profile.read_text().splitlines())
    per_message = 1000 / args.rate / args.messages  # ms per sample per message
    print(f"{total:,} samples; {total * per_message:.3f} ms per message in all")
    for part, samples in parts.most_common():
        print(f"{samples * per_message:7.3f} ms  {samples / total:6.1%}  {part}")
    for name, samples in own.most_common(args.top):
        print(f"{samples / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
