"""Staff accounts for the console: add, enrol, reset, disable, roles, and the password policy.

An account is added from the CLI with a one-time enrolment link; the link sets the password
(Argon2id) and the TOTP secret, and gives ten single-use recovery codes. Only hashes are kept:
the link's secret as sha256, recovery codes as HMAC-SHA256 keyed with the account's TOTP secret.

The common-password list, data/common-passwords.txt.gz, is Django's
(django/contrib/auth/common-passwords.txt.gz, Django 5.2, BSD-3-Clause, © Django Software
Foundation; the list itself was compiled by Royce Williams): 20,000 passwords, one a line.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyotp
import segno
from argon2 import PasswordHasher
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from newsletter.addresses import normalise_email
from newsletter.audit import record_event
from newsletter.config import Settings
from newsletter.db.models import Staff, StaffRecoveryCode, StaffRole, StaffSession
from newsletter.errors import AudienceError, PasswordPolicyError, SignInError, StaffError
from newsletter.i18n import N_

ROLES = tuple(role.value for role in StaffRole)
MIN_PASSWORD_LENGTH = 12
RECOVERY_CODES = 10
# No 0/o, 1/l/i: a recovery code is read off paper and typed on a phone.
RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
TOTP_INTERVAL = 30
BAD_ENROLMENT_LINK = N_("this enrolment link is not valid or has expired")
COMMON_PASSWORDS = Path(__file__).parent / "data" / "common-passwords.txt.gz"

hasher = PasswordHasher()  # Argon2id with argon2-cffi's defaults


@dataclass(frozen=True)
class StaffView:
    """What the console and the CLI show of an account (no secrets)."""

    id: int
    email: str
    name: str
    role: str
    language: str
    training: bool
    enrolled: bool
    disabled: bool

    def may_approve(self) -> bool:
        """Approvers and admins may approve alerts (never their own: approvals.py)."""
        return self.role in (StaffRole.APPROVER, StaffRole.ADMIN)

    def is_admin(self) -> bool:
        """Admins manage accounts and read the audit log."""
        return self.role == StaffRole.ADMIN


@dataclass(frozen=True)
class Enrolment:
    """What the enrolment page shows: the account, and the TOTP secret three ways."""

    staff: StaffView
    totp_secret: str
    otpauth_uri: str
    qr_svg: str


def view_of(staff: Staff) -> StaffView:
    """The account as shown, from its row."""
    return StaffView(
        id=staff.id,
        email=staff.email,
        name=staff.name,
        role=staff.role,
        language=staff.language,
        training=staff.training,
        enrolled=staff.enrolled_at is not None,
        disabled=staff.disabled_at is not None,
    )


def is_active(staff: Staff | None) -> bool:
    """An account that may sign in: it exists, is enrolled and is not disabled."""
    return (
        staff is not None
        and staff.enrolled_at is not None
        and staff.disabled_at is None
        and bool(staff.password_hash)
    )


@functools.cache
def common_passwords() -> frozenset[str]:
    """The common passwords, lower-cased, read once per process."""
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as f:
        return frozenset(line.strip().lower() for line in f if line.strip())


def password_problem(password: str, email: str) -> str | None:
    """Why the policy refuses a password, in English, or None (see password_refusal)."""
    refusal = password_refusal(password, email)
    return None if refusal is None else str(refusal)


def password_refusal(password: str, email: str) -> PasswordPolicyError | None:
    """The error to raise if the policy refuses a password: >= 12 chars, not common, not the
    address; else None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return PasswordPolicyError.of(
            N_("the password must be at least %(n)d characters long"), n=MIN_PASSWORD_LENGTH
        )
    lowered = password.lower()
    if lowered in common_passwords():
        return PasswordPolicyError.of(
            N_("this password is among the most common ones: choose another")
        )
    local = email.split("@", 1)[0].lower()
    if lowered == email.lower() or (len(local) >= 3 and local in lowered):
        return PasswordPolicyError.of(N_("the password must not contain your email address"))
    return None


