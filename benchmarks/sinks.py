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
