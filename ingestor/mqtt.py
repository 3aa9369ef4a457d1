"""The one wrapper around paho: every MQTT client of the project is made and handled here.

Intake, the action publisher, the simulator and the demo's probe all use paho the same way: a
MQTT v5 client built from the broker URL (credentials and TLS applied), callbacks that run on
paho's network thread and must never raise, and a few paho internals we have to reach. Those
internals (`_reset_sockets`, `MQTTMessage._topic`, `Client._thread`) are touched only in this
module, each in a named function that says why, so a paho upgrade is checked in one place.

No other module imports paho (ruff's banned-api rule holds that): the paho names the callers
need in their signatures are re-exported below.
"""

from __future__ import annotations

import functools
import importlib
import struct
import threading
from collections.abc import Callable
from typing import Concatenate, Final, ParamSpec, TypeVar

import paho.mqtt.client as _paho
import structlog
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.properties import Properties as _PahoProperties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from config.settings import MqttTarget, parse_mqtt_url

__all__ = [
    "ERR_NO_CONN",
    "ERR_SUCCESS",
    "Client",
    "ConnectFlags",
    "ConnectHeld",
    "DisconnectFlags",
    "MQTTMessage",
    "MqttTarget",
    "Properties",
    "Publish",
    "PublishSink",
    "ReasonCode",
    "SubscribeOptions",
    "ack_many",
    "connect_properties",
    "error_string",
    "gate_connects",
    "guarded",
    "host_port",
    "install_lean_properties",
    "make_client",
    "max_packet_size",
    "message_topic",
    "network_thread_alive",
    "receive_maximum",
    "set_publish_sink",
    "stop_loop",
    "target_of",
]

log = structlog.get_logger(__name__)

# paho's types, for the callers' signatures (they may not import paho themselves).
Client = _paho.Client
MQTTMessage = _paho.MQTTMessage
ConnectFlags = _paho.ConnectFlags
DisconnectFlags = _paho.DisconnectFlags
ERR_SUCCESS: Final = _paho.MQTT_ERR_SUCCESS
ERR_NO_CONN: Final = _paho.MQTT_ERR_NO_CONN
error_string = _paho.error_string

# A PUBLISH is its payload plus a fixed header (up to 5 bytes), the topic (2 + its length), a
# packet id (2) and properties. 4 KiB of room covers every topic iothub subscribes to by
# default (a serial is at most 255 characters) with properties to spare.
PACKET_HEADER_ROOM = 4096  # bytes
MQTT_MAX_PACKET_SIZE = 268_435_455  # bytes: the largest Remaining Length MQTT can encode

P = ParamSpec("P")
S = TypeVar("S")


def max_packet_size(max_payload_bytes: int) -> int:
    """The MQTT 5 Maximum Packet Size to announce in CONNECT for this payload limit.

    The broker must not send us a larger packet (MQTT 5 §3.1.2.11.4): Mosquitto drops such a
    message for this client instead (and logs it), so an oversize payload never reaches our
    memory, let alone rejected_messages."""
    return min(max_payload_bytes + PACKET_HEADER_ROOM, MQTT_MAX_PACKET_SIZE)


def target_of(broker: MqttTarget | str) -> MqttTarget:
    """The broker as a target; a URL is parsed by the settings' one parser."""
    return broker if isinstance(broker, MqttTarget) else parse_mqtt_url(broker)


# The modules whose `Properties` paho's packet decoding calls: `_packet` (paho 2.2, where
# decode_publish lives) and `client` (paho 2.1 decodes PUBLISH there).
_PROPERTY_USERS: Final = ("paho.mqtt._packet", "paho.mqtt.client")
# What paho's Properties.__init__ sets on each instance; the lean class keeps the last three
# on the class. Anything else means paho changed, and the lean class is not installed.
_PROPERTY_FIELDS: Final = frozenset({"packetType", "types", "names", "properties"})


