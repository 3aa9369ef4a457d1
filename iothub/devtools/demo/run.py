"""The demo run (`iothub demo`): the whole pipeline on this machine for a minute, live
progress, then a summary.

1. Servers: the PostgreSQL and Mosquitto the configuration points at when they answer within
   PROBE_TIMEOUT; otherwise throwaway ones started from the installed binaries in a temporary
   directory (`iothub.devtools.localservers`). On a configured PostgreSQL the demo works in a
   database of its own, `iothub_demo_<timestamp>`, created for the run and dropped at the end
   (kept with `--keep`); when it may not create one, it uses a throwaway server instead, so an
   operator's data is never touched. On a configured broker it publishes and subscribes under a
   topic prefix of its own (`iothub-demo-<timestamp>/...`), so a production ingestor never sees
   its messages.
2. Schema migrations, then the seed's development data set (7 devices, 11 rules).
3. The daemon in-process (`iothub.daemon.assemble.build`: ingestion, rules, actions; its own
   client id, health port 0) and the simulator in-process, for `--duration` seconds.
4. A summary read from the database: rows stored, rejections by reason, events by rule.
5. Clean-up of everything it started, also on Ctrl-C/SIGTERM: the daemon through request_stop,
   the demo database, the throwaway servers, the temporary directory.

Device time runs DEVICE_TIME_SCALE (60) times faster than wall time: the simulated devices' clock
starts `duration * 60` seconds plus DEVICE_TIME_MARGIN in the past and ends DEVICE_TIME_MARGIN
before now. So a minute of demo is an hour of device time, long enough for the seed's "above
27.5 °C for 10 minutes" rule to fire, while every reading stays inside the service's time bounds
(never ahead of its clock, never older than `max_age`; a demo too long for 60x runs slower).

Exit status: 0 when readings were stored, rejections were recorded with their reasons (when bad
payloads were sent) and at least one rule fired; 1 with what was missing otherwise.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import psycopg
import structlog

from config.settings import Settings
from ingestor import catalog
from ingestor.metrics import REJECTION_REASONS
from iothub import exitcodes
from iothub.daemon import assemble
from iothub.daemon import service as service_mod
from iothub.devtools import localservers
from iothub.devtools.demo.console import Console
from iothub.devtools.demo.environment import PREFIX, Environment, queries, timestamp
from iothub.devtools.seed import store as seed
from iothub.devtools.simulator import devices as sim_devices
from iothub.devtools.simulator import formats as sim_formats
from iothub.devtools.simulator import messages as sim_messages
from iothub.devtools.simulator import publisher as simulate
from schema import migrate

log = structlog.get_logger(__name__)

DEVICE_TIME_SCALE: Final = 60.0  # device seconds per wall second: a device hour per demo minute
DEVICE_TIME_MARGIN: Final = timedelta(minutes=5)  # device time ends this long before now
BACKFILL_MARGIN: Final = timedelta(hours=1)  # device time starts this far inside max_age
READY_TIMEOUT: Final = 60.0  # seconds for the daemon to reach the database and the broker
CATCH_UP_TIMEOUT: Final = 15.0  # seconds for the daemon to store what the broker acknowledged
SHUTDOWN_TIMEOUT: Final = 10.0  # seconds: the daemon's bounded stop
SESSION_EXPIRY: Final = 60  # seconds the broker keeps the demo daemon's session after it left
TTY_REFRESH: Final = 0.5  # seconds between redraws of the live line on a terminal
PLAIN_REFRESH: Final = 5.0  # seconds between progress lines otherwise
RATE_WINDOW: Final = 2.0  # seconds of history behind the live messages/s figure
TICK: Final = 0.1  # seconds: how often waits look at the stop flag
# The device formats shown next to the native one, each with its family's name. Devices take
# native and these in turn (by serial), so every format has devices with rules. Tasmota is left
# out: its Time has whole seconds, and at 60x device time a device's messages come closer.
DEMO_FORMATS: Final = {"z2m": "Zigbee2MQTT", "ttn": "The Things Stack"}
FORMAT_LABELS: Final = {"native": "native JSON", **DEMO_FORMATS}


def assign_formats(serials: list[str]) -> dict[str, str]:
    """Serial to the format it publishes in: native and DEMO_FORMATS in turn, by serial."""
    cycle = ("native", *DEMO_FORMATS)
    return {serial: cycle[i % len(cycle)] for i, serial in enumerate(sorted(serials))}


class Interrupted(Exception):
    """The demo was stopped by a signal."""


class DemoFailed(Exception):
    """The demo could not set up or run the pipeline."""


# ---------------------------------------------------------------------------------------------
# The pipeline


@dataclass(frozen=True)
class Plan:
    """How the simulated devices keep time, chosen so that every reading is acceptable."""

    start: datetime
    scale: float

    @classmethod
    def for_run(cls, duration: float, max_age: float, now: datetime) -> Plan:
        # Device time ends DEVICE_TIME_MARGIN before now; a very long demo slows it down rather
        # than starting beyond the backfill limit.
        reach = timedelta(seconds=max_age) - BACKFILL_MARGIN - DEVICE_TIME_MARGIN
        scale = DEVICE_TIME_SCALE
        if timedelta(seconds=duration * scale) > reach:
            scale = reach.total_seconds() / duration
        start = now - timedelta(seconds=duration * scale) - DEVICE_TIME_MARGIN
        return cls(start, scale)


@dataclass
class Progress:
    """The daemon's counters, read from its own Prometheus registry."""

    messages: float = 0.0
    rows: float = 0.0
    rejected: dict[str, float] = field(default_factory=dict)
    triggered: float = 0.0
    resolved: float = 0.0

    @classmethod
    def read(cls, service: service_mod.IngestService) -> Progress:
        registry = service.metrics.view()  # worker processes' counters summed in

        def value(name: str, labels: dict[str, str] | None = None) -> float:
            return registry.get_sample_value(name, labels or {}) or 0.0

        rejected = {
            reason: n
            for reason in REJECTION_REASONS
            if (n := value("iothub_readings_rejected_total", {"reason": reason}))
        }
        return cls(
            messages=value("iothub_messages_received_total"),
            rows=value("iothub_readings_stored_total"),
            rejected=rejected,
            triggered=value("iothub_events_total", {"kind": "triggered"}),
            resolved=value("iothub_events_total", {"kind": "resolved"}),
        )


