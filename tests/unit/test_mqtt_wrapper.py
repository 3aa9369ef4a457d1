"""ingestor.mqtt, the one paho wrapper: clients from the settings' target, guarded callbacks."""

from __future__ import annotations

from structlog.testing import capture_logs

from config.settings import MqttTarget
from ingestor import mqtt
from tests.support.paho_api import client as paho


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    @mqtt.guarded("on_message")
    def on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.calls += 1
        raise RuntimeError(f"broken by {message.mid} on {client} with {userdata}")


def test_a_guarded_callback_logs_its_name_and_never_raises() -> None:
    """An exception in a callback is logged as mqtt_callback_failed with the callback's name."""
    counter = Counter()
    client = mqtt.make_client("mqtt://127.0.0.1:1883", "guarded-test")
    with capture_logs() as logs:
        counter.on_message(client, None, paho.MQTTMessage(mid=1, topic=b"t"))
    assert counter.calls == 1
    assert [(e["event"], e["callback"]) for e in logs] == [("mqtt_callback_failed", "on_message")]


def test_host_port_and_credentials_come_from_the_one_url_parser() -> None:
    """A URL and the settings' MqttTarget give the same host, port and login."""
    url = "mqtts://dev%40site:p%23ss@broker.example"
    assert mqtt.host_port(url) == ("broker.example", 8883)
    target = mqtt.target_of(url)
    assert (target.username, target.password, target.tls) == ("dev@site", "p#ss", True)
    plain = MqttTarget(host="h", port=1884, username=None, password=None, tls=False)
    assert mqtt.host_port(plain) == ("h", 1884)


def test_a_topic_that_is_not_utf8_is_decoded_with_replacement() -> None:
    """paho's `topic` raises on such bytes; message_topic keeps the message recordable."""
    assert mqtt.message_topic(paho.MQTTMessage(mid=1, topic=b"a/\xff/b")) == "a/\ufffd/b"
    assert mqtt.message_topic(paho.MQTTMessage(mid=1, topic=b"a/b")) == "a/b"


def test_a_client_never_started_has_no_network_thread() -> None:
    """network_thread_alive is False before loop_start(), and stop_loop is safe then."""
    client = mqtt.make_client("mqtt://127.0.0.1:1883", "thread-test")
    assert not mqtt.network_thread_alive(client)
    mqtt.stop_loop(client)