class _LeanProperties(_PahoProperties):
    """paho's Properties, made cheaply.

    paho builds a Properties object for every MQTT 5 PUBLISH it receives, and its __init__
    rebuilds three lookup tables (27 names, 27 property types) each time; `unpack` then loops
    over all 27 names to clear attributes the new object cannot have. Measured on the receive
    path of one connection, that is about half of paho's CPU per message, and what MQTT 5
    costs over 3.1.1. The tables never change: here they are built once, on the class, and a
    PUBLISH without properties (the usual one) is unpacked without the loop. Everything else
    (`__setattr__` checks, `pack`, properties that are present) is paho's own code."""

    _template = _PahoProperties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    types = _template.types
    names = _template.names
    properties = _template.properties

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def unpack(self, buffer: bytes | bytearray) -> tuple[Properties, int]:
        # A zero property length is one byte, 0; a fresh object has nothing to clear.
        if buffer[:1] == b"\x00" and len(self.__dict__) == 1:
            return self, 1
        result: tuple[Properties, int] = super().unpack(buffer)  # type: ignore[no-untyped-call]
        return result


@functools.cache
def install_lean_properties() -> bool:
    """Make paho's packet decoding build `_LeanProperties` (the first call does; True: in place).

    Touches the private modules named in `_PROPERTY_USERS`, and only when paho's Properties
    still sets exactly `_PROPERTY_FIELDS`: after a paho upgrade that changed it, paho's own
    class stays, the cost comes back, and `lean_properties_off` says so."""
    fields = set(vars(_PahoProperties(PacketTypes.PUBLISH)))  # type: ignore[no-untyped-call]
    if fields != _PROPERTY_FIELDS:
        log.warning(
            "lean_properties_off",
            fields=sorted(fields),
            why="paho's Properties changed; MQTT 5 packets are decoded at paho's own cost",
        )
        return False
    for name in _PROPERTY_USERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if getattr(module, "Properties", None) is _PahoProperties:
            setattr(module, "Properties", _LeanProperties)  # noqa: B010 (a private module)
    return True


class _NoTopicCallbacks:
    """Stands in for paho's matcher of per-topic callbacks (`message_callback_add`), which no
    client of ours uses: paho walks it for every message received, to find none (a recursive
    generator over the topic's levels). With this, `on_message` is called straight away; a
    `message_callback_add` fails loudly (TypeError) instead of being ignored."""

    def iter_match(self, _topic: str) -> tuple[()]:
        return ()


# A PUBLISH as the intake keeps it: topic, payload, packet id, QoS, dup, retain.
Publish = tuple[str, bytes, int, int, bool, bool]
PublishSink = Callable[[list[Publish]], None]

# How much one read from the socket may bring into the client's buffer.
_READ_CHUNK: Final = 65_536  # bytes
# Packets read between two looks at what waits to be written (PUBACKs) while packets keep
# coming: about a full read chunk of small PUBLISHes.
_READ_BURST: Final = 1_000