def _progress_line(elapsed: float, duration: float, rate: float, p: Progress) -> str:
    rejected = sum(p.rejected.values())
    reasons = ", ".join(
        f"{reason} {n:.0f}" for reason, n in sorted(p.rejected.items(), key=lambda kv: -kv[1])
    )
    # Reasons last: on a narrow terminal the line is cut from the end.
    return (
        f"  {min(elapsed, duration):4.0f}/{duration:.0f} s | {rate:5.0f} msg/s | "
        f"{p.rows:,.0f} rows stored | events {p.triggered:.0f} triggered, "
        f"{p.resolved:.0f} resolved | {rejected:,.0f} rejected"
        + (f": {reasons}" if reasons else "")
    )


@dataclass
class Run:
    """One run of the daemon and the simulator side by side."""

    settings: Settings
    console: Console
    stop: threading.Event  # set by a signal: the user wants out
    duration: float
    rate: float
    bad_share: float
    cleaned: list[str]
    sim_stop: threading.Event = field(default_factory=threading.Event)
    service: service_mod.IngestService | None = None
    service_thread: threading.Thread | None = None
    simulator: simulate.Simulator | None = None
    sim_thread: threading.Thread | None = None
    sim_result: simulate.SimResult | None = None
    sim_error: Exception | None = None
    topic_prefix: str = ""  # before the sources' topics, as before mqtt_topics on a shared broker
    speakers: dict[str, str] = field(default_factory=dict)  # serial -> format

    def start_service(self, stack: contextlib.ExitStack) -> None:
        self.service = service = assemble.build(self.settings)
        self.service_thread = threading.Thread(target=service.run, name="iothub-demo-daemon")
        stack.callback(self.stop_service)
        self.service_thread.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not service.wait_ready(TICK):
            _check(self.stop)
            if not self.service_thread.is_alive() or time.monotonic() > deadline:
                raise DemoFailed(f"the daemon did not become ready: {service.readiness()}")
        names = ", ".join(str(s["name"]) for s in self.settings.sources)
        self.console.say(
            f"  daemon      ready: client id {self.settings.mqtt_client_id}, "
            f"topics {', '.join(self.settings.mqtt_topics)}; sources {names}"
        )

    def stop_service(self) -> None:
        """Stop the daemon the way SIGTERM would (idempotent)."""
        if self.service is None or self.service_thread is None:
            return
        self.service.request_stop("demo stopped" if self.stop.is_set() else "demo finished")
        self.service_thread.join(SHUTDOWN_TIMEOUT + 5)
        if self.service_thread.is_alive():
            log.error("demo_daemon_stop_timeout")
        else:
            self.cleaned.append("daemon stopped")
        self.service_thread = None

    def start_simulator(
        self, stack: contextlib.ExitStack, devices: list[sim_devices.SimDevice], plan: Plan
    ) -> None:
        factory = sim_messages.MessageFactory(
            self.settings.mqtt_topics,
            devices,
            bad_share=self.bad_share,
            readings_per_message=None,
            origin=plan.start.timestamp(),
            time_scale=plan.scale,
            max_payload_bytes=self.settings.max_payload_bytes,
            tz=self.settings.tz,
            rng=random.Random(),
        )
        self.simulator = simulate.Simulator(
            self.settings.mqtt_url,
            sim_formats.FormatFactory(factory, self.speakers, self.topic_prefix),
            rate=self.rate,
            duration=self.duration,
            stop=self.sim_stop,
            client_id=f"{PREFIX}-simulator-{os.getpid()}",
            progress_interval=None,
        )
        self.sim_thread = threading.Thread(target=self._simulate, name="iothub-demo-simulator")
        stack.callback(self.stop_simulator)
        self.sim_thread.start()

    def _simulate(self) -> None:
        assert self.simulator is not None
        try:
            self.sim_result = self.simulator.run()
        except Exception as exc:  # handed to the main thread, which reports it
            self.sim_error = exc

    def stop_simulator(self) -> None:
        self.sim_stop.set()
        if self.sim_thread is not None:
            self.sim_thread.join(simulate.DRAIN_TIMEOUT + 5)

    def watch(self) -> None:
        """Show progress until the simulator is done and the daemon has stored what it sent."""
        assert self.service is not None and self.simulator is not None
        assert self.sim_thread is not None
        refresh = TTY_REFRESH if self.console.tty else PLAIN_REFRESH
        started = time.monotonic()
        history: deque[tuple[float, float]] = deque()
        next_draw = started
        catch_up_until: float | None = None
        drawn = Progress()
        while True:
            now = time.monotonic()
            progress = Progress.read(self.service)
            history.append((now, progress.messages))
            while len(history) > 2 and now - history[0][0] > RATE_WINDOW:
                history.popleft()
            if now >= next_draw:
                span = now - history[0][0]
                rate = (progress.messages - history[0][1]) / span if span > 0 else 0.0
                self.console.live(_progress_line(now - started, self.duration, rate, progress))
                drawn = progress
                next_draw = now + refresh
            if self.service_thread is None or not self.service_thread.is_alive():
                raise DemoFailed("the daemon stopped during the run")
            if self.stop.is_set():
                self.sim_stop.set()
                if not self.sim_thread.is_alive():
                    break
            elif not self.sim_thread.is_alive():
                if self.sim_error is not None:
                    raise DemoFailed(f"the simulator stopped: {self.sim_error}")
                # The broker has everything; wait for the daemon to have committed it too.
                catch_up_until = catch_up_until or now + CATCH_UP_TIMEOUT
                stored = self.service.totals["messages"]
                if stored >= self.simulator.acked:
                    break
                if now >= catch_up_until:
                    log.warning("demo_catch_up_timeout", acked=self.simulator.acked, stored=stored)
                    break
            time.sleep(TICK)
        final = Progress.read(self.service)
        if self.console.tty or final != drawn:
            elapsed = min(time.monotonic() - started, self.duration)
            average = final.messages / max(elapsed, 1e-6)
            self.console.live(_progress_line(elapsed, self.duration, average, final))
        self.console.end_live()


