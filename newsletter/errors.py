"""The one exception tree of the service.

Every error the service raises on purpose descends from NewsletterError and carries a one-line
message that says what went wrong and, where it can, what to do about it::

    NewsletterError
    ├── ConfigError                 bad or missing setting (names the key and the file)
    ├── DatabaseError               the database cannot be opened or migrated
    ├── FeedError                   a source could not be ingested
    │   ├── FeedFetchError          network / HTTP / file problem
    │   └── FeedParseError          not a feed, malformed, hostile
    ├── AudienceError               bad list, subscriber or CSV data
    │   ├── KeptOutError            a bounced address asks to rejoin (subscriptions.py)
    │   └── SegmentError            a segment rule that does not parse (segments.py; with position)
    ├── CampaignError               nothing to send, unknown item or campaign, wrong state
    │   ├── CheckError              the pre-send check refused a campaign (check.py; all problems)
    │   ├── MissingVariantError     a sending campaign has no rendered variant: the sender pauses
    │   │                           it with this as the reason (send.py)
    │   └── ApprovalError           an approval the rules refuse: the author, a stale revision,
    │                               a role that may not approve (approvals.py)
    ├── RenderError                 a template failed to render
    │   └── ScreenshotError         no chromium, or it failed (screenshot.py)
    ├── TokenError                  a forged, altered or expired signed token
    ├── StaffError                  a staff account cannot be made or changed as asked (staff.py)
    │   ├── PasswordPolicyError     a password too short or too common
    │   └── SignInError             a sign-in refused (one message whatever was wrong)
    │       └── ThrottledError      too many failures: try after retry_after seconds
    ├── WorkerError                 a `send --workers` child process failed
    ├── UnreadableMailError         a received message that cannot be read safely (bounces.py):
    │                               set aside, never retried as is
    └── DeliveryError               one message cannot be delivered
        ├── TemporaryDeliveryError  try later (reserved: the transport returns such outcomes)
        └── PermanentDeliveryError  never: e.g. a message that cannot be built (message.py); the
                                    sender records it failed without sending

SMTP replies and transport failures (refused connection, time-out, TLS) are values, not
exceptions: `smtp.Outcome` (sent, temporary, permanent) is what the sender records. A bug in the
transport (a TypeError, an AttributeError) is not a delivery outcome: it raises.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``. An error made with
``.of(N_("the %(lang)s text has no title"), lang=lang)`` keeps its English line as ``str(error)``
and also its ``template`` and ``params``, so the staff console can show it in the staffer's
language (console_i18n.translate_error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self


class NewsletterError(Exception):
    """Base of every error the service raises on purpose."""

    exit_code = 1
    template: str | None = None  # the English %-format of a translatable message, else None
    params: Mapping[str, object] = {}

    @classmethod
    def of(cls, template: str, /, **params: object) -> Self:
        """The error with a translatable message: str() is ``template % params``, in English."""
        return cls(template % params).keeping(template, params)

    def keeping(self, template: str, params: Mapping[str, object]) -> Self:
        """Keep the message's template and params (for a subclass with its own __init__)."""
        self.template, self.params = template, dict(params)
        return self


class ConfigError(NewsletterError):
    """A setting is unknown, missing or has a bad value."""

    exit_code = 2


class DatabaseError(NewsletterError):
    """The database cannot be reached or brought up to date."""


class FeedError(NewsletterError):
    """A source could not be ingested."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


class FeedFetchError(FeedError):
    """The feed could not be fetched (network, HTTP status, missing file)."""


class FeedParseError(FeedError):
    """The document is not a feed we accept (malformed, hostile, wrong encoding)."""


class AudienceError(NewsletterError):
    """Bad list, segment or subscriber data."""


class KeptOutError(AudienceError):
    """An address that bounced for good asks to rejoin a list; only a fresh confirmation can."""


class CampaignError(NewsletterError):
    """A campaign cannot be made or changed as asked."""


class MissingVariantError(CampaignError):
    """A sending campaign has no rendered variant in a reader's language nor the default one."""

    def __init__(self, campaign_id: int, lang: str, default: str) -> None:
        self.campaign_id = campaign_id
        self.lang = lang
        super().__init__(
            f"campaign {campaign_id} has no rendered variant in '{lang}' nor in the default "
            f"language '{default}': check [render] default_language (a language the campaign "
            f"was rendered in), then `newsletter campaigns resume {campaign_id}`"
        )


class RenderError(NewsletterError):
    """A template could not be rendered."""


class TokenError(NewsletterError):
    """A signed token is forged, altered, expired or for another purpose."""


class StaffError(NewsletterError):
    """A staff account cannot be made, enrolled or changed as asked."""


class PasswordPolicyError(StaffError):
    """A password the policy refuses: too short, too common, or the account's own address."""


class SignInError(StaffError):
    """A sign-in or second-factor step refused; the message never says which part was wrong."""


class ThrottledError(SignInError):
    """Too many failed attempts from this client or for this account: wait, then try again."""

    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(f"too many attempts: try again in {retry_after} seconds")


class ApprovalError(CampaignError):
    """The approval rules refuse this: the author approving, a stale revision, a wrong role."""


class WorkerError(NewsletterError):
    """A sender worker process ended with an error; its own message is on stderr above."""


class DeliveryError(NewsletterError):
    """An SMTP delivery failed."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        self.code = code
        super().__init__(message)


class TemporaryDeliveryError(DeliveryError):
    """A 4xx reply or a dropped connection: try again later."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply: do not try again."""