class _BufferedClient(_paho.Client):
    """paho's client, reading its socket in chunks.

    paho reads a packet in three `recv()` calls (the type byte, the length byte(s), the rest),
    and handles one packet each time `select()` wakes its thread: four system calls, and as
    many releases of the GIL, per PUBLISH. Here a read brings up to 64 KiB into a buffer that
    paho's own framing (`_packet_read`) then takes its bytes from, and one wake handles every
    packet the buffer holds. paho's exception handling of a read (TLS, websockets, a lost
    connection) stays paho's: an empty buffer is refilled through paho's own `_sock_recv`.

    The buffer belongs to one socket: a new socket (a reconnect) starts with an empty one, so
    bytes of a lost connection are never taken for packets of the next."""

    _rbuf: bytes = b""
    _rpos: int = 0
    _rsock: object = None
    _publish_sink: PublishSink | None = None  # see set_publish_sink

    def _refill(self, size: int = _READ_CHUNK) -> bytes:
        """Read up to `size` bytes from the current socket into the (empty) buffer, through
        paho's own `_sock_recv`: it raises as paho does, and gives b"" at EOF."""
        self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        buf = super()._sock_recv(size)
        self._rbuf = buf
        return buf

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos == len(buf) or self._rsock is not self._sock:
            if bufsize >= _READ_CHUNK:  # a large payload: straight into paho's packet
                self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
                return super()._sock_recv(bufsize)
            buf, pos = self._refill(), 0
        end = pos + bufsize
        self._rpos = min(end, len(buf))
        return buf[pos:end]

    def _sock_close(self) -> None:
        # What was read from a socket dies with it: bytes of a lost connection are never
        # taken for packets of the next, nor counted as waiting to be read on it.
        super()._sock_close()
        self._rbuf, self._rpos, self._rsock = b"", 0, None

    def _buffered(self) -> bool:
        """Whether bytes read from the current socket wait in the buffer."""
        return self._rsock is self._sock and self._rpos < len(self._rbuf)

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:  # noqa: ARG002 (paho ignores it too)
        """paho's `loop_read`, which handles one packet a wake (it ignores `max_packets`),
        handling what the buffer holds: it returns only with the buffer empty and nothing more
        to read, so `select()` never sleeps over bytes already read. While packets keep coming,
        every `_READ_BURST` packets it does what paho's loop does between two wakes: the
        keepalive (a PINGREQ when nothing was sent for a while, a PINGRESP overdue) and the
        writes that wait (PUBACKs, a PINGREQ, a DISCONNECT); and it gives the loop back if
        the network thread is being stopped."""
        handled = flushed = 0
        while True:
            if self._sock is None:
                return _paho.MQTT_ERR_NO_CONN
            # Between packets (paho holds no part of one): PUBLISHes at the head of the
            # buffer go to the sink, the next packet of any other kind to paho.
            if self._publish_sink is not None and self._in_packet["command"] == 0:
                handled += self._take_publishes(self._publish_sink)
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
            if rc == _paho.MQTT_ERR_AGAIN and not self._buffered():
                return _paho.MQTT_ERR_SUCCESS
            handled += 1
            if handled - flushed >= _READ_BURST:
                flushed = handled
                rc = self.loop_misc()  # paho's own keepalive; it closes a dead connection
                if rc == _paho.MQTT_ERR_SUCCESS and self.want_write():
                    rc = self.loop_write()  # paho's own: it handles a failed write itself
                if rc != _paho.MQTT_ERR_SUCCESS:
                    return rc
                if self._thread_terminate:  # loop_stop(): bytes still buffered stay unread
                    return _paho.MQTT_ERR_SUCCESS

    def _take_publishes(self, sink: PublishSink) -> int:
        """Decode the run of complete QoS 0/1 PUBLISH packets at the head of the buffer and
        hand them to `sink` in one call; the number handed. Anything else stops the run at
        that packet, which paho then reads and handles itself: another packet type, QoS 2
        (paho keeps its state), a topic that is not UTF-8 (paho's message says so), a length
        or property length that is malformed, or a packet not wholly in the buffer yet."""
        buf, pos = self._rbuf, self._rpos
        if pos == len(buf) or self._rsock is not self._sock:
            try:
                buf, pos = self._refill(), 0
            except OSError:  # nothing to read now (BlockingIOError), or a lost connection:
                return 0  # paho's own read, next, meets it again and handles it
        end = len(buf)
        out: list[Publish] = []
        while end - pos >= 2:
            header = buf[pos]
            if header & 0xF0 != 0x30 or header & 0x06 > 0x02:  # not PUBLISH, or QoS 2 / 3
                break
            length, shift, i = 0, 0, pos + 1
            while i < end and i - pos <= 4:
                byte = buf[i]
                length |= (byte & 0x7F) << shift
                shift += 7
                i += 1
                if byte < 0x80:
                    break
            else:
                break  # the length is not all here yet, or runs past 4 bytes (paho refuses it)
            stop = i + length
            if stop > end or length < 3:
                break
            topic_end = i + 2 + (buf[i] << 8 | buf[i + 1])
            qos = (header >> 1) & 0x03
            mid = 0
            if qos:
                mid = buf[topic_end] << 8 | buf[topic_end + 1] if topic_end + 2 <= stop else -1
                props = topic_end + 2
            else:
                props = topic_end
            if mid < 0 or props >= stop or buf[props] >= 0x80:  # a long property set: paho's
                break
            start = props + 1 + buf[props]  # the properties are skipped: see set_publish_sink
            if start > stop:
                break
            try:
                topic = buf[i + 2 : topic_end].decode()
            except UnicodeDecodeError:
                break
            out.append((topic, buf[start:stop], mid, qos, bool(header & 0x08), bool(header & 0x01)))
            pos = stop
        if not out:
            return 0
        self._rpos = pos
        with self._msgtime_mutex:
            self._last_bytes_received = _paho.time_func()
        with self._in_callback_mutex:  # as paho runs its callbacks: one at a time
            sink(out)
        return len(out)


