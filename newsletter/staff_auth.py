"""Signing in to the console: the password step, the code step, and step-up for approvals.

Throttling, not lockout. Failures are counted in fixed windows (throttle.py), and past a limit
the answer is ThrottledError, given before any password or code is checked:

- password step: per (account, client) and per client in 15 minutes; per (account, client) and
  per account in a UTC day, a slow ceiling on guessing from many addresses;
- code step: per (account, client), and per account from every client, in 15 minutes;
- step-up (an approval, a break-glass send): per signed-in session, so no one outside that
  session can make it fail.

Every per-account ceiling is above its per-(account, client) limit and a throttled try counts
only against the limit that refused it, so one address alone never reaches the ceiling: a
password-holder at one address cannot lock the owner out from elsewhere. A client is its
address, or an IPv6 address's /64 (one subscriber line owns a whole /64).

A refused attempt is committed before SignInError is raised: the caller's unit of work rolls
back on the error, and that must not undo the count or the audit event.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import secrets
from datetime import datetime

from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from newsletter import throttle
from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import Staff, StaffRecoveryCode
from newsletter.errors import SignInError, ThrottledError
from newsletter.i18n import N_
from newsletter.staff import (
    StaffView,
    claim_totp_step,
    find_staff,
    hasher,
    is_active,
    matched_step,
    use_recovery_code,
    view_of,
)

WRONG_PASSWORD = N_("the email address or password is wrong")
WRONG_CODE = N_("the code is wrong")
EXPIRED = N_("the sign-in took too long or is not valid: start again")
# errors.ThrottledError's own line, kept translatable here (errors.py imports nothing).
THROTTLED = N_("too many attempts: try again in %(seconds)s seconds")
PENDING_SECONDS = 5 * 60
WINDOW = throttle.WINDOW_SECONDS
DAY = 24 * 3600  # no longer than throttle.KEEP_SECONDS, which prune() keeps
# Who an unknown account's events are recorded for: what was typed may be a password.
UNKNOWN_ACTOR = "unknown"


@functools.cache
def dummy_hash() -> str:
    """An Argon2 hash of a random password, made once per process, to verify unknown accounts
    against: they take as long to refuse as a wrong password."""
    return hasher.hash(secrets.token_urlsafe(16))


def _serializer(secret: str) -> URLSafeSerializer:
    return URLSafeSerializer(secret, salt="newsletter.staff-pending")


def _fingerprint(staff: Staff) -> str:
    """Changes when the password does (a reset or re-enrolment voids pending sign-ins)."""
    return hashlib.sha256(staff.password_hash.encode()).hexdigest()[:16]


def _password_ok(stored: str, password: str) -> bool:
    try:
        return hasher.verify(stored or dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return False


def client_net(client: str) -> str:
    """What a client is counted as: its address, or an IPv6 address's /64."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _key(kind: str, *parts: str, secret: str) -> str:
    return throttle.limit_key(kind, "|".join(parts), secret=secret)


def _password_limits(email: str, client: str, settings: Settings) -> list[tuple[str, int, int]]:
    """The password step's (key, limit, window): per (account, client) and per client, and
    per (account, client) each day. None per account: a few addresses would lock the owner out
    without knowing the password; the code step bounds what a password-holder can guess."""
    secret = settings.security.require_secret()
    account, net, console = email.strip().lower(), client_net(client), settings.console
    return [
        (
            _key("signin-account-client", account, net, secret=secret),
            console.failures_per_account_client,
            WINDOW,
        ),
        (_key("signin-client", net, secret=secret), console.failures_per_client, WINDOW),
        (
            _key("signin-account-client-day", account, net, secret=secret),
            console.failures_per_account_client_day,
            DAY,
        ),
    ]


def _code_limits(staff_id: int, client: str, settings: Settings) -> list[tuple[str, int, int]]:
    """The code step's (key, limit, window): per (account, client), then per account.

    Why a ceiling, and why this one: one address stops at code_failures_per_account_client (5)
    in 15 minutes, and needs the password to get here at all. Across addresses the ceiling (15)
    bounds guessing at 15 x 96 = 1,440 codes a day, each with 3 in 1,000,000 accepted (a step
    either side), about 0.4% a day, where one address alone gets 480 (0.14%). Since 5 < 15, an
    attacker holding the password needs three addresses to reach it: one address cannot lock
    the owner out (a config that sets the ceiling at or below the first limit gives that up).
    """
    secret = settings.security.require_secret()
    console = settings.console
    return [
        (
            _key("signin-code-client", str(staff_id), client_net(client), secret=secret),
            console.code_failures_per_account_client,
            WINDOW,
        ),
        (
            _key("signin-code", str(staff_id), secret=secret),
            console.code_failures_per_account,
            WINDOW,
        ),
    ]


def _throttle(
    session: Session,
    *,
    limits: list[tuple[str, int, int]],
    now: datetime,
    actor: str,
    client: str,
    action: str = "staff.signin_throttled",
    **detail: object,
) -> None:
    """Raise ThrottledError if any (key, limit, window) is at its limit; audited once per key
    and window."""
    for key, limit, window in limits:
        wait = throttle.retry_after(session, key=key, limit=limit, window_seconds=window, now=now)
        if not wait:
            continue
        # Counting throttled tries too means only the first one is audited (count == limit):
        # a flood of refused requests does not flood the append-only events table. They count
        # on this key only, never towards another (an account's ceiling).
        if throttle.attempts(session, key=key, window_seconds=window, now=now) == limit:
            record_event(session, now=now, actor=actor, action=action, client=client, **detail)
        throttle.count_attempt(session, key=key, window_seconds=window, now=now)
        session.commit()
        raise ThrottledError(wait).keeping(THROTTLED, {"seconds": wait})


