"""Real `newsletter` processes for tests: a config file in tmp_path, a secret, logs to files."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import SECRET


class NewsletterCli:
    """Runs `python -m newsletter` against one config file; stderr of each run goes to a file."""

    def __init__(self, tmp_path: Path, config: str) -> None:
        self.cwd = tmp_path
        self.config = tmp_path / "config.toml"
        self.config.write_text(config)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
        self.env["NEWSLETTER_SECRET"] = SECRET
        self.runs = 0

    def _argv(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "newsletter", "--config", str(self.config), *args]

    def _log(self, name: str) -> Path:
        self.runs += 1
        return self.cwd / f"{self.runs:02d}-{name}.log"

    def run(self, *args: str, timeout: float = 60) -> str:
        """Run a command to its end; fail the test (with its stderr) on a non-zero exit."""
        log = self._log(args[0])
        with log.open("w") as err:
            done = subprocess.run(
                self._argv(list(args)),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=timeout,
                check=False,
            )
        assert done.returncode == 0, f"{args} exited {done.returncode}: {log.read_text()}"
        return done.stdout

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        """Start a command in the background; the caller waits for it or kills it."""
        with self._log(args[0]).open("w") as err:  # the child keeps its own copy of the file
            return subprocess.Popen(
                self._argv(list(args)),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )


def wait_until(predicate: Callable[[], bool], *, seconds: float, every: float = 0.01) -> bool:
    """Poll until the predicate holds, for at most `seconds`; returns whether it held."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def wait_until_still(count: Callable[[], int], *, quiet: float, seconds: float) -> int | None:
    """Poll a growing count until it has not changed for `quiet` seconds, within `seconds`.

    Returns the settled count, or None if it was still growing when the time ran out.
    """
    deadline = time.monotonic() + seconds
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_count = count()
        if now_count != last:
            last, since = now_count, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return last
    return None
