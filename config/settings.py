"""The service's settings: `IOTHUB_*` environment variables over an optional TOML file.

Every setting is a flat field so that its environment variable is simply `IOTHUB_` + its name in
capitals, and the TOML file uses the same names as keys. Defaults are named constants with units.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg.conninfo
import psycopg.pq
from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from config import sources, topics

ENV_PREFIX = "IOTHUB_"
TEST_PREFIX = "IOTHUB_TEST_"  # the test suite's own variables, not settings
# The test suite's CI switch (tests/support/skips.py): not a setting, but CI exports it to every
# process the suite starts, including the CLI it runs.
NOT_SETTINGS = frozenset({"IOTHUB_REQUIRE_SERVICES"})

DEFAULT_MQTT_URL = "mqtt://127.0.0.1:1883"
DEFAULT_CLIENT_ID = "iothub-ingestor"
DEFAULT_TOPICS = ("devices/{serial_id}/telemetry", "telemetry")
DEFAULT_SOURCES: tuple[dict[str, Any], ...] = ()  # only the native topics (mqtt_topics)
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
DEFAULT_STANDBY_LOCK_CHECK_INTERVAL = 1.0  # seconds between the active's checks of its lock
DEFAULT_STANDBY_LOCK_LOST_AFTER = 3.0  # seconds without a confirmed check: the active fences
DEFAULT_STATS_INTERVAL = 10.0  # seconds
DEFAULT_NO_DATA_CHECK = 10.0  # seconds
DEFAULT_NO_DATA_MAX_BACKLOG = 5.0  # seconds: older unacknowledged messages defer no_data verdicts
DEFAULT_OUTBOX_POLL = 0.5  # seconds
DEFAULT_OUTBOX_MAX_ATTEMPTS = 8
DEFAULT_WEBHOOK_TIMEOUT = 5.0  # seconds: the whole delivery, first byte to last, on the wall clock
DEFAULT_OUTBOX_STUCK_AFTER = 30.0  # seconds past a step's deadline before the worker is "stuck"
DEFAULT_INGEST_LOCK_TIMEOUT = 10.0  # seconds a batch statement may wait for a lock
DEFAULT_INGEST_STATEMENT_TIMEOUT = 30.0  # seconds a batch statement may run
DEFAULT_WRITER_STALL_TIMEOUT = 60.0  # seconds without a commit, work pending: /healthz fails
DEFAULT_MAX_PENDING_BYTES = 64 * 1024 * 1024  # bytes of payload received but not acknowledged
DEFAULT_MAX_BATCH_READINGS = 50_000  # readings (stored + rejected) per batch
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024  # payload bytes per batch
DEFAULT_MAX_REJECTIONS_PER_MESSAGE = 100  # rejected readings recorded per message
MAX_WORKERS = 64  # worker processes of `iothub run` at most
# The default stops here: one connection's receiving process saturates long before (each worker
# adds ~70 MB and 3 database connections; docs/performance.md, "Worker processes").
DEFAULT_WORKERS_CAP = 8
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max ..."


def usable_cpus() -> int:
    """The cores this process may use: its CPU affinity (taskset, cpusets), lowered by a cgroup
    v2 CPU quota (a container's `--cpus`), which os.cpu_count() knows nothing of."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_workers() -> int:
    """One worker process per usable core, at most DEFAULT_WORKERS_CAP; on one core, 1: one
    process does everything (the connection, parsing, writing, rules)."""
    return min(DEFAULT_WORKERS_CAP, usable_cpus())


DEFAULT_RETENTION = 30 * 24 * 3600.0  # seconds (30 days) for rejections and finished actions
DEFAULT_RETENTION_INTERVAL = 300.0  # seconds between two pruning passes
DEFAULT_RETENTION_BATCH = 1000  # rows per DELETE statement
# Continuous aggregates (TimescaleDB only; `iothub setup-timescaledb` sets their policies).
DEFAULT_HOURLY_REFRESH_INTERVAL = 15 * 60.0  # seconds between refreshes of telemetry_hourly
DEFAULT_HOURLY_REFRESH_WINDOW = 3 * 24 * 3600.0  # seconds back each refresh of it covers
DEFAULT_DAILY_REFRESH_INTERVAL = 3600.0  # seconds between refreshes of telemetry_daily
DEFAULT_DAILY_REFRESH_WINDOW = 31 * 24 * 3600.0  # seconds back each refresh of it covers
DEFAULT_AGGREGATE_RETENTION = 5 * 365 * 24 * 3600.0  # seconds (1825 days) buckets are kept

MASK = "***"  # what a secret looks like in logs and error messages
# The settings that may hold passwords.
_URL_FIELDS = frozenset({"database_url", "mqtt_url", "mqtt_actions_url", "smtp_url"})
# libpq keywords whose values are secrets (sslpassword unlocks the client's TLS key).
SECRET_CONNINFO_KEYS = frozenset({"password", "sslpassword"})
# Query parameters of the broker and SMTP URLs that are masked like the user-info password.
SECRET_URL_QUERY_KEYS = frozenset(
    {"password", "sslpassword", "pass", "passwd", "pwd", "token", "secret"}
)


class ConfigError(Exception):
    """The configuration is invalid."""


@dataclass(frozen=True)
class MqttTarget:
    """Where the broker is and how to log in, parsed from `mqtt_url`."""

    host: str
    port: int
    username: str | None
    password: str | None = field(repr=False)  # never in a repr, a traceback or a log line
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
    # Raw tables as configured; config.sources.parse_sources validates them (at start, below) and
    # builds the Source values the intake routes with. NoDecode: _sources_json reads the variable.
    sources: Annotated[tuple[dict[str, Any], ...], NoDecode] = Field(
        default=DEFAULT_SOURCES,
        description="[[sources]]: other device formats by topic pattern (docs/sources.md)",
    )
    mqtt_shared_group: str | None = Field(
        default=None, description="subscribe through $share/<group>/... to spread load"
    )
    mqtt_keepalive: int = Field(default=DEFAULT_KEEPALIVE, ge=5, le=3600)
    mqtt_session_expiry: int = Field(default=DEFAULT_SESSION_EXPIRY, ge=1)
    mqtt_actions_client_id: str | None = Field(
        default=None, description="client id of the action publisher; default <client_id>-actions"
    )
    mqtt_actions_url: str | None = Field(
        default=None,
        description="broker URL of the action publisher, with a login of its own; default "
        "mqtt_url, which is refused for actions when it carries a login",
    )

    # --- ingestion
    workers: int = Field(
        default_factory=default_workers,
        ge=1,
        le=MAX_WORKERS,
        description="processes that parse, write and evaluate rules, each owning a share of "
        "the devices; 1 keeps everything in one process",
    )
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=1_000_000)
    batch_interval: float = Field(default=DEFAULT_BATCH_INTERVAL, gt=0, le=60)
    max_pending_messages: int = Field(default=DEFAULT_MAX_PENDING, ge=10, le=65_535)
    max_pending_bytes: int = Field(
        default=DEFAULT_MAX_PENDING_BYTES,
        ge=1024 * 1024,
        description="payload bytes received and not yet acknowledged, at most",
    )
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD, ge=64)
    max_str_len: int = Field(default=DEFAULT_MAX_STR_LEN, ge=1)
    future_tolerance: float = Field(default=DEFAULT_FUTURE_TOLERANCE, ge=0)
    max_age: float = Field(default=DEFAULT_MAX_AGE, gt=0)
    ingest_lock_timeout: float = Field(
        default=DEFAULT_INGEST_LOCK_TIMEOUT,
        ge=0,
        le=3600,
        description="seconds a statement of a batch may wait for a lock, then the batch is "
        "retried (PostgreSQL lock_timeout of ingestion connections; 0: no limit)",
    )
    ingest_statement_timeout: float = Field(
        default=DEFAULT_INGEST_STATEMENT_TIMEOUT,
        ge=0,
        le=3600,
        description="seconds a statement of a batch may run, then the batch is retried "
        "(PostgreSQL statement_timeout of ingestion connections; 0: no limit)",
    )
    writer_stall_timeout: float = Field(
        default=DEFAULT_WRITER_STALL_TIMEOUT,
        gt=0,
        le=86_400,
        description="seconds the writer may commit nothing while messages wait before "
        "/healthz reports it down",
    )
    max_batch_readings: int = Field(
        default=DEFAULT_MAX_BATCH_READINGS,
        ge=1,
        description="a batch stops taking messages once it holds this many readings",
    )
    max_batch_bytes: int = Field(
        default=DEFAULT_MAX_BATCH_BYTES,
        ge=1024,
        description="a batch stops taking messages once their payloads reach this many bytes",
    )
    max_rejections_per_message: int = Field(
        default=DEFAULT_MAX_REJECTIONS_PER_MESSAGE,
        ge=1,
        description="rejected readings of one message recorded in rejected_messages; the rest "
        "are counted in rejected_payloads.not_recorded",
    )

    # --- retention (pruned by `iothub run` in small batches)
    rejected_retention: float = Field(
        default=DEFAULT_RETENTION, gt=0, description="seconds rejected messages are kept"
    )
    outbox_retention: float = Field(
        default=DEFAULT_RETENTION,
        gt=0,
        description="seconds delivered or failed action_outbox rows (and their attempts) are kept",
    )
    attempts_retention: float = Field(
        default=DEFAULT_RETENTION, gt=0, description="seconds action_attempts rows are kept"
    )
    retention_interval: float = Field(default=DEFAULT_RETENTION_INTERVAL, gt=0)
    retention_batch_size: int = Field(default=DEFAULT_RETENTION_BATCH, ge=1, le=100_000)

    # --- continuous aggregates (TimescaleDB; applied by `iothub setup-timescaledb`)
    # A refresh window must span two buckets beyond its end offset (one bucket): hence the minima.
    aggregate_hourly_refresh_interval: float = Field(default=DEFAULT_HOURLY_REFRESH_INTERVAL, ge=60)
    aggregate_hourly_refresh_window: float = Field(
        default=DEFAULT_HOURLY_REFRESH_WINDOW, ge=3 * 3600
    )
    aggregate_daily_refresh_interval: float = Field(default=DEFAULT_DAILY_REFRESH_INTERVAL, ge=60)
    aggregate_daily_refresh_window: float = Field(
        default=DEFAULT_DAILY_REFRESH_WINDOW, ge=3 * 24 * 3600
    )
    aggregate_retention: float = Field(
        default=DEFAULT_AGGREGATE_RETENTION,
        gt=0,
        description="seconds telemetry_hourly and telemetry_daily buckets are kept",
    )

    # --- rules and actions
    timezone: str = Field(default="UTC", description="time zone of rule time restrictions")
    no_data_check_interval: float = Field(default=DEFAULT_NO_DATA_CHECK, gt=0)
    no_data_max_backlog: float = Field(default=DEFAULT_NO_DATA_MAX_BACKLOG, gt=0)
    outbox_poll_interval: float = Field(default=DEFAULT_OUTBOX_POLL, gt=0)
    outbox_max_attempts: int = Field(default=DEFAULT_OUTBOX_MAX_ATTEMPTS, ge=1)
    webhook_timeout: float = Field(
        default=DEFAULT_WEBHOOK_TIMEOUT,
        gt=0,
        le=300,
        description="seconds for one webhook delivery: resolve, connect, send, read",
    )
    # NoDecode: the variable may be a JSON list or plain comma-separated text (_split_networks).
    action_allow_networks: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(),
        description="CIDRs that webhooks may reach although not public (loopback, private, ...)",
    )
    outbox_stuck_after: float = Field(
        default=DEFAULT_OUTBOX_STUCK_AFTER,
        gt=0,
        description="seconds an outbox step may overrun its deadline before it is reported stuck",
    )
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
    # Active/standby election (iothub.daemon.election): instances sharing mqtt_client_id.
    # Off by default for now: an active fences itself (exit 69) when its lock session ends,
    # which a database restart also does, and a lone instance must ride a database outage out
    # on its broker connection (docs/operations.md, "Active and standby").
    standby: bool = Field(
        default=False,
        description="elect one active among the instances sharing mqtt_client_id "
        "(PostgreSQL advisory lock); the others wait as standbys",
    )
    standby_lock_check_interval: float = Field(
        default=DEFAULT_STANDBY_LOCK_CHECK_INTERVAL, gt=0, le=60
    )
    standby_lock_lost_after: float = Field(default=DEFAULT_STANDBY_LOCK_LOST_AFTER, gt=0, le=300)
    stats_interval: float = Field(default=DEFAULT_STATS_INTERVAL, gt=0)
    seed_data: bool = False

    # pydantic-settings calls this hook with keyword arguments: the unused ones keep their names.
    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],  # noqa: ARG003
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,  # noqa: ARG003
        file_secret_settings: PydanticBaseSettingsSource,  # noqa: ARG003
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
        return _json_or_commas(value, "topic patterns")

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

    @field_validator("sources", mode="before")
    @classmethod
    def _sources_json(cls, value: object, info: ValidationInfo) -> object:
        # IOTHUB_SOURCES is a JSON list of objects; the TOML file gives a list of tables.
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else []
            except ValueError:
                raise ValueError("not a JSON list of source objects") from None
        # Every mistake of every source, one line each, before start-up goes any further.
        parsed = sources.parse_sources(value)
        native = {
            p.replace(topics.SERIAL_PLACEHOLDER, "+") for p in info.data.get("mqtt_topics", ())
        }
        for source in parsed:
            # The same filter twice would make the broker deliver each message twice.
            if source.topic.subscription in native:
                raise ValueError(
                    f"source {source.name!r} subscribes to {source.topic.subscription!r}, "
                    "like one of mqtt_topics"
                )
        return tuple(value) if isinstance(value, list) else value

    @field_validator("action_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        return _json_or_commas(value, "networks")

    @field_validator("action_allow_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=True)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not a network in CIDR form: {exc}") from None
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
            _check_userinfo(value)
            parts = urlsplit(value)
            if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
                raise ValueError("expected smtp://user:pass@host:port or smtps://...")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_dsn(cls, value: str) -> str:
        try:
            params = psycopg.conninfo.conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            # libpq's messages end with a newline and may quote the password.
            detail = _scrub_libpq_error(str(exc))
            raise ValueError(f"not a libpq URL or conninfo: {detail}") from None
        problem = _url_dsn_problem(value, params)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _check_mqtt_url(cls, value: str) -> str:
        parse_mqtt_url(value)
        return value

    @field_validator("mqtt_actions_url")
    @classmethod
    def _check_mqtt_actions_url(cls, value: str | None) -> str | None:
        if value is not None:
            parse_mqtt_url(value)
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
        return parse_mqtt_url(self.mqtt_url)

    @property
    def mqtt_actions(self) -> MqttTarget:
        """Where the action publisher connects: mqtt_actions_url, else mqtt_url."""
        return parse_mqtt_url(self.mqtt_actions_url or self.mqtt_url)

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() mask like redacted(): a Settings object in a traceback, a debugger
        # or an f-string must not carry the passwords either.
        masked = self.redacted()
        for name, value in super().__repr_args__():
            yield name, masked.get(name, value) if name in _URL_FIELDS else value

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with passwords masked, for the start-up log line."""
        values = self.model_dump()
        if values["database_url"]:
            values["database_url"] = _mask_conninfo(values["database_url"])
        for key in sorted(_URL_FIELDS - {"database_url"}):
            if values.get(key):
                values[key] = _mask_url(str(values[key]))
        return values


def _json_or_commas(value: object, what: str) -> object:
    """A list setting given as text (an environment variable): a JSON list, or items separated
    by commas. Anything else is left to the field's own validation."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return tuple(json.loads(text))
        except (ValueError, TypeError):
            raise ValueError(f"not a JSON list of {what}") from None
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _check_userinfo(url: str) -> None:
    # "mqtt://u:pa#ss@h" is host "u" to urlsplit, and the rest of the password a fragment: it
    # could not log in as meant, and its pieces would show up where hosts are logged.
    if "@" in url.partition("://")[2] and "@" not in urlsplit(url).netloc:
        raise ValueError(_UNESCAPED_USERINFO)


def parse_mqtt_url(url: str) -> MqttTarget:
    _check_userinfo(url)
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


_UNESCAPED_USERINFO = (
    "an '@', '/', '?' or '#' in the URL's user name or password must be percent-encoded "
    "(%40, %2F, %3F, %23)"
)


def _url_dsn_problem(dsn: str, params: Mapping[str, object]) -> str | None:
    """Why libpq would read a URL DSN other than as meant, with part of a password as its host,
    port or database name (which a log line or a connection error would then show).

    ``postgresql://u:pa/ss@h/db`` is host ``u``, port ``pa``, database ``ss@h/db`` to libpq, and
    ``postgresql://u:pa@ss@h/db`` has host ``ss@h``. Neither can connect as meant, so they are
    refused here, without quoting them.
    """
    text = dsn.strip()
    if not text.startswith(("postgresql://", "postgres://")):
        return None
    port = str(params.get("port") or "")
    if not all(part.strip().isdigit() for part in port.split(",") if part.strip()):
        return f"the port is not a number; {_UNESCAPED_USERINFO}"
    if "@" in str(params.get("host") or ""):
        return f"the host contains '@'; {_UNESCAPED_USERINFO}"
    head = text.split("?", 1)[0].split("://", 1)[1]
    if "@" in head and "user" not in params and "password" not in params:
        return f"an '@' is not where the user-info ends; {_UNESCAPED_USERINFO}"
    return None


def _mask_conninfo(dsn: str) -> str:
    """``dsn`` (any libpq form) with its secrets replaced by ``***``, rebuilt as conninfo.

    libpq's own parser finds the password wherever the forms put it (``password = x``,
    ``password='a b'``, URL user-info, URL query); rewriting the text by hand missed some.
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return MASK  # the validator refuses such text; never echo what could not be parsed
    if not any(key in SECRET_CONNINFO_KEYS for key in params):
        return dsn
    # Secrets last: the log line reads as where it connects, then what is hidden.
    masked = {k: v for k, v in params.items() if k not in SECRET_CONNINFO_KEYS}
    masked.update((k, MASK) for k in params if k in SECRET_CONNINFO_KEYS)
    return psycopg.conninfo.make_conninfo("", **masked)


def _mask_url(url: str) -> str:
    """``url`` with the password of its user-info and any password in its query masked."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if sep and at != -1 and ":" in rest[:at]:
        # The last "@" ends the user-info, even where an unescaped "#", "?" or "/" in the
        # password makes urlsplit see a fragment, query or path instead (and show the rest).
        # An "@" elsewhere (in a query) may mask more than the password; never less.
        url = f"{scheme}://{rest[:at].partition(':')[0]}:{MASK}@{rest[at + 1 :]}"
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    query = "&".join(
        f"{item.partition('=')[0]}={MASK}"
        if unquote(item.partition("=")[0]).lower() in SECRET_URL_QUERY_KEYS
        else item
        for item in parts.query.split("&")
    )
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, fragment))