# ---------------------------------------------------------------------------------------------
# The summary


@dataclass(frozen=True)
class RuleEvents:
    rule: str
    serial_id: str | None
    triggered: int
    resolved: int
    first: datetime
    last: datetime


@dataclass(frozen=True)
class Summary:
    sent: int
    acked: int
    bad_sent: dict[str, int]
    rows: int
    rows_by_format: dict[str, tuple[int, tuple[str, ...]]]  # format -> (rows, its serials)
    rejections: dict[str, int]  # by reason, most frequent first
    events: tuple[RuleEvents, ...]  # by rule and device, in order of the first event

    def missing(self, expect_rejections: bool) -> list[str]:
        """What a working pipeline should have shown and did not."""
        missing = []
        if self.rows <= 0:
            missing.append("no readings were stored")
        for fmt, (rows, serials) in self.rows_by_format.items():
            if serials and rows <= 0:
                missing.append(f"no readings of the {FORMAT_LABELS.get(fmt, fmt)} devices")
        if expect_rejections and not self.rejections:
            missing.append("no rejections were recorded")
        if not any(e.triggered for e in self.events):
            missing.append("no rule fired")
        return missing


@dataclass(frozen=True)
class Marks:
    """The highest ids after the seed: what the run adds comes after them."""

    events: int
    rejections: int
    telemetries: int


