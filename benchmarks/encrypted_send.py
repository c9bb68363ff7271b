"""A digest to N readers, a share of them with an OpenPGP key, against the same send to none (#14).

    .venv/bin/python benchmarks/encrypted_send.py [--n 100000] [--keyed 0.10] [--rounds 1]
        [--sink postfix|aiosmtpd] [--pool-size 4] [--batch-size 500] [--signing]

Run A: nobody has a key. Run B: every (1/keyed)-th reader has an active key of their own (a
distinct Sequoia key per reader, made once before either run and timed apart). Each run gets a
fresh SQLite database seeded the same way (benchmarks/send.py's seed()); rounds alternate A B,
B A, ... and the mean per kind is reported. --signing also signs every encrypted message with a
portal key ([openpgp] signing_key_file), in both runs' settings.

Each run enqueues and sends in a child process of this script (the database is seeded by this
one beforehand), so its peak memory (ru_maxrss), its CPU seconds (user + sys, enqueue to last
accept) and its key caches are its own, as a `newsletter send` process would have them.

Prints per run: msg/s end to end (enqueue to last accept, as send.py measures), CPU ms per
message, peak memory; the encryption cost per encrypted message, timed directly (encrypt_message
on the sample message for 200 distinct keys, as the sender calls it and with the full parse) and
derived from the runs ((CPU B - CPU A) / encrypted messages); the sink's ceiling for the plain
sample message's bytes before and after the runs (and once for the encrypted message's bytes);
and the verdict against the aim: the encrypted run at least 80% of the plain one's rate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# benchmarks/ for send.py (reused, not copied: seed, start_sending, ceiling, ...) and sinks.py
sys.path.insert(0, str(Path(__file__).resolve().parent))
import pysequoia
import send as base
from sinks import SMTP_SINK
from sqlalchemy import insert, select

from newsletter.config import load_settings
from newsletter.db import make_engine, make_sessionmaker, migrate, unit_of_work
from newsletter.db.models import KeyStatus, ReaderKey, Subscriber
from newsletter.devsmtp import free_port
from newsletter.openpgp import encrypt_message, load_signing_key, read_key

MICRO_KEYS = 200  # distinct keys for timing encrypt_message directly (under its 256-key cache)
VALIDITY = 365 * 86400


def make_settings(url: str, port: int, args: argparse.Namespace, signing_file: str):  # type: ignore[no-untyped-def]
    settings = load_settings(
        None, {"NEWSLETTER_SECRET": base.SECRET, "NEWSLETTER_DATABASE_URL": url}
    )
    smtp = replace(
        settings.smtp,
        host="127.0.0.1",
        port=port,
        batch_size=args.batch_size,
        pool_size=args.pool_size,
    )
    openpgp = replace(settings.openpgp, signing_key_file=signing_file)
    return replace(settings, smtp=smtp, openpgp=openpgp)


def keyed_indices(n: int, share: float) -> list[int]:
    """Readers spread evenly: every (1/share)-th one (0, 10, 20, ... for 0.10)."""
    count = min(round(n * share), n)
    return [j * n // count for j in range(count)]


def public_keys(indices: list[int]) -> list[str]:
    """A distinct key for reader i ("Person i <p{i}@example.net>"), its public half armored."""
    return [
        str(
            pysequoia.Tsk.generate(
                user_id=f"Person {i} <p{i}@example.net>", validity_seconds=VALIDITY
            ).extract_certificate()
        )
        for i in indices
    ]


def give_keys(factory, keys: dict[int, str]) -> None:  # type: ignore[no-untyped-def]
    """An active ReaderKey for reader i (p{i}@example.net) with keys[i], inserted in bulk."""
    now = datetime.now(UTC)
    # Fingerprint and expiry as the portal would store them: read_key's, checked on a few.
    for i in list(keys)[:3]:
        info = read_key(keys[i], email=f"p{i}@example.net", now=now)
        cert = pysequoia.Cert.from_bytes(keys[i].encode())
        assert info.armored == keys[i] and info.fingerprint == cert.fingerprint.upper(), i
        assert info.expires_at == cert.expiration, (info.expires_at, cert.expiration)
    with unit_of_work(factory) as s:
        by_email = {email: sid for email, sid in s.execute(select(Subscriber.email, Subscriber.id))}
        rows = []
        for i, armored in keys.items():
            cert = pysequoia.Cert.from_bytes(armored.encode())
            rows.append(
                {
                    "subscriber_id": by_email[f"p{i}@example.net"],
                    "status": KeyStatus.ACTIVE,
                    "fingerprint": cert.fingerprint.upper(),
                    "armored": armored,
                    "expires_at": cert.expiration,
                    "created_at": now,
                    "confirmed_at": now,
                    "confirm_sent_at": now,
                }
            )
        for chunk in range(0, len(rows), 5000):
            s.execute(insert(ReaderKey), rows[chunk : chunk + 5000])


def prepare_database(url: str, n: int, keys: dict[int, str]) -> int:
    """A fresh database: send.py's seed, then the readers' keys; the campaign's id."""
    engine = make_engine(url)
    try:
        migrate(engine)
        factory = make_sessionmaker(engine)
        cid = base.seed(factory, n)
        if keys:
            give_keys(factory, keys)
        return cid
    finally:
        engine.dispose()


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(spec: dict[str, Any]) -> None:
    """One run, in its own process: enqueue and send a seeded campaign; prints its figures."""
    args = argparse.Namespace(**spec["args"])
    settings = make_settings(spec["url"], spec["port"], args, spec["signing_file"])
    engine = make_engine(spec["url"])
    factory = make_sessionmaker(engine)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    render_ms = base.start_sending(factory, settings, spec["cid"])
    queued, cpu_queued = time.perf_counter() - t0, cpu_seconds() - cpu0
    # Outside the timed stretch: the first reader's message shows whether B encrypts at all.
    first = base.sample_message(factory, settings, spec["cid"])
    encrypted = b"multipart/encrypted" in first
    assert encrypted == spec["keyed"], "run B must encrypt to reader 0, run A must not"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu0, t0 = cpu_seconds() - cpu_queued, time.perf_counter() - queued
    base.send_in_process(factory, settings, spec["n"])
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    engine.dispose()
    figures = {
        "rate": spec["n"] / elapsed,
        "elapsed": elapsed,
        "cpu": cpu,
        "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "before": before,
        "render_ms": render_ms,
    }
    print("RESULT " + json.dumps(figures), flush=True)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    found = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not found:
        raise SystemExit(f"run failed ({done.returncode}): {done.stdout}")
    return json.loads(found[-1].removeprefix("RESULT "))