def hash_token(token: str) -> str:
    """sha256 of a link's or cookie's secret, as stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def normal_code(code: str) -> str:
    """A code as typed, without case, spaces or dashes."""
    return "".join(code.split()).replace("-", "").lower()


def hash_recovery_code(code: str, *, totp_secret: str) -> str:
    """HMAC-SHA256 of a normalised recovery code (high-entropy, so a fast hash is enough)."""
    return hmac.new(totp_secret.encode(), normal_code(code).encode(), hashlib.sha256).hexdigest()


def new_recovery_code() -> str:
    """A random code like 'abcd-efgh-jkmn' (about 59 bits)."""
    chars = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(12))
    return f"{chars[:4]}-{chars[4:8]}-{chars[8:]}"


def totp_step(now: datetime) -> int:
    """The TOTP time step `now` falls in."""
    return int(now.timestamp()) // TOTP_INTERVAL


def matched_step(secret: str, code: str, *, now: datetime, after: int) -> int | None:
    """The time step (now, or one either side) whose code this is, if above `after`; else None.

    pyotp's verify() does not say which step matched; the step is what replay refusal needs.
    """
    typed = normal_code(code)
    if not secret or len(typed) != 6 or not typed.isdigit():
        return None
    totp = pyotp.TOTP(secret, interval=TOTP_INTERVAL)
    found = None
    current = totp_step(now)
    for step in (current - 1, current, current + 1):  # valid_window=1; check all: even time
        if hmac.compare_digest(totp.generate_otp(step), typed) and step > after:
            found = step
    return found


def claim_totp_step(session: Session, *, staff_id: int, step: int) -> bool:
    """Record `step` as used unless it or a later one already was (compare-and-set: two
    requests with the same code cannot both pass)."""
    result = session.execute(
        update(Staff)
        .where(Staff.id == staff_id, Staff.totp_last_step < step)
        .values(totp_last_step=step)
        .execution_options(synchronize_session=False)
    )
    claimed = bool(getattr(result, "rowcount", 0))
    if claimed:
        staff = session.get(Staff, staff_id)
        if staff is not None:
            session.refresh(staff)
    return claimed


def end_sessions(
    session: Session, *, staff_id: int | None, now: datetime, except_session: str | None = None
) -> int:
    """Revoke the live sessions of one account (or everyone's); returns how many."""
    stmt = update(StaffSession).where(StaffSession.revoked_at.is_(None))
    if staff_id is not None:
        stmt = stmt.where(StaffSession.staff_id == staff_id)
    if except_session is not None:
        stmt = stmt.where(StaffSession.id != except_session)
    result = session.execute(
        stmt.values(revoked_at=now).execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise StaffError(f"unknown role '{role}': use one of {', '.join(ROLES)}")
    return role


def _find(session: Session, email: str) -> Staff:
    try:
        address = normalise_email(email)
    except AudienceError as e:
        raise StaffError(str(e)) from None
    staff = session.scalar(select(Staff).where(Staff.email == address))
    if staff is None:
        raise StaffError(f"no staff account for {address}: see `newsletter staff list`")
    return staff


def find_staff(session: Session, email: str) -> Staff | None:
    """The account with this address, or None (also for a malformed address)."""
    try:
        address = normalise_email(email)
    except AudienceError:
        return None
    return session.scalar(select(Staff).where(Staff.email == address))


def _new_enrolment(staff: Staff, *, now: datetime, settings: Settings) -> str:
    """Give the account a fresh enrolment link; returns its URL."""
    token = secrets.token_urlsafe(32)
    staff.enrol_token_hash = hash_token(token)
    staff.enrol_expires_at = now + timedelta(hours=settings.console.enrol_hours)
    return f"{settings.console.base_url.rstrip('/')}/enrol/{token}"


def add_staff(
    session: Session,
    *,
    email: str,
    role: str,
    name: str,
    now: datetime,
    actor: str,
    settings: Settings,
) -> str:
    """Add an account and return its one-time enrolment URL."""
    try:
        address = normalise_email(email)
    except AudienceError as e:
        raise StaffError(str(e)) from None
    _check_role(role)
    if session.scalar(select(Staff.id).where(Staff.email == address)) is not None:
        raise StaffError(f"{address} already has a staff account (`newsletter staff reset` it?)")
    staff = Staff(email=address, name=name, role=role, created_at=now)
    url = _new_enrolment(staff, now=now, settings=settings)
    session.add(staff)
    session.flush()
    record_event(session, now=now, actor=actor, action="staff.added", staff=address, role=role)
    return url


def reset_staff(
    session: Session, *, email: str, now: datetime, actor: str, settings: Settings
) -> str:
    """Clear password, TOTP, recovery codes and sessions; return a new enrolment URL."""
    staff = _find(session, email)
    staff.password_hash = ""
    staff.totp_secret = ""
    staff.totp_last_step = 0
    staff.enrolled_at = None
    session.execute(delete(StaffRecoveryCode).where(StaffRecoveryCode.staff_id == staff.id))
    ended = end_sessions(session, staff_id=staff.id, now=now)
    url = _new_enrolment(staff, now=now, settings=settings)
    record_event(
        session,
        now=now,
        actor=actor,
        action="staff.enrolment_reset",
        staff=staff.email,
        sessions_ended=ended,
    )
    return url


def disable_staff(session: Session, *, email: str, now: datetime, actor: str) -> StaffView:
    """Disable an account: its sessions and any enrolment link stop working at once."""
    staff = _find(session, email)
    if staff.disabled_at is None:
        staff.disabled_at = now
    staff.enrol_token_hash = None
    staff.enrol_expires_at = None
    ended = end_sessions(session, staff_id=staff.id, now=now)
    record_event(
        session,
        now=now,
        actor=actor,
        action="staff.disabled",
        staff=staff.email,
        sessions_ended=ended,
    )
    return view_of(staff)


def set_role(session: Session, *, email: str, role: str, now: datetime, actor: str) -> StaffView:
    """Change an account's role."""
    staff = _find(session, email)
    before, staff.role = staff.role, _check_role(role)
    record_event(
        session,
        now=now,
        actor=actor,
        action="staff.role_changed",
        staff=staff.email,
        before=before,
        after=role,
    )
    return view_of(staff)


def set_training(
    session: Session, *, email: str, training: bool, now: datetime, actor: str
) -> StaffView:
    """Turn an account's training mode on or off."""
    staff = _find(session, email)
    staff.training = training
    record_event(
        session,
        now=now,
        actor=actor,
        action="staff.training_changed",
        staff=staff.email,
        training=training,
    )
    return view_of(staff)


def list_staff(session: Session) -> list[StaffView]:
    """Every account, by address."""
    return [view_of(s) for s in session.scalars(select(Staff).order_by(Staff.email))]


def get_staff(session: Session, staff_id: int) -> StaffView:
    """One account by id."""
    staff = session.get(Staff, staff_id)
    if staff is None:
        raise StaffError(f"no staff account {staff_id}")
    return view_of(staff)


def active_staff_emails(session: Session, *, roles: tuple[str, ...] = ROLES) -> list[str]:
    """The addresses of enrolled, enabled accounts with one of `roles`."""
    rows = session.scalars(
        select(Staff.email)
        .where(
            Staff.role.in_(roles),
            Staff.enrolled_at.is_not(None),
            Staff.disabled_at.is_(None),
        )
        .order_by(Staff.email)
    )
    return list(rows)


def _by_token(session: Session, token: str, now: datetime) -> Staff:
    staff = session.scalar(select(Staff).where(Staff.enrol_token_hash == hash_token(token)))
    if (
        staff is None
        or staff.disabled_at is not None
        or staff.enrol_expires_at is None
        or staff.enrol_expires_at <= now
    ):
        raise SignInError.of(BAD_ENROLMENT_LINK)
    return staff


def begin_enrolment(
    session: Session, *, token: str, now: datetime, settings: Settings
) -> Enrolment:
    """The enrolment page's content; the TOTP secret is made once per link and kept."""
    staff = _by_token(session, token, now)
    if not staff.totp_secret:
        staff.totp_secret = pyotp.random_base32()
    uri = pyotp.TOTP(staff.totp_secret, interval=TOTP_INTERVAL).provisioning_uri(
        name=staff.email, issuer_name=settings.brand.name
    )
    svg = segno.make(uri, error="m").svg_inline(scale=4, title="QR code for the sign-in app")
    return Enrolment(view_of(staff), staff.totp_secret, uri, svg)


def complete_enrolment(
    session: Session,
    *,
    token: str,
    password: str,
    password_again: str,
    code: str,
    now: datetime,
    client: str,
) -> list[str]:
    """Set the password and confirm the TOTP app; returns the recovery codes (shown once)."""
    staff = _by_token(session, token, now)
    if password != password_again:
        raise PasswordPolicyError.of(N_("the two passwords are not the same"))
    if (refusal := password_refusal(password, staff.email)) is not None:
        raise refusal
    step = matched_step(staff.totp_secret, code, now=now, after=staff.totp_last_step)
    if step is None:
        raise SignInError.of(N_("the code is wrong: check the time on your phone and try again"))
    staff.password_hash = hasher.hash(password)
    staff.totp_last_step = step
    staff.enrolled_at = now
    staff.enrol_token_hash = None
    staff.enrol_expires_at = None
    codes = [new_recovery_code() for _ in range(RECOVERY_CODES)]
    session.execute(delete(StaffRecoveryCode).where(StaffRecoveryCode.staff_id == staff.id))
    session.add_all(
        StaffRecoveryCode(
            staff_id=staff.id, code_hash=hash_recovery_code(c, totp_secret=staff.totp_secret)
        )
        for c in codes
    )
    record_event(session, now=now, actor=staff.email, action="staff.enrolled", client=client)
    return codes


def use_recovery_code(session: Session, *, staff: Staff, code: str, now: datetime) -> bool:
    """Spend one unused recovery code of this account; False if it is not one."""
    digest = hash_recovery_code(code, totp_secret=staff.totp_secret)
    result = session.execute(
        update(StaffRecoveryCode)
        .where(
            StaffRecoveryCode.staff_id == staff.id,
            StaffRecoveryCode.code_hash == digest,
            StaffRecoveryCode.used_at.is_(None),
        )
        .values(used_at=now)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0))
