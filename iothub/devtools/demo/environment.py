"""The demo's servers: the configured PostgreSQL and Mosquitto when they answer within
PROBE_TIMEOUT, otherwise throwaway ones started from the installed binaries in a temporary
directory (`iothub.devtools.localservers`); a database of its own on a configured server, and
a topic prefix of its own on a configured broker. Everything it starts or creates is cleaned up
through the run's ExitStack."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import psycopg
import structlog
from psycopg import sql

from config.settings import Settings
from ingestor import mqtt as mqttclient
from iothub.devtools import localservers
from iothub.devtools.demo.console import Console
from schema import sql as queries_mod

log = structlog.get_logger(__name__)

PROBE_TIMEOUT: Final = 2  # seconds for a configured server to answer before we start our own
DEMO_DATABASE: Final = "iothub_demo"  # name of the database on a throwaway server
PREFIX: Final = "iothub-demo"
queries = queries_mod.load("iothub.devtools.demo", "demo.sql")


def timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d_%H%M%S")


def database_answers(dsn: str) -> bool:
    """True when the configured PostgreSQL accepts a connection within PROBE_TIMEOUT."""
    conninfo = psycopg.conninfo.make_conninfo(
        dsn, connect_timeout=PROBE_TIMEOUT, application_name="iothub-demo"
    )
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        log.info("demo_database_probe", answers=False, error=str(exc).strip().splitlines()[0])
        return False
    return True


def broker_answers(url: str) -> bool:
    """True when the configured broker accepts an MQTT connection within PROBE_TIMEOUT."""
    client = mqttclient.make_client(url, f"{PREFIX}-probe-{os.getpid()}")
    client.connect_timeout = PROBE_TIMEOUT
    accepted = threading.Event()
    result: dict[str, bool] = {}

    def on_connect(
        _client: mqttclient.Client,
        _userdata: object,
        _flags: mqttclient.ConnectFlags,
        reason_code: mqttclient.ReasonCode,
        _properties: mqttclient.Properties | None,
    ) -> None:
        result["ok"] = not reason_code.is_failure
        accepted.set()

    client.on_connect = on_connect
    try:
        client.connect(*mqttclient.host_port(url), keepalive=10)
    except (OSError, ValueError) as exc:
        log.info("demo_broker_probe", answers=False, error=str(exc))
        return False
    client.loop_start()
    try:
        accepted.wait(PROBE_TIMEOUT)
        return result.get("ok", False)
    finally:
        client.disconnect()
        mqttclient.stop_loop(client)


def _create_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(queries["create_database"]).format(name=sql.Identifier(name)))


def _drop_database(admin_dsn: str, name: str) -> None:
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        query = (
            "drop_database" if conn.info.server_version >= 130000 else "drop_database_before_pg13"
        )
        conn.execute(sql.SQL(queries[query]).format(name=sql.Identifier(name)))


@dataclass
class Environment:
    """The servers and database of one run, each undone by `stack` (last made, first undone)."""

    settings: Settings
    stack: contextlib.ExitStack
    console: Console
    keep: bool
    temp_root: Path | None = None
    cleaned: list[str] = field(default_factory=list)  # what the final clean-up line lists

    def temp_dir(self, name: str) -> Path:
        if self.temp_root is None:
            root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
            # PostgreSQL runs as `postgres` when we are root: it must reach its directory.
            root.chmod(0o711)
            self.stack.callback(self._remove_temp, root)
            self.temp_root = root
        return self.temp_root / name

    def _remove_temp(self, root: Path) -> None:
        shutil.rmtree(root, ignore_errors=True)
        self.cleaned.append(f"{root} removed")
        log.info("demo_temp_removed", path=str(root))

    def database(self) -> str:
        """The DSN of the demo's own database."""
        configured = self.settings.database_url
        where = _describe_dsn(configured)
        why = f"no server answered at {where}"
        if database_answers(configured):
            why = f"the server at {where} would not create a database for the demo"
            name = self._own_database(configured)
            if name is not None:
                dsn = psycopg.conninfo.make_conninfo(configured, dbname=name)
                fate = "kept (--keep)" if self.keep else "dropped at the end"
                self.console.say(f"  PostgreSQL  the configured server ({where}), database {name}")
                self.console.say(f"              created for this run, {fate}")
                log.info("demo_database", server="configured", database=name, keep=self.keep)
                return dsn
        server = localservers.LocalPostgres(self.temp_dir("postgres"))
        self.stack.callback(self._stop_postgres, server)
        server.init()
        server.start()
        _create_database(server.admin_dsn, DEMO_DATABASE)
        self.console.say(
            f"  PostgreSQL  {why}: started a throwaway one on "
            f"127.0.0.1:{server.port} (in {server.base}), removed at the end"
        )
        log.info(
            "demo_database",
            server="throwaway",
            port=server.port,
            path=str(server.base),
            configured=where,
        )
        return psycopg.conninfo.make_conninfo(server.admin_dsn, dbname=DEMO_DATABASE)

    def _own_database(self, configured: str) -> str | None:
        base = f"{DEMO_DATABASE}_{timestamp()}"
        for attempt in range(1, 10):
            name = base if attempt == 1 else f"{base}_{attempt}"
            try:
                _create_database(configured, name)
            except psycopg.errors.DuplicateDatabase:
                continue
            except psycopg.Error as exc:
                # No CREATEDB right: never fall back to the operator's own database.
                log.warning(
                    "demo_cannot_create_database",
                    error=str(exc).strip().splitlines()[0],
                    fallback="a throwaway server",
                )
                return None
            if not self.keep:
                self.stack.callback(self._drop, configured, name)
            return name
        return None

    def _drop(self, configured: str, name: str) -> None:
        try:
            _drop_database(configured, name)
        except psycopg.Error as exc:
            log.error("demo_drop_failed", database=name, error=str(exc).strip().splitlines()[0])
            self.console.say(f"could not drop the demo database {name}: drop it by hand")
        else:
            self.cleaned.append(f"database {name} dropped")
            log.info("demo_database_dropped", database=name)

    def _stop_postgres(self, server: localservers.LocalPostgres) -> None:
        server.destroy()
        self.cleaned.append("PostgreSQL stopped")
        log.info("demo_postgres_stopped", port=server.port)

    def broker(self) -> tuple[str, bool]:
        """The broker URL, and whether it is shared (the configured one) or our own."""
        configured = self.settings.mqtt_url
        target = self.settings.mqtt
        where = f"{target.host}:{target.port}"
        # A login belongs to a service: the shipped broker binds each session to its login
        # (use_username_as_clientid), so even a probe under it would discard that service's
        # queued telemetry, and the demo's daemon would take its session over. Only a broker
        # reached without a login (a development broker) is shared with the demo.
        if target.username is not None:
            why = f"the configured broker ({where}) is reached with login {target.username!r}"
            self.console.say(f"  Mosquitto   {why}, which belongs to a service: not used")
            log.info("demo_broker_login_not_used", address=where, login=target.username)
        elif broker_answers(configured):
            self.console.say(f"  Mosquitto   the configured broker ({where}), demo topics only")
            log.info("demo_broker", server="configured", address=where)
            return configured, True
        broker = localservers.LocalMosquitto(self.temp_dir("mosquitto"), own_session=True)
        self.stack.callback(self._stop_mosquitto, broker)
        broker.start()
        self.console.say(
            f"  Mosquitto   no broker answered at {where}: started a throwaway one on "
            f"127.0.0.1:{broker.port} (in {broker.base}), removed at the end"
        )
        log.info(
            "demo_broker",
            server="throwaway",
            port=broker.port,
            path=str(broker.base),
            configured=where,
        )
        return broker.url, False

    def _stop_mosquitto(self, broker: localservers.LocalMosquitto) -> None:
        broker.destroy()
        self.cleaned.append("Mosquitto stopped")
        log.info("demo_mosquitto_stopped", port=broker.port)


def _describe_dsn(dsn: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    host = info.get("host") or "the default socket"
    port = info.get("port") or 5432
    return f"{host}:{port}" if info.get("host") else f"{host} (port {port})"
