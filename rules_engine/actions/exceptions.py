"""Why an action was not delivered: each sender raises these with a precise one-line detail,
and the outbox records it (a BadTarget at once as failed, any other as a retry)."""

from __future__ import annotations


class DeliveryFailed(Exception):
    """The action could not be delivered."""


class BadTarget(DeliveryFailed):
    """The outbox row's target is malformed; retrying cannot help."""

    why = "malformed target"


class RefusedTarget(BadTarget):
    """The action's destination is not allowed (egress policy, reserved header); retrying
    cannot help."""

    why = "target refused"
