"""The SMTP sinks the benchmarks send to: Postfix's smtp-sink, or an aiosmtpd that forgets."""

from __future__ import annotations

import subprocess
from typing import Any

SMTP_SINK = "/usr/sbin/smtp-sink"


def start_sink(kind: str, port: int) -> Any:
    """Start a sink on 127.0.0.1:port; "postfix" (smtp-sink, 256 connections) or "aiosmtpd"."""
    if kind == "postfix":
        return subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "256"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    from aiosmtpd.controller import Controller

    class Sink:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            return "250 OK"

    controller = Controller(Sink(), hostname="127.0.0.1", port=port)
    controller.start()
    return controller


def stop_sink(sink: Any) -> None:
    """Stop what start_sink started."""
    if isinstance(sink, subprocess.Popen):
        sink.terminate()
        sink.wait(timeout=10)
    else:
        sink.stop()
