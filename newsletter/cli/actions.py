"""`newsletter actions ...`: urgent-action cases, from the first message to the closing one."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from newsletter.audience import campaign_audience
from newsletter.case_files import (
    MAX_FILE_BYTES,
    Letter,
    parse_letter,
    parse_letter_option,
    parse_targets,
)
from newsletter.case_view import MAILTO_COMFORT, long_mailto_links
from newsletter.cases import (
    CaseDraft,
    Checked,
    close_case,
    create_case,
    edit_case,
    get_case,
    held_reminder,
    message_campaign,
    messages_of,
    names_person,
    readiness,
    recipients_count,
    send_first,
    send_reminder,
    send_update,
    wrote_count,
)
from newsletter.check import CheckError, Problem
from newsletter.cli import State, app, console, one_line, print_json, say
from newsletter.cli.alert import Confirmation, read_body, seen
from newsletter.cli.check import ChromiumOption, ForceOption, print_preview, print_problems
from newsletter.cli.progress import deliver_with_progress
from newsletter.db.models import ActionCase, Campaign, CaseOutcome, CaseRole, CaseStatus
from newsletter.db.queries import count_audience
from newsletter.errors import CampaignError
from newsletter.preview import preview_campaign
from newsletter.screenshot import find_chromium

actions_app = typer.Typer(
    help="Urgent-action cases: targets, deadline, letters; updates threaded under the first.",
    no_args_is_help=True,
)
app.add_typer(actions_app, name="actions")

CaseArg = Annotated[str, typer.Argument(help='The case: its id, or its number ("UA 12/26").')]
Title = Annotated[str | None, typer.Option("--title", help="The case's title.")]
BodyFile = Annotated[
    Path | None,
    typer.Option(
        "--body-file", help="The case: plain text (blank lines between paragraphs) or .html."
    ),
]
ActionsFile = Annotated[
    Path | None,
    typer.Option("--actions-file", help="What else readers are asked to do (text or .html)."),
]
Deadline = Annotated[
    str | None, typer.Option("--deadline", help="Last day to write, YYYY-MM-DD (portal time).")
]
TargetFile = Annotated[
    Path | None,
    typer.Option(
        "--target-file",
        help="TOML with one [[target]] per authority: name, title, email and/or postal, "
        "salutation, language.",
    ),
]
Letters = Annotated[
    list[str] | None,
    typer.Option(
        "--letter",
        help="LANG=FILE, a sample letter (first line may be 'Subject: ...'); once per language.",
    ),
]
Person = Annotated[str | None, typer.Option("--person", help="The person at risk.")]
PersonPrivate = Annotated[
    bool | None,
    typer.Option(
        "--person-private/--person-public",
        help="Whether the web copies show only the person's initials (emails carry the name).",
    ),
]
Yes = Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")]
QueueOnly = Annotated[
    bool, typer.Option("--queue-only", help="Queue only; leave the sending to `newsletter send`.")
]


def _read_text(path: Path) -> str:
    """A targets or letter file as text, read no further than a case file can be long.

    Read whole, a huge file (or a pipe or device that never ends) would fill memory before
    the parser's size check said a word.
    """
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise CampaignError(f"{path}: over {MAX_FILE_BYTES // 1024} KB; not a case file")
        text = data.decode("utf-8-sig")  # a byte order mark is not text
    except (OSError, UnicodeDecodeError) as e:
        raise CampaignError(f"{path}: cannot read it: {e}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text mode reads line ends


def _draft(
    *,
    title: str | None,
    body_file: Path | None,
    actions_file: Path | None,
    deadline: str | None,
    target_file: Path | None,
    letters: list[str] | None,
    person: str | None,
    person_private: bool | None,
    default_subject: str,
) -> CaseDraft:
    """What the options say, read and checked (files included), before anything is written."""
    day = None
    if deadline is not None:
        try:
            day = date.fromisoformat(deadline.strip())
        except ValueError:
            raise CampaignError(f"--deadline {deadline!r}: expected YYYY-MM-DD") from None
    targets = None
    if target_file is not None:
        targets = parse_targets(_read_text(target_file), where=str(target_file))
    chosen: dict[str, Letter] | None = None
    if letters:
        chosen = {}
        for value in letters:
            lang, path = parse_letter_option(value)
            if lang in chosen:
                raise CampaignError(f"--letter: two letters in {lang}")
            chosen[lang] = parse_letter(
                _read_text(Path(path)), where=path, default_subject=default_subject
            )
    return CaseDraft(
        title=title,
        body_html=read_body(body_file) if body_file is not None else None,
        actions_html=read_body(actions_file) if actions_file is not None else None,
        person=person,
        person_public=None if person_private is None else not person_private,
        deadline=day,
        targets=targets,
        letters=chosen,
    )


def _warn_about(case: ActionCase, state: State) -> None:
    for problem in readiness(case, settings=state.settings, now=state.clock.now()):
        say("to do:", "yellow", f"{case.reference}: {problem}")
    for lang, length in long_mailto_links(case):
        say(
            "warning:",
            "yellow",
            f"the {lang} letter makes a 'Write now' link of {length} characters: some mail "
            f"clients cut links over {MAILTO_COMFORT} (Outlook on Windows); a shorter letter "
            "opens whole everywhere",
        )
    if case.person.strip() and not case.person_public and names_person(case):
        say(
            "warning:",
            "yellow",
            "the person's name is not to be published, but the title or a text names them "
            "(the web copies show the title, the case and its updates as written; never letters)",
        )


@actions_app.command("create")
def create(
    ctx: typer.Context,
    title: Title = None,
    body_file: BodyFile = None,
    item: Annotated[
        str | None, typer.Option("--item", help="The portal item it is about: guid or link.")
    ] = None,
    deadline: Deadline = None,
    target_file: TargetFile = None,
    letter: Letters = None,
    actions_file: ActionsFile = None,
    person: Person = None,
    person_private: PersonPrivate = None,
    list_slug: Annotated[
        str | None, typer.Option("--list", help="List slug (default: [actions] list).")
    ] = None,
    segment: Annotated[
        str | None, typer.Option("--segment", help="Only the list's members in this segment.")
    ] = None,
    no_archive: Annotated[
        bool,
        typer.Option("--no-archive", help="Keep every message of the case out of the archive."),
    ] = False,
) -> None:
    """Make a case, numbered "UA <n>/<yy>", as a draft; send it with `actions send ID`."""
    state: State = ctx.obj
    if not title and not item:
        raise CampaignError("give --title (and --body-file), or --item GUID_OR_URL")
    draft = _draft(
        title=title,
        body_file=body_file,
        actions_file=actions_file,
        deadline=deadline,
        target_file=target_file,
        letters=letter,
        person=person,
        person_private=person_private,
        default_subject=title or "",
    )
    if no_archive:
        draft = replace(draft, archived=False)
    with state.factory().begin() as session:
        case = create_case(
            session,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            draft=draft,
            list_slug=list_slug,
            segment=segment,
            item_ref=item,
        )
        _fill_subjects(case)
        console.print(f"case {case.id}: {case.reference} ({case.status}) {one_line(case.title)}")
        _warn_about(case, state)


def _fill_subjects(case: ActionCase) -> None:
    """Letters given before the title was known (a case from an item) take it as subject."""
    letters = dict(case.letters or {})
    for lang, stored in letters.items():
        if not stored.get("subject"):
            letters[lang] = {**stored, "subject": case.title}
    case.letters = letters


@actions_app.command("edit")
def edit(
    ctx: typer.Context,
    case_ref: CaseArg,
    title: Title = None,
    body_file: BodyFile = None,
    deadline: Deadline = None,
    target_file: TargetFile = None,
    letter: Letters = None,
    actions_file: ActionsFile = None,
    person: Person = None,
    person_private: PersonPrivate = None,
) -> None:
    """Complete or change a draft case (an open case: its deadline only)."""
    state: State = ctx.obj
    with state.factory().begin() as session:
        case = get_case(session, case_ref)
        draft = _draft(
            title=title,
            body_file=body_file,
            actions_file=actions_file,
            deadline=deadline,
            target_file=target_file,
            letters=letter,
            person=person,
            person_private=person_private,
            default_subject=title or case.title,
        )
        edit_case(
            session,
            case=case,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            draft=draft,
        )
        _fill_subjects(case)
        console.print(f"case {case.id}: {case.reference} ({case.status}) changed")
        _warn_about(case, state)


def _held(session: Session, case: ActionCase) -> list[str]:
    held = held_reminder(session, case.id)
    if held is None or case.status == CaseStatus.CLOSED:
        return []
    return [
        f"its reminder (campaign {held}) is held; see `newsletter campaigns show {held}` and "
        f"send it with `newsletter actions remind {case.id} --force`"
    ]


def _summary(session: Session, case: ActionCase) -> dict[str, Any]:
    messages = messages_of(session, case.id)
    return {
        "id": case.id,
        "reference": case.reference,
        "status": case.status,
        "outcome": case.outcome,
        "title": case.title,
        "deadline": case.deadline.isoformat() if case.deadline else None,
        "list": case.mailing_list.slug,
        "recipients": recipients_count(session, case.id),
        "wrote": wrote_count(session, case.id),
        "updates": sum(1 for m in messages if m.role == CaseRole.UPDATE),
        "reminder_held": held_reminder(session, case.id) is not None
        and case.status != CaseStatus.CLOSED,
    }


@actions_app.command("list")
def list_cases(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only cases in this state: draft, open, updated, closed."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """The cases, newest first: number, state, deadline, recipients, how many wrote."""
    state: State = ctx.obj
    if status is not None and status not in set(CaseStatus):
        raise CampaignError(f"--status {status!r}: expected draft, open, updated or closed")
    with state.factory().begin() as session:
        stmt = select(ActionCase).order_by(ActionCase.id.desc())
        if status:
            stmt = stmt.where(ActionCase.status == status)
        rows = [_summary(session, c) for c in session.scalars(stmt)]
    if as_json:
        print_json(rows)
        return
    if not rows:
        console.print("no cases yet; make one with `newsletter actions create`")
    for r in rows:
        state_text = r["status"] + (f" ({r['outcome']})" if r["outcome"] else "")
        console.print(
            f"{r['id']:>4}  {r['reference']:<12} {state_text:<28} "
            f"deadline {r['deadline'] or '-':<10}  {r['recipients']} recipients, "
            f"{r['wrote']} wrote  {one_line(r['title'])}"
        )


@actions_app.command("show")
def show(
    ctx: typer.Context,
    case_ref: CaseArg,
    as_json: Annotated[bool, typer.Option("--json", help="JSON for scripts.")] = False,
) -> None:
    """One case: its state, deadline, targets, letters and messages."""
    state: State = ctx.obj
    with state.factory().begin() as session:
        case = get_case(session, case_ref)
        data: dict[str, Any] = _summary(session, case) | {
            "person": case.person,
            "person_public": case.person_public,
            "targets": list(case.targets or []),
            "letters": sorted(case.letters or {}),
            "messages": [
                {
                    "campaign": m.campaign_id,
                    "role": m.role,
                    "number": m.number,
                    "status": session.get(Campaign, m.campaign_id).status,  # type: ignore[union-attr]
                }
                for m in messages_of(session, case.id)
            ],
            "to_do": readiness(case, settings=state.settings, now=state.clock.now())
            if case.status == CaseStatus.DRAFT
            else _held(session, case),
        }
    if as_json:
        print_json(data)
        return
    console.print(f"{data['reference']}  {one_line(data['title'])}")
    console.print(
        f"  status: {data['status']}" + (f" ({data['outcome']})" if data["outcome"] else "")
    )
    console.print(f"  deadline: {data['deadline'] or '-'}   list: {data['list']}")
    if data["person"]:
        shown = "" if data["person_public"] else " (initials only on the web)"
        console.print(f"  person: {one_line(data['person'])}{shown}")
    console.print(f"  recipients: {data['recipients']}   said they wrote: {data['wrote']}")
    for t in data["targets"]:
        how = ", ".join(x for x in (t.get("email", ""), "postal" if t.get("postal") else "") if x)
        console.print(f"  target: {one_line(t.get('name', ''))} ({how})")
    console.print(f"  letters: {', '.join(data['letters']) or '-'}")
    for m in data["messages"]:
        label = f"update {m['number']}" if m["role"] == CaseRole.UPDATE else m["role"]
        console.print(f"  message: campaign {m['campaign']}, {label}, {m['status']}")
    for line in data["to_do"]:
        say("to do:", "yellow", line)


# One sending step in a transaction: the session, the check's callback (it asks), and the
# confirmation, for a step with a question of its own (closing a draft sends nothing to check).
Start = Callable[[Session, Checked, Confirmation], tuple[Campaign | None, int]]


def _launch(state: State, *, yes: bool, queue_only: bool, what: str, start: Start) -> None:
    """Run one sending step in a transaction, asking first; then deliver unless --queue-only.

    The question is asked with no transaction open, between two passes (see Confirmation).
    """
    if not yes and not sys.stdin.isatty():  # a script or a pipe: nobody to ask
        raise CampaignError(
            f"not sent: there is no terminal to confirm on; add --yes to send the {what}"
        )
    confirmation = Confirmation(yes=yes)

    def step(session: Session) -> tuple[int | None, int]:
        def confirm(campaign: Campaign, overridden: Sequence[Problem]) -> None:
            n = count_audience(session, campaign_audience(session, campaign))
            message = campaign.case_message
            named = f"{message.case.reference} ({one_line(message.case.title)})" if message else ""
            if confirmation.showing:
                print_problems(overridden, overridden=True)
                console.print(
                    f"{named}: the {what}, to {n} people on '{campaign.mailing_list.slug}'"
                )
            question = f"Send the {what} of {named} to {n} people?"
            shown = seen(session, campaign, question=question, recipients=n, overridden=overridden)
            confirmation.ask(question, shown, what=f"the {what} of {named}")

        try:
            campaign, queued = start(session, confirm, confirmation)
        except CheckError as e:
            print_problems(e.problems)
            raise
        return (campaign.id if campaign is not None else None), queued

    campaign_id, queued = confirmation.run(state.factory(), step)
    if campaign_id is None:
        console.print(f"{what}: done; no message to send")
        return
    console.print(f"campaign {campaign_id}: {what} queued for {queued} people")
    if not queue_only:
        deliver_with_progress(state, campaign_id=campaign_id)


@actions_app.command("send")
def send(
    ctx: typer.Context,
    case_ref: CaseArg,
    yes: Yes = False,
    queue_only: QueueOnly = False,
    force: ForceOption = False,
) -> None:
    """Send a case's first message (checked like every alert); asked twice, sent once."""
    state: State = ctx.obj

    def start(session: Session, confirm: Checked, _: Confirmation) -> tuple[Campaign | None, int]:
        case = get_case(session, case_ref)
        return send_first(
            session,
            case=case,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            force=force,
            on_checked=confirm,
        )

    _launch(state, yes=yes, queue_only=queue_only, what="first message", start=start)


