"""The suite's skip policy: where the services must be there, a skip is a failure.

A test that skips has not shown anything. On a developer's laptop without Mosquitto that is a
fair trade; in CI it would let every fault and ACL test "pass" by not running. So when CI is set
(`CI=true`, as CI services set it) or `IOTHUB_REQUIRE_SERVICES=1`, this plugin turns every skip
into a failure, except one kind: a test marked `timescaledb` on a server without the extension,
or `without_timescaledb` on one with it, skipped by `skip_for_timescaledb()` (its own exception
type). All three are needed: the marker, the exception, and the server's real state as the
`timescaledb_available` fixture found it (`record_timescaledb`). So neither a plain
`pytest.skip("... TimescaleDB ...")`, nor the exception from an unmarked test, nor a TimescaleDB
test skipping on a server that has the extension gets through; a `skipif` mark, `importorskip`
and a module-level skip are failures too.
xfail is not a skip (and `xfail_strict` already fails an unexpected pass).

PYTEST_DONT_REWRITE: conftest imports this module before pytest loads it as a plugin, and it has
no assertions to rewrite.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import NoReturn

import pytest
from _pytest.outcomes import Skipped

REQUIRE_ENV = "IOTHUB_REQUIRE_SERVICES"
# marker -> the server state (has TimescaleDB?) in which a test with it may skip
TIMESCALEDB_MARKERS = {"timescaledb": False, "without_timescaledb": True}
_TIMESCALEDB = pytest.StashKey[bool]()


class TimescaleDBSkip(Skipped):
    """The test needs a server with (or without) TimescaleDB, and this one is the other kind."""


def services_required() -> bool:
    """True in CI and whenever IOTHUB_REQUIRE_SERVICES=1: a missing service is an error."""
    if os.environ.get(REQUIRE_ENV, "").strip() == "1":
        return True
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(what: str) -> NoReturn:
    """Stop a test whose service cannot be provided: a skip here, a failure where required."""
    if services_required():
        pytest.fail(f"{what} ({REQUIRE_ENV}=1 or CI is set: a missing service is an error)")
    pytest.skip(what)


def skip_for_timescaledb(reason: str) -> NoReturn:
    """The one skip the policy allows, from a test marked `timescaledb`/`without_timescaledb`."""
    raise TimescaleDBSkip(reason, allow_module_level=False)


def record_timescaledb(config: pytest.Config, available: bool) -> None:
    """Note whether the test server has TimescaleDB (the fixture that asked the server)."""
    config.stash[_TIMESCALEDB] = available


def _allowed(item: pytest.Item, exc: BaseException | None) -> bool:
    if not isinstance(exc, TimescaleDBSkip):
        return False
    available = item.config.stash.get(_TIMESCALEDB, None)
    return available is not None and any(
        item.get_closest_marker(name) and available == skips_when
        for name, skips_when in TIMESCALEDB_MARKERS.items()
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "without_timescaledb: needs a test server without TimescaleDB (skipped with a reason "
        "when it has the extension)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and services_required()
        and not _allowed(item, call.excinfo.value if call.excinfo else None)
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"skipped, but {REQUIRE_ENV}=1 or CI is set and only TimescaleDB tests may skip: "
            f"{_reason(report)}"
        )
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    if report.skipped and services_required():
        report.outcome = "failed"
        report.longrepr = f"module skipped, but {REQUIRE_ENV}=1 or CI is set: {_reason(report)}"
    return report


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    # A skip's longrepr is (path, line, "Skipped: reason").
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)
