"""Short emails to staff: an alert waits for review, an alert was sent alone (break-glass).

Plain text, in the "web" gettext domain as the other notices, and neutral on purpose: no alert
content travels by email (a phished or seized mailbox learns nothing but that there is a link to
the console, which needs a password and a second factor).
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from newsletter.config import Settings
from newsletter.htmltext import wrap_text
from newsletter.i18n import gettext_for
from newsletter.message import POLICY, set_subject
from newsletter.sanitize import clean_text


def approval_request_message(
    *, to: str, console_url: str, settings: Settings, now: datetime, lang: str = "en"
) -> EmailMessage:
    """Tell an approver that an alert waits for their review: only a link, no content."""
    _ = gettext_for(lang)
    body = "\n\n".join(
        (
            _("An alert is waiting for your review in the staff console."),
            console_url,
            _("Sign in to see it. This email says nothing more on purpose."),
        )
    )
    return _message(to, _("An alert is waiting for your review"), body, settings, now)


def break_glass_message(
    *,
    to: str,
    console_url: str,
    actor: str,
    reason: str,
    settings: Settings,
    now: datetime,
    lang: str = "en",
) -> EmailMessage:
    """Tell an approver that someone sent an alert alone: who, when, why, and a link."""
    _ = gettext_for(lang)
    who = clean_text(actor, max_length=320)
    lines = (
        _("%(who)s sent an alert without a second approval (break-glass).") % {"who": who},
        _("When: %(when)s") % {"when": now.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")},
        _("Reason given: %(reason)s") % {"reason": clean_text(reason, max_length=500)},
        _("See it in the staff console:"),
        console_url,
    )
    return _message(
        to, _("An alert was sent without a second approval"), "\n\n".join(lines), settings, now
    )


def _message(to: str, subject: str, body: str, settings: Settings, now: datetime) -> EmailMessage:
    mail = settings.mail
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(mail.from_name, addr_spec=mail.from_address)
    msg["To"] = to
    set_subject(msg, f"{settings.brand.name}: {subject}")
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = make_msgid(domain=mail.from_address.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(wrap_text(body + "\n"), subtype="plain", charset="utf-8")
    return msg
