"""Build the message one recipient gets: headers, a text and an HTML part, stable Message-ID."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from urllib.parse import quote

from newsletter.config import Settings
from newsletter.render import RenderedVariant, personalise
from newsletter.tokens import make_token

# Folding at 78 columns made the email package RFC 2047-encode the long List-Unsubscribe URLs,
# which mail clients then cannot read. That header is set raw, folded between its two URLs (a
# line under RFC 5322's 998), and this policy leaves raw headers as they are.
POLICY = SMTP.clone(refold_source="none")


@dataclass(frozen=True)
class Recipient:
    subscriber_id: int
    email: str
    name: str


@dataclass(frozen=True)
class ListInfo:
    id: int
    slug: str
    list_id: str


def message_id(*, campaign_id: int, subscriber_id: int, secret: str, domain: str) -> str:
    """The same Message-ID for the same (campaign, subscriber), every time it is built."""
    tag = hmac.new(secret.encode(), f"{campaign_id}:{subscriber_id}".encode(), hashlib.sha256)
    return f"<{campaign_id}.{subscriber_id}.{tag.hexdigest()[:16]}@{domain}>"


def link_urls(*, recipient: Recipient, mlist: ListInfo, settings: Settings) -> dict[str, str]:
    """The recipient's signed unsubscribe and preferences links (https and mailto)."""
    secret = settings.security.require_secret()
    base = settings.web.base_url.rstrip("/")
    unsub = make_token(
        secret=secret,
        purpose="unsubscribe",
        subscriber_id=recipient.subscriber_id,
        list_id=mlist.id,
    )
    prefs = make_token(
        secret=secret,
        purpose="preferences",
        subscriber_id=recipient.subscriber_id,
        list_id=mlist.id,
    )
    return {
        "unsubscribe": f"{base}/u/{unsub}",
        "preferences": f"{base}/preferences/{prefs}",
        "mailto": f"mailto:{settings.mail.unsubscribe_address}"
        f"?subject={quote('unsubscribe ' + unsub)}",
    }


def build_message(
    *,
    variant: RenderedVariant,
    campaign_id: int,
    recipient: Recipient,
    mlist: ListInfo,
    settings: Settings,
    now: datetime,
) -> EmailMessage:
    """Personalise a rendered variant for one recipient and wrap it with every header we promise."""
    urls = link_urls(recipient=recipient, mlist=mlist, settings=settings)
    html, text = personalise(
        variant, unsubscribe_url=urls["unsubscribe"], preferences_url=urls["preferences"]
    )
    mail = settings.mail
    domain = mail.from_address.rpartition("@")[2]
    msg = EmailMessage(policy=POLICY)
    msg["From"] = Address(mail.from_name, addr_spec=mail.from_address)
    msg["To"] = Address(recipient.name, addr_spec=recipient.email)
    msg["Subject"] = " ".join(variant.subject.split())
    msg["Date"] = format_datetime(now)
    msg["Message-ID"] = message_id(
        campaign_id=campaign_id,
        subscriber_id=recipient.subscriber_id,
        secret=settings.security.require_secret(),
        domain=domain,
    )
    msg["List-Id"] = f"{mlist.slug} <{mlist.list_id}>"
    msg.set_raw("List-Unsubscribe", f"<{urls['unsubscribe']}>,\r\n <{urls['mailto']}>")
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    return msg