# paho's private state the sink reads or keeps as paho would (checked before it is set).
_SINK_NEEDS: Final = (
    "_in_packet",
    "_thread_terminate",
    "_msgtime_mutex",
    "_last_bytes_received",
    "_in_callback_mutex",
    "_loop_rc_handle",
)


def set_publish_sink(client: _paho.Client, sink: PublishSink) -> bool:
    """Hand `client`'s QoS 0/1 PUBLISHes to `sink` in runs, as (topic, payload, mid, qos, dup,
    retain), instead of one `on_message` call each; True if the client can (one of
    `make_client`'s, MQTT 5).

    paho decodes each PUBLISH into an MQTTMessage (with a Properties object and an
    MQTTMessageInfo holding a Condition) and runs the callback under two locks: about half of
    what the receiving process spends per message. The sink gets what the intake keeps of a
    message and nothing else: the PUBLISH properties are skipped (the intake reads none; the
    broker sends no topic alias, since the client announces no Topic Alias Maximum). A packet
    the sink cannot take is paho's, and reaches `on_message` as before; the order of all
    messages is the order on the wire. The sink runs on the network thread and must not
    raise (see `guarded`)."""
    if not isinstance(client, _BufferedClient) or client._protocol != _paho.MQTTv5:
        return False
    missing = [name for name in _SINK_NEEDS if not hasattr(client, name)]
    if missing or "command" not in client._in_packet:
        log.warning(
            "publish_sink_off",
            missing=missing or ["_in_packet['command']"],
            why="paho's client changed; every message is decoded by paho, at paho's cost",
        )
        return False
    client._publish_sink = sink
    return True


def make_client(
    broker: MqttTarget | str, client_id: str, *, manual_ack: bool = False
) -> _paho.Client:
    """An MQTT v5 client with the target's credentials and TLS applied (not connected yet)."""
    install_lean_properties()
    target = target_of(broker)
    client = _BufferedClient(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=_paho.MQTTv5,
        manual_ack=manual_ack,
    )
    # paho's private attribute, set in its __init__; see _NoTopicCallbacks.
    client._on_message_filtered = _NoTopicCallbacks()  # type: ignore[assignment]
    if target.username:
        client.username_pw_set(target.username, target.password)
    if target.tls:
        client.tls_set()
    return client


_PUBACK: Final = struct.Struct("!BBH")  # a PUBACK: type 0x40, remaining length 2, packet id
_PUBACK_TYPE: Final = 0x40


def ack_many(client: _paho.Client, mids: list[int]) -> None:
    """Acknowledge QoS 1 messages by packet id, in this order, as one write.

    paho's `ack()` queues each PUBACK as a packet of its own, and wakes its network thread
    with a write to its socket pair each time; the network thread then sends each with a
    `send()` of its own: two system calls per message on the receiving path. These are the
    same bytes (a v5 PUBACK without reason code means success, as paho's own) queued once,
    through paho's private `_packet_queue`, in paho's outgoing order. paho drops its queue on
    reconnect, so PUBACKs of a lost connection are never sent on the next one."""
    if mids and client._manual_ack:  # as paho's ack(): without manual_ack paho sent them
        pack = _PUBACK.pack
        packet = b"".join([pack(_PUBACK_TYPE, 2, mid) for mid in mids])
        client._packet_queue(_PUBACK_TYPE, packet, 0, 0)


