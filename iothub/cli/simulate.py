"""`iothub simulate`: simulated devices publishing realistic telemetry to the configured broker.

Each device publishes on its own topic (the first configured pattern with `{serial_id}`; the
shared topic with a `device` key when there is none); what the values and the bad messages are
is told in iothub/devtools/simulator/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from typing import Final

import structlog

from config.settings import Settings
from iothub import exitcodes, signals
from iothub.cli import argtypes
from iothub.devtools.simulator import formats
from iothub.devtools.simulator.devices import choose_devices
from iothub.devtools.simulator.messages import MessageFactory
from iothub.devtools.simulator.publisher import (
    CLIENT_ID_PREFIX,
    DEFAULT_QOS,
    SimulationError,
    Simulator,
)

log = structlog.get_logger(__name__)

DEFAULT_RATE: Final = 50.0  # messages per second, all devices together
DEFAULT_DEVICE_COUNT: Final = 10  # generated devices when no database says which exist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_rate(parser, DEFAULT_RATE)
    parser.add_argument(
        "--devices",
        default=None,
        metavar="SERIAL,...",
        help="serials to simulate (default: the seed's devices in the database when it answers, "
        "else --device-count generated ones)",
    )
    parser.add_argument(
        "--device-count",
        type=argtypes.count,
        default=DEFAULT_DEVICE_COUNT,
        help=f"generated devices when no database lists any (default {DEFAULT_DEVICE_COUNT})",
    )
    parser.add_argument(
        "--duration",
        type=argtypes.positive,
        default=None,
        help="seconds to run (default: until Ctrl-C or SIGTERM)",
    )
    parser.add_argument(
        "--readings-per-message",
        type=argtypes.count,
        default=None,
        help="metrics per message (default: all of the device's metrics)",
    )
    argtypes.add_bad_share(parser, 0.0)
    parser.add_argument(
        "--format",
        choices=formats.FORMATS,
        default="native",
        help="the devices' format (default native); the others need the [[sources]] entry that "
        "the simulate_source log line prints (docs/sources.md)",
    )
    parser.add_argument(
        "--qos", type=int, choices=(0, 1, 2), default=DEFAULT_QOS, help="MQTT QoS (default 1)"
    )
    parser.add_argument(
        "--client-id",
        default=None,
        help=f"MQTT client id (default {CLIENT_ID_PREFIX}-<pid>; never the ingestor's)",
    )


def _reserved_client_ids(settings: Settings) -> set[str]:
    actions = settings.mqtt_actions_client_id or f"{settings.mqtt_client_id}-actions"
    return {settings.mqtt_client_id, actions}


def main(settings: Settings, args: argparse.Namespace) -> int:
    client_id = args.client_id or f"{CLIENT_ID_PREFIX}-{os.getpid()}"
    if client_id in _reserved_client_ids(settings):
        # The same client id would take the service's session over and disconnect it.
        log.error("simulate_bad_client_id", client_id=client_id, why="it is the service's own")
        return exitcodes.USAGE
    stop = threading.Event()

    def stopping(name: str) -> None:
        log.info("simulate_stopping", signal=name)
        stop.set()

    # A repeated signal changes nothing: the publisher already stops within a tick.
    with signals.on_stop(stopping, repeat=lambda _name: stop.set()):
        return _simulate(settings, args, client_id, stop)


def _simulate(
    settings: Settings, args: argparse.Namespace, client_id: str, stop: threading.Event
) -> int:
    serials = [s.strip() for s in args.devices.split(",") if s.strip()] if args.devices else None
    if args.format != "native" and args.bad_share:
        # Bad messages are native ones; on another format's topic they would test nothing.
        log.error("simulate_bad_arguments", why="--bad-share works with --format native only")
        return exitcodes.USAGE
    try:
        devices, source = choose_devices(settings, serials, args.device_count)
        factory = MessageFactory(
            settings.mqtt_topics,
            devices,
            bad_share=args.bad_share,
            readings_per_message=args.readings_per_message,
            origin=time.time(),
            time_scale=1.0,
            max_payload_bytes=settings.max_payload_bytes,
            tz=settings.tz,
            rng=random.Random(),
        )
        traffic: MessageFactory | formats.FormatFactory = factory
        if args.format != "native":
            traffic = formats.FormatFactory(factory, args.format)
            # The daemon decodes this traffic only with this source configured.
            for entry in formats.sources_of(args.format):
                log.info("simulate_source", source=json.dumps(entry))
        log.info(
            "simulate_starting",
            devices=len(devices),
            source=source,
            topic=factory.pattern.pattern if args.format == "native" else args.format,
            rate=args.rate,
            duration=args.duration,
            bad_share=args.bad_share,
            client_id=client_id,
        )
        Simulator(
            settings.mqtt_url,
            traffic,
            rate=args.rate,
            duration=args.duration,
            stop=stop,
            qos=args.qos,
            client_id=client_id,
        ).run()
    except SimulationError as exc:
        log.error("simulate_failed", error=str(exc))
        return exitcodes.CONNECTION_FAILED
    return exitcodes.OK
