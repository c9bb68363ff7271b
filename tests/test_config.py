"""Settings: the example file equals the defaults, and bad files stop with one clear line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from newsletter.config import Settings, find_config, load_settings
from newsletter.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_equals_embedded_defaults() -> None:
    """config.example.toml repeats every embedded default, key for key."""
    example = load_settings(ROOT / "config.example.toml", {})
    defaults = load_settings(None, {})
    assert dataclasses.replace(example, source_path="") == dataclasses.replace(
        defaults, source_path=""
    )


def test_example_config_names_every_key() -> None:
    """Every settings key appears in config.example.toml (a new key must be documented)."""
    text = (ROOT / "config.example.toml").read_text()
    for section in dataclasses.fields(Settings):
        if section.name == "source_path":
            continue
        assert f"[{section.name}]" in text
        for key in dataclasses.fields(section.default_factory()):  # type: ignore[misc]
            assert f"\n{key.name} = " in text, f"{section.name}.{key.name} is not documented"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("[smtp]\nhots = 'x'\n", "unknown key 'smtp.hots'", id="unknown-key"),
        pytest.param("[smpt]\n", "unknown key 'smpt'", id="unknown-section"),
        pytest.param("[smtp]\nport = 'twenty-five'\n", "'smtp.port' must be int", id="bad-type"),
        pytest.param("[smtp]\nport = 70000\n", "'smtp.port'", id="bad-port"),
        pytest.param("[security]\nsecret = 'short'\n", "'security.secret'", id="short-secret"),
        pytest.param("[web]\nbase_url = 'ftp://x'\n", "'web.base_url'", id="bad-base-url"),
        pytest.param("[render]\nlanguages = ['en', 'xx']\n", "'render.languages'", id="bad-lang"),
        pytest.param("[sources]\nfeeds = [{ name = 'x' }]\n", "sources.feeds", id="feed-no-url"),
        pytest.param("[smtp\nport = 1\n", "not valid TOML", id="broken-toml"),
        pytest.param("[smtp]\nsecurity = 'ssl'\n", "'smtp.security'", id="bad-security"),
        pytest.param(
            "[alerts]\nwebhook_secret = '" + "\u00e9" * 40 + "'\n",
            "'alerts.webhook_secret' must be printable ASCII",
            id="webhook-secret-not-ascii",
        ),
        pytest.param(
            "[alerts]\nwebhook_secret = '" + "ab cd" * 8 + "'\n",
            "'alerts.webhook_secret' must be printable ASCII",
            id="webhook-secret-with-spaces",
        ),
        pytest.param(
            "[metrics]\ntoken = '" + "\u0436" * 40 + "'\n",
            "'metrics.token' must be printable ASCII",
            id="metrics-token-not-ascii",
        ),
        pytest.param(
            "[console]\ntrusted_proxies = ['proxy']\n",
            "'console.trusted_proxies[0]'",
            id="bad-console-proxy",
        ),
    ],
)
def test_bad_config_is_refused_with_key_and_file(
    tmp_path: Path, content: str, expected: str
) -> None:
    """A bad file stops loading with one line naming the file and the key."""
    path = tmp_path / "config.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    message = str(info.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message


def test_environment_overrides_file(tmp_path: Path) -> None:
    """NEWSLETTER_DATABASE_URL and NEWSLETTER_SECRET win over the file."""
    path = tmp_path / "config.toml"
    path.write_text("[database]\nurl = 'sqlite:///a.db'\n[security]\nsecret = '" + "a" * 40 + "'\n")
    env = {"NEWSLETTER_DATABASE_URL": "sqlite:///b.db", "NEWSLETTER_SECRET": "b" * 40}
    settings = load_settings(path, env)
    assert settings.database.url == "sqlite:///b.db"
    assert settings.security.secret == "b" * 40


def test_config_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--config, else $NEWSLETTER_CONFIG, else ./config.toml, else the embedded defaults."""
    monkeypatch.chdir(tmp_path)
    assert find_config(None, {}) is None
    (tmp_path / "config.toml").write_text("")
    assert find_config(None, {}) == Path("config.toml")
    assert find_config(None, {"NEWSLETTER_CONFIG": "/etc/n.toml"}) == Path("/etc/n.toml")
    assert find_config("x.toml", {"NEWSLETTER_CONFIG": "/etc/n.toml"}) == Path("x.toml")


def test_secret_has_no_usable_default() -> None:
    """Signing links without a configured secret stops with advice, rather than using a default."""
    with pytest.raises(ConfigError, match="NEWSLETTER_SECRET"):
        load_settings(None, {}).security.require_secret()
