"""The command line: a thin skin over the step functions.

Every command parses its input, opens a unit of work, calls one step and prints the result.
A NewsletterError becomes one red line and a non-zero exit code; --debug shows the traceback.

Much of what is printed comes from outside (feed titles, HTTP and SMTP replies, names). The
consoles print every string as text: Rich markup and emoji codes are not read, and characters
that could drive a terminal are shown escaped. Colour is given only by `style`, never by markup.
"""

from __future__ import annotations

import getpass
import importlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from newsletter import __version__
from newsletter.clock import Clock, SystemClock
from newsletter.config import Settings, find_config, load_settings
from newsletter.db import check_schema, make_engine, make_sessionmaker
from newsletter.errors import NewsletterError

# Never sent to a terminal as they are: C0 and C1 controls and DEL (ESC starts the sequences
# that move the cursor, retitle the window or write links), lone surrogates (undecodable bytes),
# the line and paragraph separators, and the bidi controls that reorder what is shown.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0xD800, 0xE000)]
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
_ESCAPED = {cp: f"\\u{cp:04x}" for cp in [*_CONTROLS, *_BIDI] if chr(cp) not in "\n\t"}
_ESCAPED_ONE_LINE = {**_ESCAPED, ord("\n"): "\\n", ord("\t"): "\\t"}
_BIDI_ESCAPED = {cp: f"\\u{cp:04x}" for cp in _BIDI}


def printable(text: str) -> str:
    """Text safe for a terminal: each control character shown as a \\uXXXX escape.

    Line breaks and tabs stay; the escapes are valid inside a JSON string too.
    """
    return text.translate(_ESCAPED)


def terminal_text(text: str) -> str:
    """Text already free of C0/C1 controls (a CSV export) for a terminal: only the bidi and
    separator controls shown as \\uXXXX, so its CR LF line ends stay as they are."""
    return text.translate(_BIDI_ESCAPED)


def one_line(text: object) -> str:
    """Outside text for one line of output: as printable(), with line breaks and tabs escaped."""
    return str(text).translate(_ESCAPED_ONE_LINE)


class PlainConsole(Console):
    """A Rich console that prints every string as text: no markup, no emoji, no controls."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        """Every string printed, in a table cell or a title too, passes here."""
        kwargs.update(markup=False, emoji=False)
        return super().render_str(printable(text), **kwargs)


console = PlainConsole(highlight=False, markup=False, emoji=False)
err_console = PlainConsole(stderr=True, highlight=False, markup=False, emoji=False)


def say(label: str, style: str, message: object = "") -> None:
    """One line on stderr: a coloured label, then (outside) text shown as text on one line."""
    line = Text(label, style=style)
    if message != "":
        line.append(" " + one_line(message))
    err_console.print(line, soft_wrap=True)


def print_json(value: Any) -> None:
    """JSON on stdout for scripts; characters unsafe for a terminal become \\u escapes."""
    console.out(json.dumps(value, default=str, ensure_ascii=False, indent=2), highlight=False)


app = typer.Typer(
    name="newsletter",
    help="Newsletter and urgent-alert service for a human-rights news portal.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


@dataclass
class State:
    """What every command gets: the config location, the clock, and lazily the database."""

    config: str | None = None
    debug: bool = False
    clock: Clock = field(default_factory=SystemClock)
    _settings: Settings | None = None
    _engine: Engine | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(find_config(self.config, os.environ), os.environ)
        return self._settings

    def engine(self, *, checked: bool = True) -> Engine:
        """The database engine; by default refuse a database that is not initialised."""
        if self._engine is None:
            self._engine = make_engine(self.settings.database.url)
        if checked:
            check_schema(self._engine)
        return self._engine

    def factory(self) -> sessionmaker[Session]:
        return make_sessionmaker(self.engine())

    @property
    def actor(self) -> str:
        try:
            return f"cli:{getpass.getuser()}"
        except (KeyError, OSError):
            return "cli"


def _version(value: bool) -> None:
    if value:
        console.print(f"newsletter {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        str | None,
        typer.Option(
            "--config",
            help="Config file (default: $NEWSLETTER_CONFIG, "
            "else ./config.toml, else embedded defaults).",
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Newsletter and urgent-alert service for a human-rights news portal."""
    ctx.obj = State(config=config, debug=debug)


# Each module adds its commands to `app` when imported: each top-level command, by the module
# that registers it (importing some modules registers others' too, which does no harm).
COMMANDS = {
    "actions": "actions",
    "alert": "alert",
    "bounces": "bounces",
    "campaigns": "campaigns",
    "check": "check",
    "console": "staff_console",
    "demo": "demo",
    "dev-smtp": "devsmtp",
    "digest": "digest",
    "doctor": "doctor",
    "ingest": "ingest",
    "init": "init",
    "lists": "lists",
    "run": "run",
    "segments": "segments",
    "send": "send",
    "staff": "staff",
    "status": "status",
    "subscribers": "subscribers",
    "web": "web",
}


def load_commands(argv: list[str] | None = None) -> None:
    """Import the module of the command `argv` names, or every command module.

    A command starts without importing the rest (rendering, OpenPGP, the web stack): 0.9 s
    and 30 MB less for each `newsletter send`, and for each of its `--workers` processes.
    `--help` alone, no command or an unknown one loads them all, so that all are listed.
    """
    name = command_name(argv) if argv is not None else None
    for module in [COMMANDS[name]] if name in COMMANDS else COMMANDS.values():
        importlib.import_module(f"newsletter.cli.{module}")


def command_name(argv: list[str]) -> str | None:
    """The first argument that is not a root option (nor --config's value), if any; none when
    the root's --help comes first (it lists every command)."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif arg == "--help":
            return None
        elif not arg.startswith("-"):
            return arg
    return None


def main() -> None:
    """Entry point: run the app, turning our errors into one line and an exit code."""
    if any(not_text(arg) for arg in sys.argv[1:]):
        say("error:", "red", "an argument is not UTF-8 text: check the terminal's encoding")
        # File names too: the names given here end up in messages, pages and the database.
        sys.exit(2)
    load_commands(sys.argv[1:])
    try:
        app()
    except NewsletterError as e:
        if "--debug" in sys.argv:
            raise
        say("error:", "red", e)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        say("interrupted", "yellow")
        sys.exit(130)
    except Exception as e:  # a bug: still one line unless asked for more
        if "--debug" in sys.argv:
            raise
        say("internal error:", "red", f"{describe_error(e)} (run again with --debug)")
        sys.exit(70)


def not_text(arg: str) -> bool:
    """Whether an argument held bytes that are not UTF-8 (Python keeps them as lone surrogates,
    which no database or terminal can take)."""
    return any("\udc80" <= c <= "\udcff" for c in arg)


def describe_error(e: BaseException) -> str:
    """An unexpected error in a line; a database error by its kind and code only.

    The text of a database error can quote the values of the statement it refused (an address,
    a name), so it is never shown without --debug.
    """
    if not isinstance(e, SQLAlchemyError):
        return f"{type(e).__name__}: {e}"
    orig = getattr(e, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    return f"database error {type(e).__name__}" + (f" ({code})" if code else "")