def _scrub_libpq_error(message: str) -> str:
    """libpq's parse error without the fragments of the DSN it quotes, which may be secrets.

    ``missing "=" after "s3cret"`` and ``invalid percent-encoded token: "s3cr%zzet"`` quote the
    very text that failed to parse. From the first quoted fragment that is neither a libpq
    keyword nor punctuation to the message's last quote, everything is masked: a fragment may
    itself hold quotes, so masking fragment by fragment could leave a piece of it behind.
    """
    text = " ".join(message.split())
    known = _conninfo_keywords()
    for match in _QUOTED.finditer(text):
        if match.group(1) in _SAFE_QUOTED or match.group(1) in known:
            continue
        return f'{text[: match.start()]}"{MASK}"{text[text.rfind(chr(34)) + 1 :]}'
    return text


_QUOTED = re.compile(r'"([^"]*)"')
_SAFE_QUOTED = frozenset({"=", ":", "/", "]"})  # punctuation libpq's messages quote


def _conninfo_keywords() -> frozenset[str]:
    return frozenset(
        option.keyword.decode()
        for option in psycopg.pq.Conninfo.get_defaults()
        if option.keyword is not None
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
        if name.startswith(ENV_PREFIX)
        and name not in known
        and name not in NOT_SETTINGS
        and not name.startswith(TEST_PREFIX)
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
