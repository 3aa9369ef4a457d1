"""The service's settings: `IOTHUB_*` environment variables over an optional TOML file.

Every setting is a flat field so that its environment variable is simply `IOTHUB_` + its name in
capitals, and the TOML file uses the same names as keys. Defaults are named constants with units.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg.conninfo
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ingestor import topics

ENV_PREFIX = "IOTHUB_"
TEST_PREFIX = "IOTHUB_TEST_"  # the test suite's own variables, not settings

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_CLIENT_ID = "iothub-ingestor"
DEFAULT_TOPICS = ("devices/{serial_id}/telemetry", "telemetry")
DEFAULT_KEEPALIVE = 30  # seconds
DEFAULT_SESSION_EXPIRY = 7 * 24 * 3600  # seconds: a week of outage is kept by the broker
DEFAULT_BATCH_SIZE = 5000  # messages per transaction at most
DEFAULT_BATCH_INTERVAL = 0.2  # seconds
DEFAULT_MAX_PENDING = 20_000  # messages received but not yet acknowledged
DEFAULT_MAX_PAYLOAD = 256 * 1024  # bytes
DEFAULT_MAX_STR_LEN = 1024  # characters
DEFAULT_FUTURE_TOLERANCE = 300.0  # seconds (5 minutes)
DEFAULT_MAX_AGE = 7 * 24 * 3600.0  # seconds (7 days)
DEFAULT_HTTP_PORT = 9108
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds
DEFAULT_STATS_INTERVAL = 10.0  # seconds
DEFAULT_NO_DATA_CHECK = 10.0  # seconds
DEFAULT_NO_DATA_MAX_BACKLOG = 5.0  # seconds: older unacknowledged messages defer no_data verdicts
DEFAULT_OUTBOX_POLL = 0.5  # seconds
DEFAULT_OUTBOX_MAX_ATTEMPTS = 8
DEFAULT_WEBHOOK_TIMEOUT = 5.0  # seconds


class ConfigError(Exception):
    """The configuration is invalid."""


@dataclass(frozen=True)
class MqttTarget:
    """Where the broker is and how to log in, parsed from `mqtt_url`."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool


class Settings(BaseSettings):
    """All settings of iothub. Environment variables win over the TOML file."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", frozen=True, case_sensitive=False
    )

    # --- connections
    database_url: str = Field(
        default="",
        description="libpq URL or conninfo; empty means libpq defaults and the PG* variables",
    )
    db_pool_size: int = Field(default=4, ge=2, le=100, description="connections in the pool")
    mqtt_url: str = Field(default=DEFAULT_MQTT_URL, description="mqtt://user:pass@host:port")
    mqtt_client_id: str = Field(default=DEFAULT_CLIENT_ID, min_length=1, max_length=128)
    # NoDecode: the variable may be a JSON list or plain comma-separated text (_split_topics).
    mqtt_topics: Annotated[tuple[str, ...], NoDecode] = Field(default=DEFAULT_TOPICS, min_length=1)
    mqtt_shared_group: str | None = Field(
        default=None, description="subscribe through $share/<group>/... to spread load"
    )
    mqtt_keepalive: int = Field(default=DEFAULT_KEEPALIVE, ge=5, le=3600)
    mqtt_session_expiry: int = Field(default=DEFAULT_SESSION_EXPIRY, ge=1)
    mqtt_actions_client_id: str | None = Field(
        default=None, description="client id of the action publisher; default <client_id>-actions"
    )

    # --- ingestion
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=1_000_000)
    batch_interval: float = Field(default=DEFAULT_BATCH_INTERVAL, gt=0, le=60)
    max_pending_messages: int = Field(default=DEFAULT_MAX_PENDING, ge=10, le=65_535)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=64)
    max_str_len: int = Field(default=DEFAULT_MAX_STR_LEN, ge=1)
    future_tolerance: float = Field(default=DEFAULT_FUTURE_TOLERANCE, ge=0)
    max_age: float = Field(default=DEFAULT_MAX_AGE, gt=0)

    # --- rules and actions
    timezone: str = Field(default="UTC", description="time zone of rule time restrictions")
    no_data_check_interval: float = Field(default=DEFAULT_NO_DATA_CHECK, gt=0)
    no_data_max_backlog: float = Field(default=DEFAULT_NO_DATA_MAX_BACKLOG, gt=0)
    outbox_poll_interval: float = Field(default=DEFAULT_OUTBOX_POLL, gt=0)
    outbox_max_attempts: int = Field(default=DEFAULT_OUTBOX_MAX_ATTEMPTS, ge=1)
    webhook_timeout: float = Field(default=DEFAULT_WEBHOOK_TIMEOUT, gt=0)
    smtp_url: str | None = Field(default=None, description="smtp://user:pass@host:port; unset logs")
    smtp_from: str = "iothub@localhost"
    smtp_to: str | None = Field(
        default=None, description="recipient of email notifications (the rules name no address)"
    )

    # --- operations
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65_535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    shutdown_timeout: float = Field(default=DEFAULT_SHUTDOWN_TIMEOUT, gt=0)
    stats_interval: float = Field(default=DEFAULT_STATS_INTERVAL, gt=0)
    seed_data: bool = False

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # No .env or secrets directory: what configures the service is visible in its unit file.
        return (init_settings, env_settings)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("mqtt_topics", mode="before")
    @classmethod
    def _split_topics(cls, value: object) -> object:
        # An environment variable may list topics separated by commas instead of JSON.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return tuple(json.loads(text))
                except (ValueError, TypeError):
                    raise ValueError("not a JSON list of topic patterns") from None
            return tuple(part.strip() for part in text.split(",") if part.strip())
        return value

    @field_validator("mqtt_topics")
    @classmethod
    def _check_topics(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for topic in value:
            if "#" in topic or "+" in topic:
                raise ValueError(
                    f"{topic!r}: use {{serial_id}} for the device level, not wildcards"
                )
        # The router's own checks, so that a pattern it would refuse stops start-up here.
        topics.TopicRouter.from_strings(value)
        return value

    @field_validator("mqtt_shared_group")
    @classmethod
    def _check_share_group(cls, value: str | None) -> str | None:
        if value is not None:
            topics.validate_share_group(value)
        return value

    @field_validator("smtp_url")
    @classmethod
    def _check_smtp_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
                raise ValueError("expected smtp://user:pass@host:port or smtps://...")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, value: str) -> str:
        try:
            psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            detail = " ".join(str(exc).split())  # libpq's messages end with a newline
            raise ValueError(f"not a libpq URL or conninfo: {detail}") from None
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        _parse_mqtt_url(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _check_tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @property
    def mqtt(self) -> MqttTarget:
        return _parse_mqtt_url(self.mqtt_url)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with passwords masked, for the start-up log line."""
        values = self.model_dump()
        for key in ("database_url", "mqtt_url", "smtp_url"):
            if values.get(key):
                values[key] = _mask_password(str(values[key]))
        return values


