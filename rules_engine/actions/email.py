"""The notify sender (`Notifier`) and the SMTP client it emails through (`Mailer`)."""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
import threading
from collections.abc import Sequence
from email.message import EmailMessage
from typing import Final
from urllib.parse import unquote, urlsplit

import structlog

from rules_engine.actions import exceptions, sender, targets

log = structlog.get_logger(__name__)

SMTP_TIMEOUT: Final = 10.0  # seconds per SMTP conversation step
SMTP_DEADLINE: Final = 30.0  # seconds for one whole SMTP conversation, on the wall clock
SMTP_PORT, SMTPS_PORT = 25, 465


class Mailer:
    """Sends notifications through the SMTP server of `smtp_url` (smtp:// or smtps://).

    On smtp:// the conversation is upgraded with STARTTLS when the server offers it; with
    credentials in the URL it must be, since AUTH on a plain connection hands the password to
    anyone on the path (and a man in the middle need only strip STARTTLS from the EHLO answer).
    """

    def __init__(
        self,
        smtp_url: str,
        sender: str,
        timeout: float = SMTP_TIMEOUT,
        deadline: float = SMTP_DEADLINE,
    ) -> None:
        parts = urlsplit(smtp_url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise ValueError(
                f"smtp_url must be smtp://host:port or smtps://..., got {parts.scheme}"
            )
        self._tls = parts.scheme == "smtps"
        self._host = parts.hostname
        self._port = parts.port or (SMTPS_PORT if self._tls else SMTP_PORT)
        self._user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else ""
        self._sender = sender
        self._timeout = timeout
        self._deadline = deadline

    def send(self, recipients: Sequence[str], subject: str, body: str) -> str:
        message = EmailMessage()
        try:
            message["From"] = self._sender
            message["To"] = ", ".join(recipients)
            message["Subject"] = subject
        except ValueError as exc:  # a line break in a header: an injection attempt or a typo
            raise exceptions.BadTarget(f"cannot build the email: {exc}") from None
        message.set_content(body)
        context = ssl.create_default_context()
        where = f"smtp {self._host}:{self._port}"
        server = (
            smtplib.SMTP_SSL(timeout=self._timeout, context=context)
            if self._tls
            else smtplib.SMTP(timeout=self._timeout)
        )
        # smtplib's timeout is per socket operation: a server that answers a byte at a time
        # would hold the conversation for ever. At the deadline the socket is shut down, which
        # ends whatever read or write is blocked on it.
        cut = threading.Event()
        timer = threading.Timer(self._deadline, self._cut, (server, cut))
        timer.daemon = True
        timer.start()
        try:
            with server:
                server.connect(self._host, self._port)
                server.ehlo()
                if not self._tls and server.has_extn("starttls"):
                    server.starttls(context=context)
                    server.ehlo()
                elif not self._tls and self._user:
                    log.error("smtp_starttls_missing", host=self._host, port=self._port)
                    raise exceptions.DeliveryFailed(
                        f"{where} does not offer STARTTLS: refusing to send the password "
                        "in clear (use smtps:// or a server that offers STARTTLS)"
                    )
                if self._user:
                    server.login(self._user, self._password)
                refused = server.send_message(message)
        except (smtplib.SMTPException, OSError) as exc:
            if cut.is_set():
                raise exceptions.DeliveryFailed(
                    f"{where}: no complete conversation within {self._deadline:g} s"
                ) from None
            raise exceptions.DeliveryFailed(f"{where}: {type(exc).__name__}: {exc}") from None
        finally:
            timer.cancel()
        accepted = [address for address in recipients if address not in refused]
        detail = f"emailed to {', '.join(accepted)}"
        # Some recipients accepted: a retry would mail those again, so this counts as done.
        return detail + (f"; refused: {', '.join(refused)}" if refused else "")

    @staticmethod
    def _cut(server: smtplib.SMTP, cut: threading.Event) -> None:
        cut.set()
        sock = getattr(server, "sock", None)
        if sock is not None:
            # Already closed: the conversation ended on its own.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Notifier:
    """The notify sender: logs the notification and, for the email channel with `smtp_url`
    set, emails it to the target's `to` address(es)."""

    def __init__(self, mailer: Mailer | None) -> None:
        self._mailer = mailer
        self._warned_no_recipient = False

    def deliver(self, delivery: sender.Delivery) -> str:
        target = delivery.target
        if not isinstance(target, targets.NotifyTarget):
            raise exceptions.BadTarget(f"not a notify target: {target.kind}")
        log.info(
            "notification",
            channel=target.channel,
            subject=target.subject,
            message=target.message,
            rule_id=delivery.rule_id,
            event_id=delivery.event_id,
        )
        if self._mailer is None or target.channel != "email":
            return f"logged ({target.channel} channel)"
        recipients = target.recipients
        if not recipients:
            if not self._warned_no_recipient:
                self._warned_no_recipient = True
                log.warning(
                    "notification_not_emailed",
                    why="the action names no recipient ('to') and no default recipient is set",
                )
            return "logged; not emailed: no recipient"
        return "logged; " + self._mailer.send(recipients, target.subject, target.message)

    def close(self) -> None:
        pass  # every SMTP conversation is closed when it ends
