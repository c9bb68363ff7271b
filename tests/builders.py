"""Builders the test files share: the CLI in a fresh process, and one run of the sender."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from newsletter.clock import Clock
from newsletter.config import Settings
from newsletter.send import SendReport, deliver_all


def run(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    ok: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run `newsletter ARGS` in a fresh process, without the caller's NEWSLETTER_* variables."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    full_env.update(env or {})
    result = subprocess.run(
        [sys.executable, "-m", "newsletter", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if ok:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


def deliver(factory: sessionmaker[Session], settings: Settings, clock: Clock) -> SendReport:
    """Deliver everything queued and due, as `newsletter send` does."""
    return deliver_all(factory=factory, settings=settings, clock=clock)
