"""Which decoder reads a topic: the native patterns first, then the ``sources`` in order.

``SourceRouter.match`` gives a ``Route`` whose ``decode`` turns the payload into readings and
rejections; ``ingestor.batch`` does the rest as for any native message. A topic one of a source's
``exclude_topics`` names is ignored: acknowledged, neither stored nor recorded (bridge state,
availability, commands: not telemetry).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import NamedTuple

import structlog

from config import topics
from config.sources import Source
from ingestor import payload
from ingestor.aliases import AliasStore
from ingestor.decoders import base, flat_json, native, senml, tasmota, ttn, value
from ingestor.payload import Limits, ParseResult
from ingestor.reasons import Reason

DECODERS: Mapping[str, base.Decoder] = {
    "native": native.decode,
    "flat_json": flat_json.decode,
    "tasmota": tasmota.decode,
    "value": value.decode,
    "senml": senml.decode,
    "ttn": ttn.decode,
}


def _sparkplug_b(aliases: AliasStore) -> base.Decoder:
    # Imported only when a router has a sparkplug_b source: the decoder brings protobuf and the
    # Sparkplug B descriptors, ~27 MB in every process (the receiving one and each worker) of a
    # deployment that has no Sparkplug device.
    from ingestor.decoders import sparkplug_b  # noqa: PLC0415

    return sparkplug_b.SparkplugDecoder(aliases)


# Decoders that keep state, by the function that builds one around a router's aliases: built per
# router, and only for the formats of its sources.
STATEFUL: Mapping[str, Callable[[AliasStore], base.Decoder]] = {"sparkplug_b": _sparkplug_b}
_NOTHING = ParseResult((), ())
# The topic fields of a native route: one read-only mapping shared by all of them.
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
# SourceRouter.match remembers the route of this many topics, each at most this long: a fleet's
# topics repeat with every message, and a dict lookup costs a tenth of matching the topic again.
# Bounded (cleared when full, as the sparkplug_b decoder's topics) so that hostile or churning
# topics cost at most a few MB per process.
_MAX_ROUTES = 10_000
_MAX_ROUTED_TOPIC = 256  # characters
log = structlog.get_logger(__name__)


class Route(NamedTuple):
    """A received topic with its source (None for the native patterns) and topic fields. A
    NamedTuple: one is made per message, and a frozen dataclass with a default_factory field
    cost several times as much to make."""

    serial_id: str | None  # for the rejection of a retained copy, before any decoding
    source: Source | None = None
    fields: Mapping[str, str] = _NO_FIELDS
    ignored: bool = False
    decoder: base.Decoder | None = None  # the source's, when it keeps state (sparkplug_b)

    def decode(self, data: bytes, received_at: datetime, limits: Limits) -> ParseResult:
        """The message's readings and rejections; never raises for any payload."""
        if self.ignored:
            return _NOTHING
        source = self.source
        if source is None:
            return payload.parse_message(data, self.serial_id, received_at, limits)
        try:
            decode = self.decoder or DECODERS[source.decoder]
            parsed = decode(source, self.fields, data, received_at, limits)
        except Exception as exc:
            # Same last line of defence as parse_message: recorded, logged, and intake goes on.
            log.exception("source_decoder_failed", source=source.name, decoder=source.decoder)
            return ParseResult(
                (),
                (
                    payload.Rejection(
                        Reason.bad_schema,
                        f"source {source.name!r}: {payload.INTERNAL_ERROR}{type(exc).__name__}",
                        self.serial_id,
                    ),
                ),
            )
        if not parsed.rejections:
            return parsed
        # The source's name in rejected_messages.detail says which mapping read the message.
        return ParseResult(
            parsed.readings,
            tuple(
                payload.Rejection(
                    r.reason, f"source {source.name!r}: {r.detail}", r.serial_id, r.metric
                )
                for r in parsed.rejections
            ),
            parsed.births,
        )


@dataclass(frozen=True)
class SourceRouter:
    """The native topic patterns and the configured sources, tried in that order."""

    native: topics.TopicRouter
    sources: tuple[Source, ...] = ()
    # What Sparkplug births defined (ingestor.aliases): loaded by the pipeline before the first
    # batch, changed by batch.prepare, read by the sparkplug_b decoder.
    aliases: AliasStore = field(default_factory=AliasStore, compare=False)
    _stateful: Mapping[str, base.Decoder] = field(init=False, repr=False, compare=False)
    # What match() found for recent topics (None included): a route depends on the topic alone.
    _routes: dict[str, Route | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        missing = [
            s.decoder
            for s in self.sources
            if s.decoder not in DECODERS and s.decoder not in STATEFUL
        ]
        if missing:
            raise ValueError(f"no decoder {missing[0]!r} in this build")
        formats = {s.decoder for s in self.sources if s.decoder in STATEFUL}
        object.__setattr__(
            self, "_stateful", {name: STATEFUL[name](self.aliases) for name in sorted(formats)}
        )
        native_filters = {p.subscription for p in self.native.patterns}
        for source in self.sources:
            # One filter twice would make the broker deliver each of its messages twice.
            if source.topic.subscription in native_filters:
                raise ValueError(
                    f"source {source.name!r} subscribes to {source.topic.subscription!r}, "
                    "like one of mqtt_topics"
                )

    @property
    def keeps_aliases(self) -> bool:
        """Whether a source reads Sparkplug B, whose births the pipeline must load at start."""
        return any(source.decoder == "sparkplug_b" for source in self.sources)

    def subscriptions(self, group: str | None = None) -> tuple[str, ...]:
        """Every MQTT filter to subscribe to, shared under ``group`` when given."""
        own = tuple(
            source.topic.subscription
            if group is None
            else f"$share/{group}/{source.topic.subscription}"
            for source in self.sources
        )
        return (*self.native.subscriptions(group), *own)

    def match(self, topic: str) -> Route | None:
        """The route of the first pattern or source that fits ``topic``, or None."""
        routes = self._routes
        if topic in routes:  # not try/except: past the bound every topic may be a miss
            return routes[topic]
        route = self._match(topic)
        if len(topic) <= _MAX_ROUTED_TOPIC:
            if len(routes) >= _MAX_ROUTES:
                routes.clear()  # churning or hostile topics: start again, never grow
            routes[topic] = route
        return route

    def _match(self, topic: str) -> Route | None:
        found = self.native.match(topic)
        if found is not None:
            return Route(found.serial_id)
        for source in self.sources:
            fields = source.topic.match(topic)
            if fields is None:
                continue
            serial = source.serial_for(fields)
            return Route(
                serial,
                source,
                fields,
                ignored=source.ignores(topic),
                decoder=self._stateful.get(source.decoder),
            )
        return None


def router_for(native_patterns: tuple[str, ...], sources: tuple[Source, ...]) -> SourceRouter:
    """The router of the settings' ``mqtt_topics`` and parsed ``sources``."""
    return SourceRouter(topics.TopicRouter.from_strings(native_patterns), sources)
