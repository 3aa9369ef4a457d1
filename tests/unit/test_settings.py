"""Configuration: environment over file, one clear line for every mistake."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import structlog

from config.settings import (
    DEFAULT_WORKERS_CAP,
    ConfigError,
    Settings,
    load_settings,
    usable_cpus,
)
from schema import timescale


def test_defaults_need_no_configuration() -> None:
    """With nothing set, the service has usable defaults (libpq defaults for the database)."""
    settings = load_settings(None, {})
    assert settings.database_url == ""
    assert settings.mqtt.host == "127.0.0.1" and settings.mqtt.port == 1883
    assert settings.mqtt_topics == ("devices/{serial_id}/telemetry", "telemetry")


def test_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    """A TOML key is used unless the matching IOTHUB_ variable is set."""
    config = tmp_path / "iothub.toml"
    config.write_text('batch_size = 100\nmqtt_url = "mqtt://file-host:1884"\n')
    settings = load_settings(config, {"IOTHUB_BATCH_SIZE": "250"})
    assert settings.batch_size == 250
    assert settings.mqtt.host == "file-host" and settings.mqtt.port == 1884


def test_broker_url_carries_credentials_and_tls() -> None:
    """mqtt(s)://user:pass@host:port is split into its parts, percent-decoded."""
    target = Settings(mqtt_url="mqtts://dev%40ice:p%3Ass@broker:8884").mqtt
    assert (target.username, target.password, target.host, target.port, target.tls) == (
        "dev@ice",
        "p:ss",
        "broker",
        8884,
        True,
    )


def test_topics_from_a_comma_separated_variable() -> None:
    """IOTHUB_MQTT_TOPICS accepts plain comma-separated patterns as well as a JSON list."""
    assert load_settings(None, {"IOTHUB_MQTT_TOPICS": "a/{serial_id}/t, b"}).mqtt_topics == (
        "a/{serial_id}/t",
        "b",
    )
    assert load_settings(None, {"IOTHUB_MQTT_TOPICS": '["x/{serial_id}"]'}).mqtt_topics == (
        "x/{serial_id}",
    )


SECRET = "s3cret"


@pytest.mark.parametrize(
    ("database_url", "shown"),
    [
        ("host=db password=s3cret", "host=db password=***"),
        ("host=db password = s3cret", "host=db password=***"),
        ("host=db password='my s3cret pw'", "host=db password=***"),
        ("host=db password='it\\'s s3cret'", "host=db password=***"),
        ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
        ("postgresql://u:s3cret@db/x", "user=u dbname=x host=db password=***"),
        ("postgresql://u:s3%40cret@db/x", "user=u dbname=x host=db password=***"),
        ("postgresql://u@db/x?password=s3cret", "user=u dbname=x host=db password=***"),
        ("postgres://db/x?sslmode=disable&password=s3cret", None),
        ("host=db user=u", "host=db user=u"),
    ],
)
def test_every_libpq_form_of_a_database_password_is_masked(
    database_url: str, shown: str | None
) -> None:
    """The keyword, spaced, quoted, URL user-info and URL query forms of a password are masked."""
    redacted = Settings(database_url=database_url).redacted()["database_url"]
    assert "s3" not in redacted and "cret" not in redacted
    if shown is not None:
        assert redacted == shown
    assert "***" in redacted or "password" not in database_url


@pytest.mark.parametrize(
    ("field", "url", "shown"),
    [
        ("mqtt_url", "mqtt://dev:s3cret@broker:1883", "mqtt://dev:***@broker:1883"),
        ("mqtt_url", "mqtts://dev:s3:cr@et@broker", "mqtts://dev:***@broker"),
        ("mqtt_url", "mqtt://dev:s3cret%40x@broker", "mqtt://dev:***@broker"),
        ("mqtt_url", "mqtt://broker?password=s3cret&x=1", "mqtt://broker?password=***&x=1"),
        ("mqtt_url", "mqtt://dev:@broker", "mqtt://dev:***@broker"),
        ("mqtt_url", "mqtt://dev@broker", "mqtt://dev@broker"),
        ("smtp_url", "smtp://mail:s3cret@smtp.example:587", "smtp://mail:***@smtp.example:587"),
        ("smtp_url", "smtps://smtp.example?token=s3cret", "smtps://smtp.example?token=***"),
        ("smtp_url", "smtp://u:s3%23cret@mail", "smtp://u:***@mail"),
        ("mqtt_url", "mqtt://dev:s3@cret@broker", "mqtt://dev:***@broker"),
    ],
)
def test_broker_and_smtp_passwords_are_masked(field: str, url: str, shown: str) -> None:
    """User-info and query passwords of the broker and SMTP URLs are masked like the DSN's."""
    redacted = Settings(**{field: url}).redacted()[field]  # type: ignore[arg-type]
    assert redacted == shown


