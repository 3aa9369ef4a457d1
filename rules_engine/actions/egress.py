"""Where a webhook delivery may connect, and for how long: the outbox's egress policy.

A rule's webhook URL is written by whoever may edit rules, and what it resolves to is decided by
whoever runs its DNS. Left alone, a delivery could reach the service's own loopback, the cloud
metadata address (169.254.169.254) or anything on the private network the service sits in. So:

- every address a host name resolves to is checked, and a host with any address outside the
  public internet is refused, unless an operator allow-listed its network (`action_allow_networks`);
- the connection goes to an address that was checked, never to a second resolution of the name
  (a DNS answer that changes between the check and the connect, "rebinding", changes nothing);
- a delivery has one wall-clock deadline for resolving, connecting, sending and reading: every
  socket read and write is given what is left of it, so a receiver that drips its answer a byte
  at a time holds a delivery no longer than the deadline.

`GuardedBackend` is an httpcore network backend: httpcore calls it for each new connection and
its streams for every read and write, which is where both checks have to sit.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

import httpcore

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVER_THREADS: Final = 2  # getaddrinfo has no timeout: it runs here, waited on with one
# IPv6 prefixes whose addresses carry an IPv4 address that the packet really goes to (or that
# a translator on the path may turn into one): such an address is judged by its IPv4 address.
NAT64_PREFIXES: Final = (
    ipaddress.IPv6Network("64:ff9b::/96"),  # the well-known NAT64 prefix (RFC 6052)
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
)
IPV4_TRANSLATED: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")  # SIIT (RFC 2765)
IPV4_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")  # deprecated (RFC 4291), ::a.b.c.d
# The only IPv6 space assigned for global unicast (RFC 4291, IANA): everything outside it
# (site-local fec0::/10, reserved blocks, ...) is refused, whatever `is_global` says — Python
# 3.11's IPv6 is_global means only "not in the private list".
GLOBAL_UNICAST: Final = ipaddress.IPv6Network("2000::/3")


class DestinationRefused(Exception):
    """The webhook's host resolves to an address the egress policy does not allow."""