@actions_app.command("update")
def update(
    ctx: typer.Context,
    case_ref: CaseArg,
    body_file: Annotated[
        Path, typer.Option("--body-file", help="The update: plain text or .html.")
    ],
    include_new: Annotated[
        bool,
        typer.Option(
            "--include-new", help="Also to people who joined the list after the first message."
        ),
    ] = False,
    yes: Yes = False,
    queue_only: QueueOnly = False,
    force: ForceOption = False,
) -> None:
    """Send the next update, threaded under each reader's first message of the case."""
    state: State = ctx.obj
    body = read_body(body_file)

    def start(
        session: Session, confirm: Checked, confirmation: Confirmation
    ) -> tuple[Campaign | None, int]:
        case = get_case(session, case_ref)
        says_name = not case.person_public and case.person.strip() and names_person(case, also=body)
        if says_name and confirmation.showing:  # said once, before the question
            say("warning:", "yellow", "the update names the person, whose name is not to be "
                "published: its web copy will show it")  # fmt: skip
        return send_update(
            session,
            case=case,
            body_html=body,
            include_new=include_new,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            force=force,
            on_checked=confirm,
        )

    _launch(state, yes=yes, queue_only=queue_only, what="update", start=start)


@actions_app.command("close")
def close(
    ctx: typer.Context,
    case_ref: CaseArg,
    outcome: Annotated[
        str,
        typer.Option("--outcome", help="released, improved, no-change or no-further-action."),
    ],
    body_file: Annotated[
        Path | None,
        typer.Option("--body-file", help="A word on the outcome: plain text or .html."),
    ] = None,
    yes: Yes = False,
    queue_only: QueueOnly = False,
    force: ForceOption = False,
) -> None:
    """Close a case with its outcome; its readers get a last threaded "thank you"."""
    state: State = ctx.obj
    if outcome not in set(CaseOutcome):
        raise CampaignError(
            f"--outcome {outcome!r}: expected released, improved, no-change or no-further-action"
        )
    body = read_body(body_file)

    def start(
        session: Session, confirm: Checked, confirmation: Confirmation
    ) -> tuple[Campaign | None, int]:
        case = get_case(session, case_ref)
        if case.status == CaseStatus.DRAFT:  # no message, so no check to ask in
            question = f"Close the draft {case.reference} ({one_line(case.title)})?"
            confirmation.ask(question, question, what=f"the draft {case.reference}")
        return close_case(
            session,
            case=case,
            outcome=outcome,
            body_html=body,
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            force=force,
            on_checked=confirm,
        )

    _launch(state, yes=yes, queue_only=queue_only, what="closing message", start=start)


