"""Settings: read once at the edge from TOML, validated, and passed down typed and frozen.

The file is `--config FILE`, else `$NEWSLETTER_CONFIG`, else `./config.toml` if present, else the
embedded defaults (which `config.example.toml` repeats, key for key). `NEWSLETTER_DATABASE_URL` and
`NEWSLETTER_SECRET` override the file.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import urlsplit

from newsletter.errors import ConfigError

PLACEHOLDER_SECRET = "change-me"
MIN_SECRET_LENGTH = 32
LANGUAGES = ("en", "be", "ru")
# Fixed length (seven characters), used with fullmatch: constant time, whatever the value.
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///newsletter.db"


@dataclass(frozen=True)
class RelaySettings:
    """One more SMTP server to share the sending with ([smtp] itself is the first)."""

    host: str
    port: int = 25
    name: str = ""
    username: str = ""
    password: str = ""
    security: str = "none"
    timeout_seconds: float = 30.0
    final_reply_timeout_seconds: float = 600.0
    pool_size: int = 20
    weight: int = 1
    rate_per_second: float = 0.0
    hourly_limit: int = 0
    # The public addresses this relay sends from, for `newsletter doctor`'s SPF check.
    ips: tuple[str, ...] = ()

    @functools.cached_property  # asked once a message; a frozen dataclass never changes
    def label(self) -> str:
        """The name kept on each delivery this relay carried."""
        return self.name or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 8025
    username: str = ""
    password: str = ""
    security: str = "none"
    timeout_seconds: float = 30.0
    # The wait for the reply to a message's final dot: RFC 5321 4.5.3.2.6 gives it 10 minutes.
    final_reply_timeout_seconds: float = 600.0
    pool_size: int = 20
    batch_size: int = 200
    lease_seconds: int = 60
    retry_base_seconds: int = 60
    retry_deadline_hours: int = 72
    rate_per_second: float = 0.0
    hourly_limit: int = 0
    weight: int = 1
    failure_burst: int = 50
    complaint_pause_rate: float = 0.003
    complaint_min_delivered: int = 1000
    relays: tuple[RelaySettings, ...] = ()
    # The public addresses [smtp] itself sends from, for `newsletter doctor`'s SPF check.
    ips: tuple[str, ...] = ()

    def all_relays(self) -> tuple[RelaySettings, ...]:
        """[smtp] itself as the first relay, then [smtp] relays."""
        first = RelaySettings(
            host=self.host,
            port=self.port,
            username=self.username,
            password=self.password,
            security=self.security,
            timeout_seconds=self.timeout_seconds,
            final_reply_timeout_seconds=self.final_reply_timeout_seconds,
            pool_size=self.pool_size,
            weight=self.weight,
            rate_per_second=self.rate_per_second,
            hourly_limit=self.hourly_limit,
            ips=self.ips,
        )
        return (first, *self.relays)


@dataclass(frozen=True)
class MailSettings:
    from_address: str = "news@portal.example.org"
    from_name: str = "News from Ales Bialiatski"
    unsubscribe_address: str = "unsubscribe@portal.example.org"
    bounce_address: str = "bounces@portal.example.org"


@dataclass(frozen=True)
class DkimSettings:
    selector: str = ""
    domain: str = ""
    key_file: str = ""


@dataclass(frozen=True)
class FeedSource:
    url: str
    name: str = ""
    lang: str = "en"
    poll_minutes: int = 0


@dataclass(frozen=True)
class SourcesSettings:
    feeds: tuple[FeedSource, ...] = ()
    urgent_category: str = "urgent-action"
    timeout_seconds: float = 20.0
    max_bytes: int = 5_000_000
    concurrent_fetches: int = 4


@dataclass(frozen=True)
class DigestSettings:
    list: str = "weekly-digest"


@dataclass(frozen=True)
class AlertsSettings:
    list: str = "urgent-actions"
    mode: str = "approve"
    webhook_secret: str = ""
    # People other than the author who must approve an alert in the console.
    approvals_required: int = 1


@dataclass(frozen=True)
class ActionsSettings:
    """Urgent-action cases: their numbers, their list, the deadline reminder."""

    # Cases are numbered "<prefix> <n>/<yy>", n counting from 1 each year.
    prefix: str = "UA"
    # The list a case goes to when `actions create` is given none ("" = [alerts] list).
    list: str = ""
    # Days before the deadline the one reminder goes (0 = no reminder).
    remind_days_before: int = 2
    # An urgent item ingested also makes a draft case, held for staff to complete and send.
    from_urgent_items: bool = True


@dataclass(frozen=True)
class ConsoleSettings:
    """The staff console: its own listener, sessions and sign-in limits."""

    base_url: str = "http://127.0.0.1:8001"
    host: str = "127.0.0.1"
    port: int = 8001
    idle_minutes: int = 30
    max_hours: int = 12
    enrol_hours: int = 24
    # One person may send alone, with a fresh second-factor code and a written reason.
    break_glass: bool = False
    # Alerts go only to the staff's own addresses; self-approval allowed (and only here).
    training: bool = False
    # Failed sign-ins allowed per 15 minutes: per (account, client address), per client address;
    # and per UTC day per (account, client address). No ceiling per account: a few addresses
    # would then lock the owner out without even knowing the password.
    failures_per_account_client: int = 5
    failures_per_client: int = 20
    failures_per_account_client_day: int = 20
    # Failed second-factor codes allowed per 15 minutes: per (account, client address), and per
    # account from every address; and at an approval's step-up, per signed-in session.
    code_failures_per_account_client: int = 5
    code_failures_per_account: int = 15
    step_up_failures_per_session: int = 5
    # Proxies whose X-Forwarded-For the console believes; none by default, so the address it
    # throttles and audits is the connection's unless an operator names their proxy here.
    trusted_proxies: tuple[str, ...] = ()
    # The largest request body: the compose form in three languages, Cyrillic percent-encoded.
    max_body_bytes: int = 393216


@dataclass(frozen=True)
class LoggingSettings:
    format: str = "plain"
    level: str = "info"


@dataclass(frozen=True)
class ScheduleSettings:
    timezone: str = "Europe/Minsk"
    digest_cron: str = "0 9 * * mon"
    grace_hours: int = 24
    poll_minutes: int = 10
    send_interval_seconds: int = 5
    lock_seconds: int = 60


@dataclass(frozen=True)
class RenderSettings:
    default_language: str = "en"
    languages: tuple[str, ...] = LANGUAGES
    summary_max_chars: int = 600


@dataclass(frozen=True)
class BrandSettings:
    name: str = "News from Ales Bialiatski"
    postal_address: str = "Human Rights Centre Viasna supporters, PO Box 000, 00-000 Example City"
    mirror_url: str = ""
    accent_color: str = "#b3261e"
    logo_text: str = ""
    logo_url: str = ""
    footer_lines: tuple[str, ...] = ()
    accent_text_color: str = "#ffffff"
    background_color: str = "#f2f2f2"
    card_color: str = "#ffffff"
    text_color: str = "#1a1a1a"
    muted_color: str = "#595959"
    dark_accent_color: str = "#ff8a80"
    dark_background_color: str = "#121212"
    dark_card_color: str = "#1e1e1e"
    dark_text_color: str = "#ececec"
    dark_muted_color: str = "#b3b3b3"


@dataclass(frozen=True)
class CheckSettings:
    require_https: bool = True
    allowed_link_hosts: tuple[str, ...] = ()
    max_html_kb: int = 100
    max_subject_chars: int = 150


@dataclass(frozen=True)
class WebSettings:
    base_url: str = "http://127.0.0.1:8000"
    host: str = "127.0.0.1"
    port: int = 8000
    confirm_link_max_age_hours: int = 168
    max_connections: int = 1000
    max_connections_per_client: int = 20
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 20.0
    keep_alive_seconds: int = 5
    max_header_bytes: int = 16384
    max_body_bytes: int = 16384
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # The public signup form (GET/POST /subscribe) and the web copies' mirrors.
    signup_origins: tuple[str, ...] = ()
    confirm_resend_hours: int = 24
    signups_per_hour: int = 10
    signup_min_seconds: int = 3
    signup_noscript_seconds: int = 8
    signup_pow_bits: int = 16
    mirror_urls: tuple[str, ...] = ()
    email_mirror_en: str = ""
    email_mirror_be: str = ""
    email_mirror_ru: str = ""

    def email_mirror(self, lang: str) -> str:
        """The mirror an email in this language names: its own choice, else the first mirror."""
        chosen = str(getattr(self, f"email_mirror_{lang}", "") or "")
        return chosen or (self.mirror_urls[0] if self.mirror_urls else "")


@dataclass(frozen=True)
class ArchiveSettings:
    """The public web copies of sent campaigns: /archive and its Atom feed."""

    enabled: bool = True
    include_alerts: bool = True
    page_size: int = 20


@dataclass(frozen=True)
class MetricsSettings:
    token: str = ""


@dataclass(frozen=True)
class InboundSettings:
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 2525
    max_message_bytes: int = 1_048_576  # a bounce may carry the whole original digest
    idle_timeout_seconds: float = 60.0  # no command for this long closes the connection
    max_connections: int = 100  # open at once, all clients together
    max_connections_per_client: int = 10  # open at once from one client address


@dataclass(frozen=True)
class DiscreetSettings:
    """The neutral sending identity for readers who chose a discreet envelope.

    Nothing here should name the portal, the organisation, a list or a topic; ideally a domain of
    its own, with its own DKIM key and its own mirror of the web pages.
    """

    from_name: str = "Notes"
    from_address: str = "notes@notes.example.net"
    # VERP bounces on the neutral domain ([inbound] must receive mail for it too).
    bounce_address: str = "bounces@notes.example.net"
    # An optional mailto: unsubscribe address on the neutral domain; "" = the https link only.
    unsubscribe_address: str = ""
    # The List-Id's identifier: a neutral name under the neutral domain.
    list_id: str = "notes.notes.example.net"
    # Where the links in a discreet reader's mail point (a mirror); "" = [web] base_url.
    base_url: str = ""
    subject_en: str = "Weekly notes"
    subject_be: str = "Нататкі за тыдзень"
    subject_ru: str = "Заметки за неделю"
    dkim_selector: str = ""
    dkim_domain: str = ""
    dkim_key_file: str = ""

    def subject(self, lang: str) -> str:
        """The neutral subject in this language (English when that language has none)."""
        return str(getattr(self, f"subject_{lang}", "") or self.subject_en)

    def links_base(self, web_base_url: str) -> str:
        """The base URL of the links in a discreet reader's mail."""
        return self.base_url or web_base_url

    @property
    def configured(self) -> bool:
        """Whether a neutral host is set: without one a discreet reader's links (List-Unsubscribe
        too) would name the portal's host, so the pages do not offer discreet mail."""
        return bool(self.base_url)