def _read_summary(dsn: str, marks: Marks, run: Run, service: service_mod.IngestService) -> Summary:
    with psycopg.connect(dsn, autocommit=True) as conn:
        by_device = {
            str(serial): int(n)
            for serial, n in conn.execute(queries["rows_by_device"], {"after": marks.telemetries})
        }
        rejections = {
            str(reason): int(n)
            for reason, n in conn.execute(
                queries["rejections_by_reason"], {"after": marks.rejections}
            )
        }
        events = tuple(
            RuleEvents(name, serial, int(t), int(r), first, last)
            for name, serial, t, r, first, last in conn.execute(
                queries["events_by_rule"], {"after": marks.events}
            )
        )
    sim = run.sim_result
    return Summary(
        sent=sim.sent if sim else 0,
        acked=sim.acked if sim else 0,
        bad_sent=dict(sim.bad_sent) if sim else {},
        rows=int(Progress.read(service).rows),
        rows_by_format=_by_format(run.speakers, by_device),
        rejections=rejections,
        events=events,
    )


def _by_format(
    speakers: dict[str, str], by_device: dict[str, int]
) -> dict[str, tuple[int, tuple[str, ...]]]:
    found: dict[str, tuple[int, tuple[str, ...]]] = {}
    for fmt in FORMAT_LABELS:
        serials = tuple(sorted(s for s, f in speakers.items() if f == fmt))
        found[fmt] = (sum(by_device.get(s, 0) for s in serials), serials)
    return found