def _parse_mqtt_url(url: str) -> MqttTarget:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"scheme must be mqtt:// or mqtts://, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise ValueError("no host in the broker URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port is not a number between 0 and 65535") from None
    tls = parts.scheme == "mqtts"
    return MqttTarget(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def _mask_password(url: str) -> str:
    if "://" in url:
        parts = urlsplit(url)
        if parts.password:
            return url.replace(f":{parts.password}@", ":***@", 1)
        return url
    # conninfo form: key=value pairs
    return " ".join(
        "password=***" if item.startswith("password=") else item for item in url.split()
    )


def load_settings(
    config_file: Path | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build the settings once: defaults, then the TOML file, then `IOTHUB_*` variables.

    Raises ConfigError with one line that names every bad setting and what is wrong.
    """
    env = os.environ if environ is None else environ
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            with config_file.open("rb") as fh:
                file_values = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
    env_names = {name.upper() for name in env}
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    # A typo in a variable name would otherwise be ignored without a word.
    unknown = sorted(
        name
        for name in env_names
        if name.startswith(ENV_PREFIX) and name not in known and not name.startswith(TEST_PREFIX)
    )
    if unknown:
        raise ConfigError(f"invalid configuration: {', '.join(unknown)}: unknown setting")
    # The environment wins: drop file values that an IOTHUB_ variable also sets.
    overridden = {k for k in file_values if f"{ENV_PREFIX}{k.upper()}" in env_names}
    init = {k: v for k, v in file_values.items() if k not in overridden}
    try:
        if environ is None:
            return Settings(**init)
        return _settings_from(init, env)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, set(file_values))) from None
    except SettingsError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _settings_from(init: dict[str, Any], env: Mapping[str, str]) -> Settings:
    # Tests pass an explicit environment; pydantic-settings reads os.environ, so swap it briefly.
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings(**init)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _one_line(exc: ValidationError, file_keys: set[str]) -> str:
    problems = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        name = loc[0] if loc else "?"
        where = f"{ENV_PREFIX}{name.upper()}"
        if name in file_keys:
            where = f"{name} (config file)"
        if error["type"] == "extra_forbidden":
            problems.append(f"{where}: unknown setting")
            continue
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "invalid configuration: " + "; ".join(problems)