def parse_networks(values: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDR strings as networks; raises ValueError naming the first bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as exc:
            raise ValueError(f"{value!r} is not a network in CIDR form: {exc}") from None
    return tuple(networks)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # An IPv6 address that carries an IPv4 one reaches that IPv4 host: judge it by that.
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    compatible = address in IPV4_COMPATIBLE and not (address.is_loopback or address.is_unspecified)
    if (
        compatible
        or address in IPV4_TRANSLATED
        or any(address in prefix for prefix in NAT64_PREFIXES)
    ):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Public addresses are allowed; others only inside an allow-listed network."""

    allowed: tuple[IPNetwork, ...] = ()

    def why_refused(self, address: IPAddress) -> str | None:
        """None when `address` may be connected to, else what kind of address it is."""
        if self.allow_listed(address):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            embedded = _embedded_ipv4(address)
            if embedded is not None:
                if self.allow_listed(embedded):
                    return None
                address = embedded
        if address.is_loopback:
            return "loopback"
        if address.is_link_local:
            return "link-local"
        if address.is_multicast:
            return "multicast"
        if address.is_unspecified:
            return "unspecified"
        if address.is_private:
            return "private"
        if isinstance(address, ipaddress.IPv6Address) and (
            address not in GLOBAL_UNICAST or address.is_site_local
        ):
            return "reserved"
        if not address.is_global:
            return "reserved"
        return None

    def opened(self, address: IPAddress) -> bool:
        """The operator opened this address explicitly (`action_allow_networks`), directly or
        as the IPv4 address an IPv6 form carries."""
        if self.allow_listed(address):
            return True
        embedded = _embedded_ipv4(address) if isinstance(address, ipaddress.IPv6Address) else None
        return embedded is not None and self.allow_listed(embedded)

    def allow_listed(self, address: IPAddress) -> bool:
        """`address` lies in one of the allow-listed networks."""
        return any(address in network for network in self.allowed)


class Deadline:
    """A point on the monotonic clock that a delivery must not run past."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def clamp(self, timeout: float | None) -> float:
        """The timeout for the next socket operation: what is left, at most `timeout`.

        Raises TimeoutError once the deadline has passed."""
        left = self.remaining()
        if left <= 0:
            raise TimeoutError(f"deadline of {self.seconds:g} s passed")
        return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read and write ends by the current delivery's deadline."""

    def __init__(self, inner: httpcore.NetworkStream, backend: GuardedBackend) -> None:
        self._inner = inner
        self._backend = backend

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, self._backend.clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, self._backend.clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        limit = self._backend.clamp(timeout, httpcore.ConnectTimeout)
        return DeadlineStream(
            self._inner.start_tls(ssl_context, server_hostname, limit), self._backend
        )

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class GuardedBackend(httpcore.NetworkBackend):
    """httpcore's own socket backend, behind the address policy and the delivery deadline."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = httpcore.SyncBackend()
        self._local = threading.local()
        self._resolver = concurrent.futures.ThreadPoolExecutor(
            RESOLVER_THREADS, thread_name_prefix="iothub-resolve"
        )

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[Deadline]:
        """Every connect, read and write of this thread within the block ends by the deadline."""
        deadline = Deadline(seconds)
        self._local.deadline = deadline
        try:
            yield deadline
        finally:
            self._local.deadline = None

    def clamp(self, timeout: float | None, timeout_error: type[Exception]) -> float | None:
        deadline: Deadline | None = getattr(self._local, "deadline", None)
        if deadline is None:
            return timeout
        try:
            return deadline.clamp(timeout)
        except TimeoutError as exc:
            raise timeout_error(str(exc)) from None

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        addresses = self.checked_addresses(host, port, timeout)
        failure: httpcore.ConnectError | httpcore.ConnectTimeout | None = None
        for address in addresses:
            try:
                stream = self._inner.connect_tcp(
                    str(address),  # the checked address itself: no second resolution
                    port,
                    timeout=self.clamp(timeout, httpcore.ConnectTimeout),
                    local_address=local_address,
                    socket_options=socket_options,
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            return DeadlineStream(stream, self)
        assert failure is not None  # _resolve never returns an empty list
        raise failure

    def checked_addresses(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        """The host's addresses, resolved within the deadline; raises DestinationRefused when
        any of them is not allowed."""
        addresses = self._resolve(host, port, timeout)
        refused = [
            f"{address} ({why})"
            for address in addresses
            if (why := self.policy.why_refused(address)) is not None
        ]
        if refused:
            # One bad address refuses the host: which address a connect would pick is not ours
            # to predict (and a rebinding name offers a good one first).
            raise DestinationRefused(
                f"{host} resolves to a non-public address: {', '.join(refused)}; "
                "allow its network in action_allow_networks if it is meant"
            )
        return addresses

    def _resolve(self, host: str, port: int, timeout: float | None) -> list[IPAddress]:
        try:
            return [ipaddress.ip_address(host)]
        except ValueError:
            pass
        wait = self.clamp(timeout, httpcore.ConnectTimeout)
        future = self._resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        try:
            infos = future.result(timeout=wait)
        except concurrent.futures.TimeoutError:
            # Not yet started (both threads busy with a hung resolver): it never will be. Once
            # started it cannot be stopped, and ends with the resolver's own timeouts.
            future.cancel()
            raise httpcore.ConnectTimeout(f"cannot resolve {host} in time") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        found: dict[IPAddress, None] = {}
        for _family, _type, _proto, _name, sockaddr in infos:
            found[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
        if not found:
            raise httpcore.ConnectError(f"cannot resolve {host}: no address")
        return list(found)

    def close(self) -> None:
        self._resolver.shutdown(wait=False, cancel_futures=True)


__all__ = [
    "AddressPolicy",
    "Deadline",
    "DestinationRefused",
    "GuardedBackend",
    "parse_networks",
]