def host_port(broker: MqttTarget | str) -> tuple[str, int]:
    """Where to connect: the target's host and port (the scheme's default port if none)."""
    target = target_of(broker)
    return target.host, target.port


def connect_properties(
    *, session_expiry: int, receive_maximum: int, maximum_packet_size: int
) -> Properties:
    """The CONNECT properties of a persistent MQTT 5 session."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = session_expiry
    props.ReceiveMaximum = receive_maximum
    props.MaximumPacketSize = maximum_packet_size
    return props


def receive_maximum(properties: Properties | None) -> int | None:
    """The broker's Receive Maximum from a CONNACK, if it sent one."""
    value = getattr(properties, "ReceiveMaximum", None)
    return value if isinstance(value, int) and value > 0 else None


def guarded(
    name: str,
) -> Callable[[Callable[Concatenate[S, P], None]], Callable[Concatenate[S, P], None]]:
    """Decorate a paho callback method: an exception is logged as `mqtt_callback_failed`
    with the callback's name, never raised.

    paho runs callbacks on its network thread; one that raises ends that thread silently
    (paho 2.x re-raises unless `suppress_exceptions`), and `is_connected()` still says True."""

    def decorate(
        callback: Callable[Concatenate[S, P], None],
    ) -> Callable[Concatenate[S, P], None]:
        @functools.wraps(callback)
        def run(self: S, /, *args: P.args, **kwargs: P.kwargs) -> None:
            try:
                callback(self, *args, **kwargs)
            except Exception:
                log.exception("mqtt_callback_failed", callback=name)

        return run

    return decorate


class ConnectHeld(OSError):  # an OSError, so that paho takes it for a failed attempt
    """Not connecting now: this client id's session may belong to another instance."""

    def __init__(self) -> None:
        super().__init__(self.__doc__)


def gate_connects(client: _paho.Client, may_connect: Callable[[], bool]) -> None:
    """Ask `may_connect()` before every connection attempt paho makes, its automatic
    reconnects included; False ends the attempt before a socket is opened.

    paho has no switch that pauses its reconnect loop (`reconnect_on_failure` is read once per
    lost connection, and off it ends the network thread for good). Its `on_pre_connect` hook
    runs inside `reconnect()` before the socket is created, and `loop_forever()` takes an
    OSError out of `reconnect()` for a failed attempt (as a refused TCP connection): it waits
    its reconnect delay and tries again, or ends if `disconnect()` was called meanwhile. So the
    hook raises `ConnectHeld`, an OSError. `may_connect` may block (there is no connection
    to keep alive then) but must return when the client is being stopped."""

    def pre_connect(_client: _paho.Client, _userdata: object) -> None:
        if not may_connect():
            raise ConnectHeld

    client.on_pre_connect = pre_connect


def message_topic(message: _paho.MQTTMessage) -> str:
    """The message's topic, decoded with replacement when it is not UTF-8.

    paho's `topic` property raises UnicodeDecodeError on such a topic; its raw bytes are only
    in the private `_topic`. A message on such a topic must still be recorded as rejected, not
    lost in the callback."""
    try:
        return message.topic
    except UnicodeDecodeError:
        return message._topic.decode("utf-8", "replace")


def network_thread_alive(client: _paho.Client) -> bool:
    """Whether paho's network thread (started by `loop_start()`) is running.

    paho keeps the thread in the private `_thread` and offers no public way to ask; a thread
    that died (an exception in paho itself) leaves `is_connected()` saying True."""
    thread: threading.Thread | None = getattr(client, "_thread", None)
    return thread is not None and thread.is_alive()


def stop_loop(client: _paho.Client) -> None:
    """`loop_stop()`, then close the wake-up socket pair paho 2.x leaves open.

    Without the private `_reset_sockets(sockpair_only=True)` every client made and stopped
    leaks two sockets (a ResourceWarning in the tests, file descriptors in a long run)."""
    client.loop_stop()
    client._reset_sockets(sockpair_only=True)
