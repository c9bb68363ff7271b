"""Why the sender talks SMTP with smtplib: aiosmtplib and smtplib on one reused connection.

    .venv/bin/python benchmarks/smtp_clients.py [--count 5000] [--size 33000]

Starts Postfix's smtp-sink on a free loopback port (or an aiosmtpd sink with --sink aiosmtpd),
sends --count messages of --size bytes over one connection with each client, and prints messages
per second. The same bytes, the same sink, one run.
"""

from __future__ import annotations

import argparse
import asyncio
import smtplib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiosmtplib

from newsletter.devsmtp import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sinks import start_sink, stop_sink


def message(size: int) -> bytes:
    """A plain message of about `size` bytes with 76-character lines."""
    head = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(size // len(line), 1)


def with_smtplib(port: int, data: bytes, count: int) -> float:
    started = time.perf_counter()
    conn = smtplib.SMTP("127.0.0.1", port, local_hostname="localhost")
    for _ in range(count):
        conn.sendmail("a@example.org", ["b@example.org"], data)
    conn.quit()
    return count / (time.perf_counter() - started)


def with_aiosmtplib(port: int, data: bytes, count: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=port, local_hostname="localhost", start_tls=False
        )
        await client.connect()
        for _ in range(count):
            await client.sendmail("a@example.org", ["b@example.org"], data)
        await client.quit()
        return count / (time.perf_counter() - started)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--size", type=int, default=33000)
    parser.add_argument("--sink", choices=("postfix", "aiosmtpd"), default="postfix")
    args = parser.parse_args()
    port = free_port()
    sink = start_sink(args.sink, port)
    time.sleep(0.5)
    data = message(args.size)
    try:
        for name, client in (("smtplib", with_smtplib), ("aiosmtplib", with_aiosmtplib)) * 2:
            rate = client(port, data, args.count)
            print(f"{name:>10}: {rate:7.0f} msg/s ({len(data):,} bytes, one connection)")
    finally:
        stop_sink(sink)


if __name__ == "__main__":
    main()
