"""The webhook sender: POSTs the rendered JSON body (2xx is success) to public addresses only,
unless allow-listed (the address-checked backend of egress.py)."""

from __future__ import annotations

import base64
import json
from typing import Final

import httpcore
import httpx

from rules_engine.actions import egress, exceptions, sender, targets
from rules_engine.model import actions as actions_model

MAX_REASON_CHARS: Final = 60  # of a webhook's HTTP reason phrase, quoted in the detail
# Bytes of a response body read (and thrown away) so that its connection can be kept alive; a
# longer body is cut off by closing the connection. Bodies are never stored: the status says
# whether a delivery worked, and a body is the receiver's text, not ours to keep.
DRAIN_LIMIT: Final = 64 * 1024
WEBHOOK_CONNECTIONS: Final = 8  # kept-alive connections to webhook receivers at most
WEBHOOK_KEEPALIVE: Final = 30.0  # seconds an idle webhook connection is kept
USER_AGENT: Final = "iothub-outbox"
DELIVERY_HEADER: Final = "X-Iothub-Delivery"  # the outbox id: receivers can drop a repeat
# Headers that carry credentials: never sent over plain http:// (see _check_plain_http).
CREDENTIAL_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie"})


class WebhookSender:
    """POSTs webhooks through one pool of kept-alive connections, each delivery within one
    wall-clock deadline and to checked addresses only (`egress`). httpcore rather than httpx:
    it takes the network backend that does the checking, and follows no redirect by design (a
    3xx is a failed attempt; following it would need every hop checked, and is not done)."""

    def __init__(self, timeout: float, policy: egress.AddressPolicy | None = None) -> None:
        self._timeout = timeout
        self._policy = policy or egress.AddressPolicy()
        self._backend = egress.GuardedBackend(self._policy)
        self._pool = httpcore.ConnectionPool(
            network_backend=self._backend,
            max_connections=WEBHOOK_CONNECTIONS,
            max_keepalive_connections=WEBHOOK_CONNECTIONS,
            keepalive_expiry=WEBHOOK_KEEPALIVE,
        )

    def deliver(self, delivery: sender.Delivery) -> str:
        target = delivery.target
        if not isinstance(target, targets.WebhookTarget):
            raise exceptions.BadTarget(f"not a webhook target: {target.kind}")
        return self.send(delivery.outbox_id, target)

    def send(self, outbox_id: int, target: targets.WebhookTarget) -> str:
        where = sender.origin(target.url)
        url, headers, body = self._request(outbox_id, target)
        limit = {"connect": self._timeout, "read": self._timeout, "write": self._timeout}
        cut = ""
        try:
            if url.scheme == b"http" and any(
                name.lower() in CREDENTIAL_HEADERS for name, _ in headers
            ):
                with self._backend.deadline(self._timeout):
                    self._check_plain_http(url)
            with (
                self._backend.deadline(self._timeout),
                self._pool.stream(
                    "POST",
                    url,
                    headers=headers,
                    content=body,
                    extensions={"timeout": {**limit, "pool": self._timeout}},
                ) as response,
            ):
                status = response.status
                reason = _reason(response.extensions.get("reason_phrase", b""))
                if not self._drain(response):
                    cut = "; rest of the body discarded"
        except egress.DestinationRefused as exc:
            raise exceptions.RefusedTarget(f"refused {where}: {exc}") from None
        except httpcore.TimeoutException:
            raise exceptions.DeliveryFailed(
                f"no complete answer from {where} within {self._timeout:g} s"
            ) from None
        except httpcore.ConnectError as exc:
            raise exceptions.DeliveryFailed(f"cannot connect to {where}: {exc}") from None
        except (httpcore.UnsupportedProtocol, httpcore.LocalProtocolError) as exc:
            raise exceptions.BadTarget(f"cannot POST to {where}: {exc}") from None
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise exceptions.DeliveryFailed(
                f"POST to {where} failed: {type(exc).__name__}: {exc}"
            ) from None
        if 200 <= status < 300:
            return f"HTTP {status} from {where}{cut}"
        moved = " (redirects are not followed)" if 300 <= status < 400 else ""
        raise exceptions.DeliveryFailed(
            f"HTTP {status} {reason}".rstrip() + f" from {where}{moved}"
        )

    def _request(
        self, outbox_id: int, target: targets.WebhookTarget
    ) -> tuple[httpcore.URL, list[tuple[bytes, bytes]], bytes]:
        try:
            url = httpx.URL(target.url)
        except httpx.InvalidURL as exc:
            raise exceptions.BadTarget(f"invalid webhook url: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise exceptions.BadTarget("invalid webhook url: needs an absolute http(s) URL")
        given = target.headers or {}
        problem = actions_model.header_problem(given)
        if problem is not None:  # a row written before the rule check knew, or by hand
            raise exceptions.RefusedTarget(problem)
        named: dict[str, tuple[str, str]] = {
            "user-agent": ("User-Agent", USER_AGENT),
            "content-type": ("Content-Type", "application/json"),
        }
        if url.username or url.password:
            token = base64.b64encode(f"{url.username}:{url.password}".encode()).decode()
            named["authorization"] = ("Authorization", f"Basic {token}")
        named.update({name.lower(): (name, value) for name, value in given.items()})
        named["x-iothub-delivery"] = (DELIVERY_HEADER, str(outbox_id))
        headers = [(name.encode(), value.encode()) for name, value in named.values()]
        try:
            body = json.dumps(target.body, ensure_ascii=False, separators=(",", ":")).encode()
        except (UnicodeEncodeError, ValueError) as exc:
            raise exceptions.BadTarget(f"cannot encode the webhook body: {exc}") from None
        plain = httpcore.URL(
            scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
        )
        return plain, headers, body

    def _check_plain_http(self, url: httpcore.URL) -> None:
        # Credentials over plain HTTP travel in clear to whoever is on the path (the same rule
        # as SMTP without STARTTLS): they go only to a host whose every address lies in a
        # network the operator opened (`action_allow_networks`), never to the internet. The
        # address policy is applied first, so a refused address is refused for what it is.
        host = url.host.decode("ascii")
        addresses = self._backend.checked_addresses(host, url.port or 80, self._timeout)
        if not all(self._policy.opened(address) for address in addresses):
            raise egress.DestinationRefused(
                "credentials over plain http:// would travel in clear: use https://"
                " (or a receiver in action_allow_networks)"
            )

    @staticmethod
    def _drain(response: httpcore.Response) -> bool:
        """Read and forget the body up to DRAIN_LIMIT; True when it was read to its end (the
        connection can be used again), False when it was cut off (the connection is closed)."""
        seen = 0
        try:
            for chunk in response.iter_stream():
                seen += len(chunk)
                if seen > DRAIN_LIMIT:
                    return False
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError):
            return False  # the status was read: the body cannot change the outcome
        return True

    def close(self) -> None:
        self._pool.close()
        self._backend.close()


def _reason(raw: object) -> str:
    # The reason phrase is the receiver's text: printable ASCII only, and short.
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else ""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return sender.clip(text, MAX_REASON_CHARS)