@dataclass(frozen=True)
class OpenPgpSettings:
    """Encrypted mail for readers who give a public key."""

    # An armored secret key without passphrase: messages are signed with it and carry its public
    # key in an Autocrypt header. "" = encrypted, not signed.
    signing_key_file: str = ""
    # A reader whose key expires within this many days gets one encrypted reminder.
    expiry_reminder_days: int = 14


@dataclass(frozen=True)
class DoctorSettings:
    """`newsletter doctor`: where it asks DNS, and how long it waits."""

    # "host:port" (or "host") name servers asked for every name instead of the domains' own
    # authoritative servers (split DNS, tests); empty = find each zone's servers.
    nameservers: tuple[str, ...] = ()
    # The longest wait for one DNS or HTTP answer.
    timeout_seconds: float = 3.0


@dataclass(frozen=True)
class SecuritySettings:
    secret: str = ""

    def require_secret(self) -> str:
        """Return the secret for signed links, or stop if none is configured."""
        if not self.secret:
            raise ConfigError(
                "no secret for signed links: set [security] secret in config.toml "
                "or NEWSLETTER_SECRET (32+ random characters)"
            )
        return self.secret


@dataclass(frozen=True)
class Settings:
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    mail: MailSettings = field(default_factory=MailSettings)
    sources: SourcesSettings = field(default_factory=SourcesSettings)
    digest: DigestSettings = field(default_factory=DigestSettings)
    alerts: AlertsSettings = field(default_factory=AlertsSettings)
    actions: ActionsSettings = field(default_factory=ActionsSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    render: RenderSettings = field(default_factory=RenderSettings)
    brand: BrandSettings = field(default_factory=BrandSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    web: WebSettings = field(default_factory=WebSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    inbound: InboundSettings = field(default_factory=InboundSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    archive: ArchiveSettings = field(default_factory=ArchiveSettings)
    discreet: DiscreetSettings = field(default_factory=DiscreetSettings)
    openpgp: OpenPgpSettings = field(default_factory=OpenPgpSettings)
    doctor: DoctorSettings = field(default_factory=DoctorSettings)
    source_path: str = "(embedded defaults)"


def find_config(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """Pick the config file: --config, else $NEWSLETTER_CONFIG, else ./config.toml, else none."""
    if explicit:
        return Path(explicit)
    if environ.get("NEWSLETTER_CONFIG"):
        return Path(environ["NEWSLETTER_CONFIG"])
    local = Path("config.toml")
    return local if local.is_file() else None


def load_settings(path: Path | None, environ: Mapping[str, str]) -> Settings:
    """Read, validate and freeze the settings from a TOML file (or the defaults) and the env."""
    where = str(path) if path else "(embedded defaults)"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    if environ.get("NEWSLETTER_DATABASE_URL"):
        raw.setdefault("database", {})["url"] = environ["NEWSLETTER_DATABASE_URL"]
    if environ.get("NEWSLETTER_SECRET"):
        raw.setdefault("security", {})["secret"] = environ["NEWSLETTER_SECRET"]
    built: Settings = _build(Settings, raw, where, prefix="")
    settings = dataclasses.replace(built, source_path=where)
    validate_settings(settings)
    return settings


def _build(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Make dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source_path"}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown[0]}'")
    values = {}
    for name in names & set(raw):
        values[name] = _convert(hints[name], raw[name], where, f"{prefix}{name}")
    try:
        return cls(**values)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: [{prefix.rstrip('.')}] {e}") from None


def _convert(hint: Any, value: Any, where: str, key: str) -> Any:
    """Check one value against its declared type and convert TOML lists to tuples."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where, prefix=f"{key}.")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = getattr(hint, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list")
        inner = hint.__args__[0]
        return tuple(_convert(inner, v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{key}' must be {hint.__name__}, not {value!r}")
    return value


def validate_settings(settings: Settings) -> None:
    """Refuse values that are well-typed but unusable or unsafe."""
    where = settings.source_path
    secret = settings.security.secret
    if secret and (secret == PLACEHOLDER_SECRET or len(secret) < MIN_SECRET_LENGTH):
        raise ConfigError(
            f"{where}: 'security.secret' must be at least {MIN_SECRET_LENGTH} random characters "
            "(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if settings.smtp.security not in ("none", "starttls", "tls"):
        raise ConfigError(f"{where}: 'smtp.security' must be none, starttls or tls")
    if not 0 < settings.smtp.port < 65536:
        raise ConfigError(f"{where}: 'smtp.port' must be between 1 and 65535")
    for key, value in (
        ("smtp.pool_size", settings.smtp.pool_size),
        ("smtp.batch_size", settings.smtp.batch_size),
        ("smtp.lease_seconds", settings.smtp.lease_seconds),
    ):
        if value < 1:
            raise ConfigError(f"{where}: '{key}' must be at least 1")
    base = urlsplit(settings.web.base_url)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ConfigError(f"{where}: 'web.base_url' must be an http(s) URL")
    langs = settings.render.languages
    if not langs or any(lang not in LANGUAGES for lang in langs):
        raise ConfigError(f"{where}: 'render.languages' must be a non-empty subset of {LANGUAGES}")
    if settings.render.default_language not in langs:
        raise ConfigError(f"{where}: 'render.default_language' must be one of render.languages")
    for i, feed in enumerate(settings.sources.feeds):
        if feed.lang not in LANGUAGES:
            raise ConfigError(f"{where}: 'sources.feeds[{i}].lang' must be one of {LANGUAGES}")
    _validate_sources(settings)
    _validate_schedule(settings)
    _validate_web(settings)
    _validate_brand(settings)
    _validate_delivery(settings)
    _validate_inbound(settings)
    _validate_console(settings)
    _validate_doctor(settings)
    for key in ("from_address", "unsubscribe_address", "bounce_address"):
        if "@" not in getattr(settings.mail, key):
            raise ConfigError(f"{where}: 'mail.{key}' must be an email address")
    _validate_discreet(settings)


def _validate_discreet(settings: Settings) -> None:
    """The neutral identity needs addresses, a usable base URL and one-line subjects."""
    where, discreet = settings.source_path, settings.discreet
    for key in ("from_address", "bounce_address"):
        if "@" not in getattr(discreet, key):
            raise ConfigError(f"{where}: 'discreet.{key}' must be an email address")
    if discreet.unsubscribe_address and "@" not in discreet.unsubscribe_address:
        raise ConfigError(f"{where}: 'discreet.unsubscribe_address' must be an email address")
    if discreet.base_url:
        base = urlsplit(discreet.base_url)
        if base.scheme not in ("http", "https") or not base.netloc:
            raise ConfigError(f"{where}: 'discreet.base_url' must be an http(s) URL")
    for key in ("from_name", "list_id", "subject_en", "subject_be", "subject_ru"):
        value = getattr(discreet, key)
        if any(not c.isprintable() for c in value) or ("list_id" in key and not value):
            raise ConfigError(f"{where}: 'discreet.{key}' must be one line of text")
    if settings.openpgp.expiry_reminder_days < 0:
        raise ConfigError(f"{where}: 'openpgp.expiry_reminder_days' must be 0 or more")


def _validate_sources(settings: Settings) -> None:
    """A fetch needs a positive deadline and size cap, and at least one fetch at a time."""
    where, sources = settings.source_path, settings.sources
    if not sources.timeout_seconds > 0:
        raise ConfigError(f"{where}: 'sources.timeout_seconds' must be more than 0")
    if sources.max_bytes < 1:
        raise ConfigError(f"{where}: 'sources.max_bytes' must be at least 1")
    # 16 at most: each fetch briefly takes database connections (the pool holds 15 by default).
    if not 1 <= sources.concurrent_fetches <= 16:
        raise ConfigError(f"{where}: 'sources.concurrent_fetches' must be between 1 and 16")


def _validate_schedule(settings: Settings) -> None:
    """The time zone, the digest's crontab line and the alert mode must be usable."""
    from apscheduler.triggers.cron import CronTrigger

    where, sched = settings.source_path, settings.schedule
    try:
        CronTrigger.from_crontab(sched.digest_cron, timezone=sched.timezone)
    except (ValueError, LookupError) as e:
        raise ConfigError(f"{where}: 'schedule.digest_cron' or 'schedule.timezone': {e}") from None
    if settings.logging.format not in ("plain", "json"):
        raise ConfigError(f"{where}: 'logging.format' must be plain or json")
    if settings.logging.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{where}: 'logging.level' must be debug, info, warning or error")
    if settings.alerts.mode not in ("auto", "approve"):
        raise ConfigError(f"{where}: 'alerts.mode' must be auto or approve")
    secret = settings.alerts.webhook_secret
    if secret and len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{where}: 'alerts.webhook_secret' must be {MIN_SECRET_LENGTH}+ characters"
        )
    _require_header_safe(secret, "alerts.webhook_secret", where)
    for key in ("grace_hours", "poll_minutes", "send_interval_seconds", "lock_seconds"):
        if getattr(sched, key) < 1:
            raise ConfigError(f"{where}: 'schedule.{key}' must be at least 1")


def _validate_web(settings: Settings) -> None:
    """The listener's limits must be positive, its proxies addresses, a metrics token long."""
    where, web = settings.source_path, settings.web
    for key in (
        "max_connections",
        "max_connections_per_client",
        "header_timeout_seconds",
        "body_timeout_seconds",
        "keep_alive_seconds",
        "max_header_bytes",
        "max_body_bytes",
    ):
        if getattr(web, key) <= 0:
            raise ConfigError(f"{where}: 'web.{key}' must be greater than 0")
    for i, proxy in enumerate(web.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}: 'web.trusted_proxies[{i}]' must be an IP address or network"
            ) from None
    _validate_signup(settings)
    token = settings.metrics.token
    if token and len(token) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{where}: 'metrics.token' must be {MIN_SECRET_LENGTH}+ characters")
    _require_header_safe(token, "metrics.token", where)


def _require_header_safe(secret: str, key: str, where: str) -> None:
    """A secret an HTTP header carries: any other character than printable ASCII arrives
    changed (headers are read as Latin-1) and never matches."""
    if secret and not all("!" <= c <= "~" for c in secret):
        raise ConfigError(
            f"{where}: '{key}' must be printable ASCII without spaces "
            "(letters, digits, punctuation), as an HTTP header carries it"
        )


def _validate_signup(settings: Settings) -> None:
    """Signup origins are bare origins, mirrors http(s) base URLs, the limits usable."""
    where, web = settings.source_path, settings.web
    for i, origin in enumerate(web.signup_origins):
        parts = urlsplit(origin)
        bare = f"{parts.scheme}://{parts.netloc}"
        if parts.scheme not in ("http", "https") or not parts.netloc or origin != bare:
            raise ConfigError(
                f"{where}: 'web.signup_origins[{i}]' must be an origin like https://portal.example"
            )
    for i, url in enumerate(web.mirror_urls):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
            raise ConfigError(f"{where}: 'web.mirror_urls[{i}]' must be an http(s) base URL")
    for lang in LANGUAGES:
        chosen = getattr(web, f"email_mirror_{lang}")
        if chosen and chosen not in web.mirror_urls:
            raise ConfigError(f"{where}: 'web.email_mirror_{lang}' must be one of web.mirror_urls")
    for key in ("confirm_resend_hours", "signups_per_hour"):
        if getattr(web, key) < 1:
            raise ConfigError(f"{where}: 'web.{key}' must be at least 1")
    if web.signup_min_seconds < 0 or web.signup_noscript_seconds < web.signup_min_seconds:
        raise ConfigError(
            f"{where}: 'web.signup_noscript_seconds' must be >= web.signup_min_seconds >= 0"
        )
    if not 0 <= web.signup_pow_bits <= 24:
        raise ConfigError(f"{where}: 'web.signup_pow_bits' must be between 0 and 24")
    if settings.archive.page_size < 1:
        raise ConfigError(f"{where}: 'archive.page_size' must be at least 1")


def _validate_delivery(settings: Settings) -> None:
    """Refuse sending settings that would stall or misroute delivery."""
    where, smtp = settings.source_path, settings.smtp
    if smtp.failure_burst < 0 or smtp.hourly_limit < 0 or smtp.rate_per_second < 0:
        raise ConfigError(f"{where}: smtp rate, hourly_limit and failure_burst must be >= 0")
    if not 0 <= smtp.complaint_pause_rate <= 1 or smtp.complaint_min_delivered < 0:
        raise ConfigError(
            f"{where}: 'smtp.complaint_pause_rate' must be 0-1, 'complaint_min_delivered' >= 0"
        )
    if not smtp.final_reply_timeout_seconds > 0:
        raise ConfigError(f"{where}: 'smtp.final_reply_timeout_seconds' must be more than 0")
    for i, relay in enumerate(smtp.relays):
        key = f"smtp.relays[{i}]"
        if not relay.final_reply_timeout_seconds > 0:
            raise ConfigError(f"{where}: '{key}.final_reply_timeout_seconds' must be more than 0")
        if relay.security not in ("none", "starttls", "tls"):
            raise ConfigError(f"{where}: '{key}.security' must be none, starttls or tls")
        if not 0 < relay.port < 65536 or relay.pool_size < 1 or relay.weight < 0:
            raise ConfigError(f"{where}: '{key}' needs a port, pool_size >= 1 and weight >= 0")
    if smtp.weight < 0 or (smtp.weight == 0 and not any(r.weight for r in smtp.relays)):
        raise ConfigError(f"{where}: 'smtp.weight' must be >= 0 and some relay must weigh > 0")
    if bool(settings.dkim.key_file) != bool(settings.dkim.selector):
        raise ConfigError(f"{where}: 'dkim.key_file' and 'dkim.selector' must be set together")


def _validate_doctor(settings: Settings) -> None:
    """Relay ips must be IP addresses, doctor's name servers IP[:port], its timeout positive."""
    where, smtp = settings.source_path, settings.smtp
    named = [("smtp.ips", smtp.ips)]
    named += [(f"smtp.relays[{i}].ips", r.ips) for i, r in enumerate(smtp.relays)]
    for key, ips in named:
        for i, ip in enumerate(ips):
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ConfigError(f"{where}: '{key}[{i}]' must be an IP address") from None
    if not 0 < settings.doctor.timeout_seconds <= 60:
        raise ConfigError(f"{where}: 'doctor.timeout_seconds' must be more than 0, at most 60")
    for i, server in enumerate(settings.doctor.nameservers):
        try:
            split_server(server)
        except ValueError:
            raise ConfigError(
                f"{where}: 'doctor.nameservers[{i}]' must be an IP address, optionally with :port"
            ) from None


def split_server(server: str) -> tuple[str, int]:
    """A name server's address and port from "IP", "IP:port" or "[IPv6]:port" (ValueError)."""
    host, port = server, 53
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif server.count(":") == 1:
        host, _, text = server.partition(":")
        port = int(text)
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(server)
    return host, port


def _validate_inbound(settings: Settings) -> None:
    """The inbound server's limits must let at least one connection in, for some time."""
    where, inbound = settings.source_path, settings.inbound
    if inbound.idle_timeout_seconds <= 0:
        raise ConfigError(f"{where}: 'inbound.idle_timeout_seconds' must be more than 0")
    for key in ("max_message_bytes", "max_connections", "max_connections_per_client"):
        if getattr(inbound, key) < 1:
            raise ConfigError(f"{where}: 'inbound.{key}' must be at least 1")


def _validate_brand(settings: Settings) -> None:
    """Colours must be #rrggbb, the logo an https URL, the check's limits positive."""
    where = settings.source_path
    for f in dataclasses.fields(BrandSettings):
        value = getattr(settings.brand, f.name)
        if f.name.endswith("_color") and not _HEX_COLOR.fullmatch(value):
            raise ConfigError(f"{where}: 'brand.{f.name}' must be a colour like #1a2b3c")
    logo = settings.brand.logo_url
    if logo and urlsplit(logo).scheme != "https":
        raise ConfigError(f"{where}: 'brand.logo_url' must be an https URL (or empty)")
    for key in ("max_html_kb", "max_subject_chars"):
        if getattr(settings.check, key) < 1:
            raise ConfigError(f"{where}: 'check.{key}' must be at least 1")
    if settings.render.summary_max_chars < 80:
        raise ConfigError(f"{where}: 'render.summary_max_chars' must be at least 80")


def _validate_console(settings: Settings) -> None:
    """The console needs an http(s) base URL, a port, positive limits; approvals at least 1."""
    where, console = settings.source_path, settings.console
    base = urlsplit(console.base_url)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ConfigError(f"{where}: 'console.base_url' must be an http(s) URL")
    if not 0 < console.port < 65536:
        raise ConfigError(f"{where}: 'console.port' must be between 1 and 65535")
    for key in (
        "idle_minutes",
        "max_hours",
        "enrol_hours",
        "failures_per_account_client",
        "failures_per_client",
        "failures_per_account_client_day",
        "code_failures_per_account_client",
        "code_failures_per_account",
        "step_up_failures_per_session",
        "max_body_bytes",
    ):
        if getattr(console, key) < 1:
            raise ConfigError(f"{where}: 'console.{key}' must be at least 1")
    for i, proxy in enumerate(console.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}: 'console.trusted_proxies[{i}]' must be an IP address or network"
            ) from None
    if not 0 <= settings.actions.remind_days_before <= 60:
        raise ConfigError(f"{where}: 'actions.remind_days_before' must be between 0 and 60")
    prefix = settings.actions.prefix
    if not (1 <= len(prefix) <= 10 and prefix.isascii() and prefix.replace("-", "").isalnum()):
        raise ConfigError(f"{where}: 'actions.prefix' must be 1-10 letters or digits")
    if not 1 <= settings.alerts.approvals_required <= 10:
        raise ConfigError(f"{where}: 'alerts.approvals_required' must be between 1 and 10")
