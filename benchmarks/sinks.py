"""The SMTP sinks the benchmarks send to: Postfix's smtp-sink, or an aiosmtpd that forgets."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

SMTP_SINK = "/usr/sbin/smtp-sink"
# An aiosmtpd server that accepts and forgets every message, until it is terminated.
AIOSMTPD_SINK = """
import signal, sys
from aiosmtpd.controller import Controller

class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"

controller = Controller(Sink(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
signal.sigwait({signal.SIGTERM, signal.SIGINT})
controller.stop()
"""


# A TCP proxy that holds every chunk for half the round trip each way, in order: a relay that
# far away (for its latency only: loopback's bandwidth and the sink's speed stay).
DELAY_PROXY = """
import asyncio, sys
listen, target, half = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 2000

async def pipe(reader, writer):
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue()

    async def later():
        while (item := await queue.get()) is not None:
            due, data = item
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            writer.write(data)
            await writer.drain()
        writer.close()

    forward = asyncio.create_task(later())
    try:
        while data := await reader.read(1 << 16):
            queue.put_nowait((loop.time() + half, data))
    except OSError:
        pass
    queue.put_nowait(None)
    await forward

async def serve(reader, writer):
    try:
        far_reader, far_writer = await asyncio.open_connection("127.0.0.1", target)
    except OSError:
        writer.close()
        return
    await asyncio.gather(
        pipe(reader, far_writer), pipe(far_reader, writer), return_exceptions=True
    )

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def start_delay(port: int, target: int, rtt_ms: float) -> subprocess.Popen[bytes]:
    """A proxy on 127.0.0.1:port to the sink on `target`, adding `rtt_ms` to each round trip.

    Returns once it accepts connections. Its own process: its CPU is not the sender's.
    """
    command = [sys.executable, "-c", DELAY_PROXY, str(port), str(target), str(rtt_ms)]
    proxy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, proxy)
    return proxy


def start_sink(kind: str, port: int) -> subprocess.Popen[bytes]:
    """Start a sink on 127.0.0.1:port; "postfix" (smtp-sink, 256 connections) or "aiosmtpd".

    Returns once the sink accepts connections.
    """
    if kind == "postfix":
        command = [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "256"]
    else:  # a process of its own, so that its CPU and GIL are not the benchmark's
        command = [sys.executable, "-c", AIOSMTPD_SINK, str(port)]
    sink = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port, sink)
    return sink


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:port; stop if process exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"smtp-sink exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def stop_sink(sink: subprocess.Popen[bytes]) -> None:
    """Stop what start_sink started."""
    sink.terminate()
    sink.wait(timeout=10)