@actions_app.command("remind")
def remind(
    ctx: typer.Context,
    case_ref: CaseArg,
    yes: Yes = False,
    queue_only: QueueOnly = False,
    force: ForceOption = False,
) -> None:
    """Send the deadline reminder now (the service sends it by itself when it is due)."""
    state: State = ctx.obj

    def start(session: Session, confirm: Checked, _: Confirmation) -> tuple[Campaign | None, int]:
        return send_reminder(
            session,
            case=get_case(session, case_ref),
            settings=state.settings,
            now=state.clock.now(),
            actor=state.actor,
            force=force,
            on_checked=confirm,
        )

    _launch(state, yes=yes, queue_only=queue_only, what="reminder", start=start)


@actions_app.command("preview")
def preview(
    ctx: typer.Context,
    case_ref: CaseArg,
    role: Annotated[
        str, typer.Option("--role", help="first, update, reminder or closing.")
    ] = "first",
    body_file: Annotated[
        Path | None, typer.Option("--body-file", help="The update's or closing's text.")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder to write the files to.")] = Path("preview"),
    screenshot: Annotated[
        bool, typer.Option("--screenshot", help="Also write PNGs at 375 and 800 px.")
    ] = False,
    chromium: ChromiumOption = None,
) -> None:
    """Write a case's message as .html, .txt and .eml files per language; sends nothing."""
    state: State = ctx.obj
    if role not in set(CaseRole):
        raise CampaignError(f"--role {role!r}: expected first, update, reminder or closing")
    browser = find_chromium(chromium) if screenshot else None
    session = state.factory()()
    try:
        case = get_case(session, case_ref)
        number = 1 + sum(1 for m in messages_of(session, case.id) if m.role == CaseRole.UPDATE)
        campaign = message_campaign(
            session,
            case,
            role=CaseRole(role),
            number=number if role == CaseRole.UPDATE else 0,
            body_html=read_body(body_file),
            now=state.clock.now(),
            actor=state.actor,
            settings=state.settings,
        )
        report = preview_campaign(
            session,
            campaign,
            settings=state.settings,
            out_dir=out,
            stem=f"case-{case.id}-{role}",
            now=state.clock.now(),
            chromium=browser,
        )
    finally:
        session.rollback()
        session.close()
    console.print(f"case {case_ref}: the {role} message; wrote:")
    print_preview(report)
