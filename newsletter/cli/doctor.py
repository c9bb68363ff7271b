"""`newsletter doctor [--live] [--json]`: SPF, DKIM, DMARC and one-click unsubscribe, checked."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Annotated

import typer
from rich.text import Text

from newsletter.cli import State, app, console, one_line, print_json, say
from newsletter.db import unit_of_work
from newsletter.dns_records import AuthoritativeDns
from newsletter.doctor import (
    Finding,
    check_dns,
    check_one_click,
    check_public_https,
    passed,
    record_verdict,
)
from newsletter.errors import NewsletterError


@app.command("doctor")
def doctor(
    ctx: typer.Context,
    live: Annotated[
        bool,
        typer.Option(
            "--live",
            help="Also POST a one-click unsubscribe to [web] base_url for a throwaway subscriber "
            "and check base_url is a public https URL.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Check the sending domains' SPF, DKIM and DMARC at their authoritative name servers.

    One line per finding, with the record to publish when something is wrong. Exit code 0 when
    everything Gmail, Yahoo and Outlook.com require passes, 1 otherwise.
    """
    state: State = ctx.obj
    settings = state.settings
    conf = settings.doctor
    dns = AuthoritativeDns.from_settings(conf.nameservers, conf.timeout_seconds)
    findings = check_dns(settings, dns, state.clock.now())
    if live:
        # SIGTERM (cron, a monitor's timeout) ends the check through its cleanup: otherwise the
        # throwaway subscriber would stay on the first list, in the next campaign's audience.
        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            one_click = check_one_click(
                settings, state.factory(), state.clock.now, timeout=conf.timeout_seconds
            )
        except Terminated:
            say("stopped:", "yellow", "terminated (SIGTERM) during the live check")
            raise typer.Exit(128 + signal.SIGTERM) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
        findings += [one_click, check_public_https(settings)]
    ok = passed(findings)
    if as_json:
        print_json([f.as_json() for f in findings])
    else:
        for finding in findings:
            show(finding)
    try:
        with unit_of_work(state.factory()) as session:
            record_verdict(
                session,
                now=state.clock.now(),
                actor=state.actor,
                ok=ok,
                failed=sum(not f.ok for f in findings),
            )
    except NewsletterError as e:
        say("verdict not recorded:", "yellow", e)
    if not as_json:
        console.print(Text("passes" if ok else "does not pass", style="green" if ok else "red"))
    if not ok:
        raise typer.Exit(1)


class Terminated(BaseException):
    """SIGTERM arrived: a BaseException, so that no `except Exception` on the way swallows it."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    # A second SIGTERM is ignored: it would break off the cleanup the first one runs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def show(finding: Finding) -> None:
    """One line for a finding, and the record to publish under it."""
    line = Text("ok  " if finding.ok else "FAIL", style="green" if finding.ok else "red")
    line.append(f" {finding.identity} {finding.check}: {one_line(finding.message)}")
    console.print(line, soft_wrap=True)
    if finding.record_to_publish:
        console.print(f"     publish: {one_line(finding.record_to_publish)}", soft_wrap=True)