def test_the_startup_log_line_carries_no_secret() -> None:
    """The config_loaded event, as logged, and repr() hold none of the passwords."""
    settings = Settings(
        database_url="host=db password='my s3cret pw'",
        mqtt_url="mqtt://dev:s3cret@broker",
        mqtt_actions_url="mqtt://iothub-actions:s3cret@broker",
        smtp_url="smtp://u:s3cret@mail",
    )
    with structlog.testing.capture_logs() as logs:
        structlog.get_logger().info("config_loaded", settings=settings.redacted())
    assert logs and SECRET not in json.dumps(logs) and "s3cret pw" not in json.dumps(logs)
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("variable", "url"),
    [
        ("IOTHUB_DATABASE_URL", "postgresql://u:s3/cret@db/x"),  # host u, port s3 to libpq
        ("IOTHUB_DATABASE_URL", "postgresql://u:12/s3cret@db/x"),  # database s3cret@db/x
        ("IOTHUB_DATABASE_URL", "postgresql://u:s3@cret@db/x"),  # host cret@db
        ("IOTHUB_MQTT_URL", "mqtt://dev:s3#cret@broker"),  # host dev, fragment cret@broker
        ("IOTHUB_MQTT_URL", "mqtt://dev:s3/cret@broker"),
        ("IOTHUB_SMTP_URL", "smtp://u:s3?cret@mail"),  # host u to urlsplit
    ],
)
def test_a_url_whose_password_would_be_read_as_host_or_path_is_refused(
    variable: str, url: str
) -> None:
    """An unescaped '@', '/', '?' or '#' in a URL password makes part of it a host, port,
    path or fragment, which later log lines and connection errors would show: refused at
    start-up, with the fix and without quoting the URL."""
    with pytest.raises(ConfigError, match="must be percent-encoded") as info:
        load_settings(None, {variable: url})
    assert "s3" not in str(info.value) and "cret" not in str(info.value)


@pytest.mark.parametrize(
    "database_url",
    [
        "postgresql://u:s3#cret@db/x",
        "postgresql://u:s3?cret@db/x",
        "postgresql://db1:5432,db2:5433/x",
        "postgresql://db/x?user=me@example.com",
    ],
)
def test_urls_libpq_reads_as_meant_are_accepted(database_url: str) -> None:
    """libpq takes '#' and '?' in a password, host lists and an '@' in the query as meant."""
    redacted = load_settings(None, {"IOTHUB_DATABASE_URL": database_url}).redacted()
    assert "s3" not in redacted["database_url"] and "cret" not in redacted["database_url"]


def test_the_settings_repr_carries_no_secret() -> None:
    """repr() and str() of the settings and of the broker target mask the passwords, so an
    object logged or shown in a traceback by mistake leaks nothing."""
    settings = Settings(
        database_url="postgresql://u@db/x?password=s3cret",
        mqtt_url="mqtt://dev:s3cret@broker",
        smtp_url="smtp://u:s3cret@mail",
    )
    for shown in (repr(settings), str(settings), f"{settings!r}", repr(settings.mqtt)):
        assert SECRET not in shown
    assert "password=***" in repr(settings) and settings.mqtt.password == SECRET