def _print_summary(console: Console, summary: Summary) -> None:
    say = console.say
    say()
    say("Summary")
    bad = sum(summary.bad_sent.values())
    say(
        f"  messages sent     {summary.sent:,} ({bad:,} deliberately bad), "
        f"{summary.acked:,} acknowledged by the broker"
    )
    say(f"  rows stored       {summary.rows:,}")
    for fmt, (rows, serials) in summary.rows_by_format.items():
        if serials:
            label = f"from {FORMAT_LABELS.get(fmt, fmt)}"
            say(f"    {label:<22} {rows:>7,} rows ({', '.join(serials)})")
    say(f"  rejected          {sum(summary.rejections.values()):,} (rejected_messages, by reason)")
    for reason, n in summary.rejections.items():
        say(f"    {reason:<22} {n:>7,}")
    triggered = sum(e.triggered for e in summary.events)
    resolved = sum(e.resolved for e in summary.events)
    say(f"  events            {triggered} triggered, {resolved} resolved (device time, UTC)")
    if summary.events:
        width = max(len(e.rule) for e in summary.events)
        say(f"    {'rule':<{width}}  {'device':<16} trig  res  first     last")
        for e in summary.events:
            say(
                f"    {e.rule:<{width}}  {e.serial_id or '-':<16} {e.triggered:>4} "
                f"{e.resolved:>4}  {e.first.astimezone(UTC):%H:%M:%S}  "
                f"{e.last.astimezone(UTC):%H:%M:%S}"
            )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise Interrupted


def _demo_settings(
    settings: Settings, dsn: str, mqtt_url: str, shared: bool
) -> tuple[Settings, str]:
    """The daemon's settings for the demo, and the prefix of every topic it reads."""
    stamp = timestamp().replace("_", "")
    # On a shared broker, our own topic space: the production ingestor there never sees demo
    # traffic (and the demo no traffic of the broker's devices).
    prefix = f"{PREFIX}-{stamp}/" if shared else ""
    topics = tuple(f"{prefix}{t}" for t in settings.mqtt_topics)
    client_id = f"{PREFIX}-{stamp}-{os.getpid()}"
    return settings.model_copy(
        update={
            "database_url": dsn,
            "mqtt_url": mqtt_url,
            "mqtt_client_id": client_id,
            "mqtt_actions_client_id": f"{client_id}-actions",
            "mqtt_topics": topics,
            # The demo's own sources replace any configured ones: its devices are all it reads.
            "sources": tuple(sim_formats.source_for(f, prefix) for f in DEMO_FORMATS),
            "mqtt_shared_group": None,
            "mqtt_session_expiry": SESSION_EXPIRY,
            "http_port": 0,
            "shutdown_timeout": SHUTDOWN_TIMEOUT,
            # The seed's rules notify by email: the demo logs them rather than mail anybody.
            "smtp_url": None,
        }
    ), prefix


