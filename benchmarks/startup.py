"""How long a command takes to start, and its peak memory, on an initialised empty database.

    .venv/bin/python benchmarks/startup.py [--runs 7]

Each command runs `--runs` times as `python -m newsletter --config FILE ...` in a new process;
the fastest run is printed (the others waited on the machine), with that run's peak RSS.
`send` and `status` on an empty SQLite database are a command's whole fixed cost: imports,
settings, the schema check. Compare two checkouts by running this script with PYTHONPATH set
to each in turn.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = (["--help"], ["send"], ["status"], ["digest", "--help"])


# Runs the command line as its entry point does, then reports the process's own peak RSS.
PROBE = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: sys.stderr.write("
    "f'\\nRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'))\n"
    "sys.argv[0] = 'newsletter'\n"
    "from newsletter.cli import main\n"
    "main()\n"
)


def timed(argv: list[str], cwd: str) -> tuple[float, float]:
    """Seconds and peak MB of one run of the command line with ARGV, in a new process."""
    start = time.perf_counter()
    done = subprocess.run(  # run elsewhere: `-c` puts the current directory first on sys.path
        [sys.executable, "-c", PROBE, *argv],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"newsletter {' '.join(argv)} failed:\n{done.stderr}")
    seconds = time.perf_counter() - start
    kilobytes = int(done.stderr.rsplit("RSS ", 1)[1])  # ru_maxrss is in KB on Linux
    return seconds, kilobytes / 1024


def main() -> None:
    """Print each command's fastest start and its peak memory."""
    print("newsletter from", Path(importlib.util.find_spec("newsletter").origin).parent)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "config.toml"
        config.write_text(
            f"[database]\nurl = 'sqlite:///{work}/n.db'\n[security]\nsecret = '{'s' * 40}'\n"
        )
        timed(["--config", str(config), "init"], work)
        for command in COMMANDS:
            runs = [timed(["--config", str(config), *command], work) for _ in range(args.runs)]
            seconds, peak = min(runs)
            print(f"newsletter {' '.join(command)}: {seconds:.2f} s, peak {peak:.0f} MB")


if __name__ == "__main__":
    main()