def plain_sample(work: Path, settings) -> bytes:  # type: ignore[no-untyped-def]
    """Reader 0's plain message, as every run builds it (a small database of its own)."""
    url = f"sqlite:///{work / 'sample.db'}"
    cid = prepare_database(url, 3, {})
    engine = make_engine(url)
    try:
        factory = make_sessionmaker(engine)
        s = replace(settings, database=replace(settings.database, url=url))
        base.start_sending(factory, s, cid)
        return base.sample_message(factory, s, cid)
    finally:
        engine.dispose()


def time_encryption(message: bytes, keys: list[str], signer) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    """encrypt_message per key in ms: as the sender calls it (the stored key, checked=True),
    then with the full parse and checks of each key (checked=False, first use of each key)."""
    sender, full = [], []
    for runs, checked in ((sender, True), (full, False)):
        for key in keys:
            t = time.perf_counter()
            encrypt_message(message, armored_key=key, signer=signer, checked=checked)
            runs.append((time.perf_counter() - t) * 1000)
    return sender, full


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--keyed", type=float, default=0.10, help="share of readers with a key")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of A and B (A B, B A, ...)")
    ap.add_argument(
        "--sink",
        choices=["postfix", "aiosmtpd"],
        default="postfix" if Path(SMTP_SINK).exists() else "aiosmtpd",
    )
    ap.add_argument("--pool-size", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--signing", action="store_true", help="sign with a portal key too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not 0 < args.keyed <= 1:
        raise SystemExit("--keyed must be in (0, 1]")

    indices = keyed_indices(args.n, args.keyed)
    t = time.perf_counter()
    keys = dict(zip(indices, public_keys(indices), strict=True))
    keygen = time.perf_counter() - t
    micro_keys = public_keys([args.n + j for j in range(MICRO_KEYS)])  # not the runs' keys

    work = Path(tempfile.mkdtemp(prefix="nl-bench-enc-"))
    signing_file = ""
    if args.signing:
        portal = pysequoia.Tsk.generate(
            user_id="Portal <news@portal.example.org>", validity_seconds=VALIDITY
        )
        (work / "signing.asc").write_text(str(portal))
        signing_file = str(work / "signing.asc")
    port = free_port()
    sink = base.start_sink(args.sink, port)
    time.sleep(0.5)
    spec_args = {"pool_size": args.pool_size, "batch_size": args.batch_size}
    order = [kind for r in range(args.rounds) for kind in ("AB" if r % 2 == 0 else "BA")]
    results: list[tuple[str, dict[str, Any]]] = []
    seeding: list[float] = []
    try:
        settings = make_settings("sqlite://", port, argparse.Namespace(**spec_args), signing_file)
        signer = load_signing_key(signing_file)
        message = plain_sample(work, settings)
        sealed = encrypt_message(message, armored_key=micro_keys[0], signer=signer)
        count = min(args.n, 20000)
        top_before = base.ceiling(args.sink, port, message, count)
        first, again = time_encryption(message, micro_keys, signer)
        for number, kind in enumerate(order):
            url = f"sqlite:///{work / f'bench-{number}-{kind}.db'}"
            t = time.perf_counter()
            cid = prepare_database(url, args.n, keys if kind == "B" else {})
            seeding.append(time.perf_counter() - t)
            spec = {
                "url": url,
                "port": port,
                "cid": cid,
                "n": args.n,
                "keyed": kind == "B",
                "signing_file": signing_file,
                "args": spec_args,
            }
            results.append((kind, run_child(spec)))
            for leftover in work.glob(f"bench-{number}-{kind}.db*"):
                leftover.unlink()
        top_after = base.ceiling(args.sink, port, message, count)
        top_sealed = base.ceiling(args.sink, port, sealed, count)
    finally:
        base.stop_sink(sink)
        shutil.rmtree(work, ignore_errors=True)

    top = (top_before + top_after) / 2
    encrypted = len(keys)
    print(
        f"sink {args.sink}; SQLite; recipients {args.n}; keyed {encrypted} "
        f"({encrypted / args.n:.0%}, every {args.n // max(encrypted, 1)}th reader); "
        f"signing {'on' if args.signing else 'off'}; pool_size {args.pool_size}; "
        f"batch_size {args.batch_size}; each run in a child process; cores {os.cpu_count()}"
    )
    print(
        f"key generation: {encrypted} keys in {keygen:.1f} s "
        f"({keygen / max(encrypted, 1) * 1000:.2f} ms each; not in any run); "
        f"seeding per run {statistics.mean(seeding):.1f} s (untimed)"
    )
    print(
        f"message: plain {len(message) / 1024:.1f} KB, encrypted {len(sealed) / 1024:.1f} KB "
        f"(x{len(sealed) / len(message):.2f})"
    )
    print(
        f"sink ceiling, plain bytes, minimal client: {top_before:,.0f} msg/s before, "
        f"{top_after:,.0f} after; mean {top:,.0f}; encrypted bytes: {top_sealed:,.0f}"
    )
    print(
        f"encrypt_message, {MICRO_KEYS} distinct keys: as the sender calls it (stored key, no "
        f"parse) median {statistics.median(first):.2f} ms, mean {statistics.mean(first):.2f}; "
        f"with the full parse and checks median {statistics.median(again):.2f} ms, "
        f"mean {statistics.mean(again):.2f}"
    )
    for number, (kind, r) in enumerate(results, 1):
        name = "A plain    " if kind == "A" else "B encrypted"
        print(
            f"run {number} {name}: {r['rate']:,.0f} msg/s in {r['elapsed']:.1f} s "
            f"({r['rate'] / top:.0%} of ceiling); CPU {r['cpu']:.1f} s = "
            f"{r['cpu'] / args.n * 1000:.2f} ms/msg; peak memory {r['peak']:.0f} MB "
            f"(before sending {r['before']:.0f} MB)"
        )
    mean = {
        kind: {
            field: statistics.mean(r[field] for k, r in results if k == kind)
            for field in ("rate", "cpu", "peak")
        }
        for kind in "AB"
    }
    for kind in "AB":
        m = mean[kind]
        print(
            f"mean {kind} over {args.rounds} run(s): {m['rate']:,.0f} msg/s; "
            f"CPU {m['cpu'] / args.n * 1000:.2f} ms/msg; peak {m['peak']:.0f} MB"
        )
    derived = (mean["B"]["cpu"] - mean["A"]["cpu"]) / max(encrypted, 1) * 1000
    print(f"encryption cost from the runs: (CPU B - CPU A) / {encrypted} = {derived:.2f} ms/msg")
    ratio = mean["B"]["rate"] / mean["A"]["rate"]
    print(f"encrypted run {ratio:.0%} of the plain run's rate (aim >= 80%)")


if __name__ == "__main__":
    main()