@pytest.mark.parametrize(
    "database_url",
    [
        "host=db s3cret",
        "postgresql://u:s3cr%zzet@db/x",
        "host=db s3cret=1",
        "s3cret",
        'host=db s3"cret',  # a quote inside the fragment libpq quotes
        'host=db s3"="cret',
        "postgresql://u:s3cret@[::1/x",
    ],
)
def test_a_dsn_error_message_does_not_quote_the_password(database_url: str) -> None:
    """libpq's parse errors quote the text they stumbled on; the message masks it."""
    with pytest.raises(ConfigError, match="IOTHUB_DATABASE_URL: not a libpq URL") as info:
        load_settings(None, {"IOTHUB_DATABASE_URL": database_url})
    assert "s3" not in str(info.value) and "cret" not in str(info.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"IOTHUB_BATCH_SIZE": "0"}, "IOTHUB_BATCH_SIZE: Input should be greater than or equal"),
        ({"IOTHUB_MQTT_URL": "http://x"}, "IOTHUB_MQTT_URL: scheme must be mqtt:// or mqtts://"),
        ({"IOTHUB_TIMEZONE": "Mars/Olympus"}, "IOTHUB_TIMEZONE: unknown time zone"),
        ({"IOTHUB_MQTT_TOPICS": "devices/+/telemetry"}, "use {serial_id} for the device level"),
        ({"IOTHUB_DATABASE_URL": "host=x port"}, "IOTHUB_DATABASE_URL: not a libpq URL"),
        ({"IOTHUB_BATCHSIZE": "5"}, "IOTHUB_BATCHSIZE: unknown setting"),
        ({"IOTHUB_LOG_LEVEL": "loud"}, "IOTHUB_LOG_LEVEL: Input should be"),
    ],
)
def test_bad_values_give_one_line_naming_the_setting(environ: dict[str, str], message: str) -> None:
    """Each mistake is reported on one line that names the variable and what is wrong."""
    with pytest.raises(ConfigError) as caught:
        load_settings(None, environ)
    text = str(caught.value)
    assert "\n" not in text
    assert message in text


def test_bad_toml_and_unknown_keys_in_the_file(tmp_path: Path) -> None:
    """A file that is not TOML, or has an unknown key, is named in the error."""
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = = 3\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(bad, {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("batchsize = 3\n")
    with pytest.raises(ConfigError, match=r"batchsize \(config file\): unknown setting"):
        load_settings(unknown, {})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "missing.toml", {})


def test_passwords_are_masked_in_the_startup_log() -> None:
    """redacted() hides passwords of every URL and conninfo."""
    settings = Settings(
        database_url="postgresql://u:secret@db/x", mqtt_url="mqtt://dev:hunter2@broker:1883"
    )
    shown = str(settings.redacted())
    assert "secret" not in shown and "hunter2" not in shown
    conninfo = Settings(database_url="host=db password=secret").redacted()["database_url"]
    assert conninfo == "host=db password=***"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"IOTHUB_SMTP_URL": "http://mail"}, "IOTHUB_SMTP_URL: expected smtp://"),
        ({"IOTHUB_MQTT_SHARED_GROUP": "a/b"}, "IOTHUB_MQTT_SHARED_GROUP:"),
        ({"IOTHUB_MQTT_TOPICS": "dev{serial_id}/t"}, "IOTHUB_MQTT_TOPICS:"),
        ({"IOTHUB_MQTT_TOPICS": "telemetry,telemetry"}, "IOTHUB_MQTT_TOPICS:"),
    ],
)
def test_what_the_router_or_mailer_would_refuse_stops_start_up(
    environ: dict[str, str], message: str
) -> None:
    """Settings the MQTT router or the mailer would refuse later are refused at load time."""
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ)


def test_the_test_suites_ci_switch_is_not_an_unknown_setting() -> None:
    """IOTHUB_REQUIRE_SERVICES (exported by CI to every process) does not stop the CLI."""
    settings = load_settings(None, {"IOTHUB_REQUIRE_SERVICES": "1", "IOTHUB_BATCH_SIZE": "7"})
    assert settings.batch_size == 7


def test_aggregate_intervals_read_in_whole_units() -> None:
    """Interval settings become literals in the largest whole unit, else in seconds."""
    assert timescale.interval_text(86400) == "1 day"
    assert timescale.interval_text(3 * 86400) == "3 days"
    assert timescale.interval_text(7200) == "2 hours"
    assert timescale.interval_text(900) == "15 minutes"
    assert timescale.interval_text(90) == "90 seconds"
    assert timescale.interval_text(1.5) == "1.5 seconds"
    assert timescale.AggregatePolicy().literals()["aggregate_retention"].as_string(None) == (
        "'1825 days'"
    )


def test_workers_default_to_the_usable_cores_within_the_cap() -> None:
    settings = load_settings(None, {})
    assert settings.workers == min(DEFAULT_WORKERS_CAP, usable_cpus())
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
    assert load_settings(None, {"IOTHUB_WORKERS": "3"}).workers == 3


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_workers_out_of_range_is_one_clear_line(value: str) -> None:
    with pytest.raises(ConfigError, match="IOTHUB_WORKERS"):
        load_settings(None, {"IOTHUB_WORKERS": value})