def _refuse(
    session: Session,
    *,
    limits: list[tuple[str, int, int]],
    now: datetime,
    actor: str,
    action: str,
    message: str,
    **detail: object,
) -> SignInError:
    """Count a failure on every key, audit it, commit; returns the error to raise."""
    for key, _, window in limits:
        throttle.count_attempt(session, key=key, window_seconds=window, now=now)
    record_event(session, now=now, actor=actor, action=action, **detail)
    session.commit()
    return SignInError.of(message)


def password_step(
    session: Session,
    *,
    email: str,
    password: str,
    client: str,
    now: datetime,
    settings: Settings,
) -> str:
    """Check email and password; return a signed pending token for the code step (5 minutes)."""
    secret = settings.security.require_secret()
    limits = _password_limits(email, client, settings)
    staff = find_staff(session, email)
    actor = staff.email if staff is not None else UNKNOWN_ACTOR
    _throttle(session, limits=limits, now=now, actor=actor, client=client, step="password")
    ok = _password_ok(staff.password_hash if staff is not None else "", password)
    if staff is None or not ok or not is_active(staff):
        raise _refuse(
            session,
            limits=limits,
            now=now,
            actor=actor,
            action="staff.signin_failed",
            message=WRONG_PASSWORD,
            client=client,
            reason="password",
        )
    if hasher.check_needs_rehash(staff.password_hash):
        staff.password_hash = hasher.hash(password)
    return str(_serializer(secret).dumps([staff.id, int(now.timestamp()), _fingerprint(staff)]))


def _pending_staff(session: Session, pending: str, *, now: datetime, secret: str) -> Staff:
    try:
        staff_id, issued, fingerprint = _serializer(secret).loads(pending)
    except (BadSignature, ValueError, TypeError):
        raise SignInError.of(EXPIRED) from None
    if not isinstance(staff_id, int) or not isinstance(issued, int):
        raise SignInError.of(EXPIRED)
    if not 0 <= now.timestamp() - issued <= PENDING_SECONDS:
        raise SignInError.of(EXPIRED)
    staff = session.get(Staff, staff_id)
    if staff is None or not is_active(staff) or fingerprint != _fingerprint(staff):
        raise SignInError.of(EXPIRED)
    return staff


def _totp_ok(session: Session, staff: Staff, code: str, now: datetime) -> bool:
    step = matched_step(staff.totp_secret, code, now=now, after=staff.totp_last_step)
    return step is not None and claim_totp_step(session, staff_id=staff.id, step=step)


def code_step(
    session: Session, *, pending: str, code: str, client: str, now: datetime, settings: Settings
) -> StaffView:
    """Check the TOTP code (or an unused recovery code) of a pending sign-in."""
    secret = settings.security.require_secret()
    staff = _pending_staff(session, pending, now=now, secret=secret)
    limits = _code_limits(staff.id, client, settings)
    _throttle(session, limits=limits, now=now, actor=staff.email, client=client, step="code")
    method = "totp"
    if not _totp_ok(session, staff, code, now):
        method = "recovery_code"
        if not use_recovery_code(session, staff=staff, code=code, now=now):
            raise _refuse(
                session,
                limits=limits,
                now=now,
                actor=staff.email,
                action="staff.signin_failed",
                message=WRONG_CODE,
                client=client,
                reason="code",
            )
    # This address's counts start again; the account's ceilings keep what others spent.
    password_limits = _password_limits(staff.email, client, settings)
    for key, _, _ in (limits[0], password_limits[0], password_limits[2]):
        throttle.clear(session, key=key)
    record_event(
        session,
        now=now,
        actor=staff.email,
        action="staff.signed_in",
        client=client,
        method=method,
        recovery_codes_left=recovery_codes_left(session, staff.id),
    )
    return view_of(staff)


def verify_step_up(
    session: Session,
    *,
    staff_id: int,
    session_id: str,
    code: str,
    now: datetime,
    settings: Settings,
    purpose: str,
) -> None:
    """A fresh TOTP code (no recovery code) before an approval or a break-glass send.

    Its failures count per signed-in session (`session_id`), apart from sign-in's: someone
    with the password guessing codes at the sign-in page cannot make an approval fail.
    """
    secret = settings.security.require_secret()
    staff = session.get(Staff, staff_id)
    if staff is None or not is_active(staff):
        raise SignInError.of(WRONG_CODE)
    key = _key("step-up", session_id, secret=secret)
    limits = [(key, settings.console.step_up_failures_per_session, WINDOW)]
    _throttle(
        session,
        limits=limits,
        now=now,
        actor=staff.email,
        client="",
        action="staff.step_up_failed",
        purpose=purpose,
        reason="throttled",
    )
    if not _totp_ok(session, staff, code, now):
        raise _refuse(
            session,
            limits=limits,
            now=now,
            actor=staff.email,
            action="staff.step_up_failed",
            message=WRONG_CODE,
            purpose=purpose,
            reason="code",
        )
    throttle.clear(session, key=key)
    record_event(session, now=now, actor=staff.email, action="staff.step_up", purpose=purpose)


def recovery_codes_left(session: Session, staff_id: int) -> int:
    """How many unused recovery codes an account has."""
    count = session.scalar(
        select(func.count()).where(
            StaffRecoveryCode.staff_id == staff_id, StaffRecoveryCode.used_at.is_(None)
        )
    )
    return int(count or 0)
