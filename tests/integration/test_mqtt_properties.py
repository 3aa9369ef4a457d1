"""ingestor.mqtt's lean MQTT 5 Properties: what paho delivers is unchanged, over a real broker.

`make_client` swaps paho's Properties class for one that keeps its lookup tables on the class
(`mqtt.install_lean_properties`). These tests send real MQTT 5 PUBLISHes with and without
properties through Mosquitto and read them back with a client of the wrapper.
"""

from __future__ import annotations

import queue
import threading
import uuid

from ingestor import mqtt
from tests.support.paho_api import PacketTypes, Properties
from tests.support.paho_api import client as paho

WAIT = 10.0  # seconds
TABLES = {"packetType", "types", "names", "properties"}  # what paho keeps besides the values


def carried(props: Properties | None) -> dict[str, object]:
    """The properties a Properties object holds, by paho's attribute names."""
    assert props is not None
    return {name: value for name, value in vars(props).items() if name not in TABLES}


def _receive(
    broker_url: str, sends: list[tuple[bytes, Properties | None]]
) -> list[paho.MQTTMessage]:
    """Publish each (payload, properties) at QoS 1 on a fresh topic; what a wrapper client got."""
    topic = f"lean/{uuid.uuid4().hex}"
    got: queue.Queue[paho.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    receiver = mqtt.make_client(broker_url, f"lean-rx-{uuid.uuid4().hex[:8]}")
    receiver.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    receiver.on_subscribe = lambda *_: subscribed.set()
    receiver.on_message = lambda _c, _u, message: got.put(message)
    receiver.connect(*mqtt.host_port(broker_url))
    receiver.loop_start()
    sender = mqtt.make_client(broker_url, f"lean-tx-{uuid.uuid4().hex[:8]}")
    sender.connect(*mqtt.host_port(broker_url))
    sender.loop_start()
    try:
        assert subscribed.wait(WAIT), "no SUBACK"
        for body, props in sends:
            info = sender.publish(topic, body, qos=1, properties=props)
            info.wait_for_publish(WAIT)
            assert info.is_published()
        return [got.get(timeout=WAIT) for _ in sends]
    finally:
        for client in (sender, receiver):
            client.disconnect()
            mqtt.stop_loop(client)


def test_make_client_installs_the_lean_class_for_the_pinned_paho() -> None:
    """With the paho this project pins, the swap is in place (a paho upgrade that changes
    Properties turns it off, and this test says so)."""
    mqtt.make_client("mqtt://127.0.0.1:1883", "lean-install")
    assert mqtt.install_lean_properties() is True
    assert carried(Properties(PacketTypes.PUBLISH)) == {}  # type: ignore[no-untyped-call]


def test_properties_survive_the_round_trip_and_an_empty_set_stays_empty(broker_url: str) -> None:
    """User properties, content type, expiry: what was sent arrives; a PUBLISH without
    properties arrives with none, and the next one's are not mixed into it."""
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = [("site", "north"), ("gw", "7")]
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 3600
    plain, rich, plain_again = _receive(
        broker_url, [(b"first", None), (b"second", props), (b"third", None)]
    )
    assert type(plain.properties) is not Properties  # the lean class decoded it
    assert (plain.payload, carried(plain.properties)) == (b"first", {})
    assert rich.payload == b"second"
    got = carried(rich.properties)
    expiry = got.pop("MessageExpiryInterval")
    assert isinstance(expiry, int) and 0 < expiry <= 3600
    assert got == {
        "UserProperty": [("site", "north"), ("gw", "7")],
        "ContentType": "application/json",
    }
    assert (plain_again.payload, carried(plain_again.properties)) == (b"third", {})
    # Still paho's checks on assignment: a property a PUBLISH cannot carry is refused.
    try:
        setattr(plain.properties, "SessionExpiryInterval", 5)  # noqa: B010
    except Exception as exc:  # paho raises its MQTTException
        assert "does not apply" in str(exc)
    else:
        raise AssertionError("a CONNECT property was accepted on a PUBLISH")