def _prepare_database(dsn: str, settings: Settings, console: Console) -> Marks:
    """Migrate and seed; return the high-water marks after the seed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        applied = migrate.migrate(conn)
    console.say(f"  schema      {len(applied)} migrations applied")
    seeded = seed.seed(settings)
    if seeded.code != exitcodes.OK:
        raise DemoFailed(f"seeding failed (exit {seeded.code})")
    console.say(f"  seed        {' '.join(seeded.report)}")
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(queries["high_water_marks"]).fetchone()
    assert row is not None
    return Marks(int(row[0]), int(row[1]), int(row[2]))


def _seed_devices(dsn: str) -> list[sim_devices.SimDevice]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        devices = sim_devices.devices_from_catalog(catalog.load(conn))
    if not devices:
        raise DemoFailed("the seeded devices are not in the database")
    return devices


def run(
    settings: Settings,
    console: Console,
    stop: threading.Event,
    *,
    duration: float,
    rate: float,
    bad_share: float,
    keep: bool,
) -> int:
    """The demo, start to summary and clean-up; returns the exit code. `stop` is set by a
    signal (the command's `on_stop`)."""
    console.say(
        f"iothub demo: the whole pipeline on this machine for {duration:g} s "
        f"({rate:g} msg/s, {bad_share:.0%} bad payloads)"
    )
    stack = contextlib.ExitStack()
    env = Environment(settings, stack, console, keep=keep)
    try:
        with stack:
            outcome = _run(env, stop, duration, rate, bad_share)
            console.say("cleaning up ...")
    except Interrupted:
        console.end_live()
        console.say(f"stopped; cleaned up: {', '.join(env.cleaned) or 'nothing to do'}")
        return exitcodes.INTERRUPTED
    except (DemoFailed, localservers.ServiceUnavailable, simulate.SimulationError) as exc:
        console.end_live()
        console.say(f"result: FAILED: {exc}")
        console.say(f"cleaned up: {', '.join(env.cleaned) or 'nothing to do'}")
        log.error("demo_failed", error=str(exc))
        return exitcodes.FAILURE
    except (psycopg.OperationalError, TimeoutError) as exc:
        console.end_live()
        first = _first_line(exc)
        console.say(f"result: FAILED: cannot reach a server: {first}")
        console.say(f"cleaned up: {', '.join(env.cleaned) or 'nothing to do'}")
        log.error("demo_failed", error=first)
        return exitcodes.CONNECTION_FAILED
    except psycopg.Error as exc:
        # e.g. no right to create the citext extension in the demo database
        console.end_live()
        console.say(f"result: FAILED: database: {_first_line(exc)}")
        console.say(f"cleaned up: {', '.join(env.cleaned) or 'nothing to do'}")
        log.error("demo_failed", error=_first_line(exc), sqlstate=exc.sqlstate)
        return exitcodes.FAILURE
    console.say(f"cleaned up: {', '.join(env.cleaned)}")
    return outcome


def _run(
    env: Environment, stop: threading.Event, duration: float, rate: float, bad_share: float
) -> int:
    console = env.console
    dsn = env.database()
    _check(stop)
    mqtt_url, shared = env.broker()
    _check(stop)
    demo, prefix = _demo_settings(env.settings, dsn, mqtt_url, shared)
    marks = _prepare_database(dsn, demo, console)
    _check(stop)
    run = Run(demo, console, stop, duration, rate, bad_share, env.cleaned, topic_prefix=prefix)
    run.start_service(env.stack)
    devices = _seed_devices(dsn)
    plan = Plan.for_run(duration, demo.max_age, datetime.now(UTC))
    run.speakers = assign_formats([d.serial_id for d in devices])
    console.say(
        f"  simulator   {len(devices)} devices of the seed; device time runs {plan.scale:g}x "
        f"from {plan.start:%H:%M} UTC, so rules with durations fire within the run"
    )
    for fmt, label in FORMAT_LABELS.items():
        serials = sorted(s for s, f in run.speakers.items() if f == fmt)
        if serials:
            console.say(f"    {label + ':':<18} {', '.join(serials)}")
    log.info(
        "demo_running",
        duration=duration,
        rate=rate,
        bad_share=bad_share,
        device_time_start=plan.start.isoformat(),
        device_time_scale=plan.scale,
        formats=run.speakers,
    )
    console.say()
    run.start_simulator(env.stack, devices, plan)
    run.watch()
    _check(stop)
    assert run.service is not None
    run.stop_service()  # before reading the summary: everything it took in is committed
    summary = _read_summary(dsn, marks, run, run.service)
    _print_summary(console, summary)
    missing = summary.missing(expect_rejections=bad_share > 0)
    console.say()
    if missing:
        console.say(f"result: FAILED: {'; '.join(missing)}")
        log.error("demo_failed", missing=missing)
        return exitcodes.FAILURE
    fired = sorted({e.rule for e in summary.events if e.triggered})
    rules = "1 rule" if len(fired) == 1 else f"{len(fired)} rules"
    console.say(
        f"result: OK: readings stored, rejections recorded with their reasons, {rules} fired"
    )
    log.info("demo_ok", rows=summary.rows, rules_fired=len(fired))
    return exitcodes.OK
