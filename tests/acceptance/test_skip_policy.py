"""The skip policy: in CI a missing service fails the run; only TimescaleDB tests may skip.

Each test runs a small pytest session in a subprocess with the suite's skip plugin, so the
outcomes are pytest's own, as CI would see them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support import skips

ROOT = Path(__file__).resolve().parents[2]
SESSION_TIMEOUT = 120  # seconds for the inner pytest run

TESTS = """
import pytest
from tests.support import skips

def test_a_broker_is_missing():
    skips.unavailable("cannot start a throwaway Mosquitto here: not installed")

def test_plain_skip():
    pytest.skip("no broker")

@pytest.mark.skipif(True, reason="needs the mosquitto_passwd binary")
def test_skipif_mark():
    pass

def test_importorskip():
    pytest.importorskip("a_module_that_does_not_exist_anywhere")

@pytest.fixture
def service():
    pytest.skip("cannot start a throwaway PostgreSQL here")

def test_skip_in_a_fixture(service):
    pass

@pytest.fixture
def server_without_timescaledb(request):
    skips.record_timescaledb(request.config, False)

@pytest.mark.timescaledb
def test_needs_timescaledb(server_without_timescaledb):
    skips.skip_for_timescaledb("needs the TimescaleDB extension")

@pytest.mark.without_timescaledb
def test_needs_a_server_without_timescaledb(server_without_timescaledb):
    skips.skip_for_timescaledb("this server lacks TimescaleDB, yet the test claims it has it")

@pytest.mark.timescaledb
def test_marked_but_skipped_for_another_reason(server_without_timescaledb):
    pytest.skip("needs TimescaleDB (but really: no broker)")

def test_the_timescaledb_skip_without_the_marker(server_without_timescaledb):
    skips.skip_for_timescaledb("needs the TimescaleDB extension")

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False

def test_runs():
    pass
"""

MODULE_SKIP = """
import pytest
pytest.skip("no Docker here", allow_module_level=True)

def test_never_collected():
    pass
"""

ALLOWED = {"test_needs_timescaledb"}
PLUGIN = "tests.support.skips"
SUITE_FIXTURES = "tests.conftest"  # the suite's own fixtures, with the policy they load

# The suite's real local_mosquitto and local_postgres fixtures on a machine without the binaries
# (which cannot be uninstalled here: their constructors raise what they raise there).
WITHOUT_BINARIES = """
import pytest
from iothub.devtools.localservers import ServiceUnavailable
from tests.support import services

def _not_installed(*args, **kwargs):
    raise ServiceUnavailable("the binary is not installed")

@pytest.fixture(autouse=True)
def machine_without_binaries(monkeypatch):
    monkeypatch.setattr(services, "LocalMosquitto", _not_installed)
    monkeypatch.setattr(services, "LocalPostgres", _not_installed)

def test_needs_its_own_broker(local_mosquitto):
    pass

def test_needs_its_own_postgres(local_postgres):
    pass
"""

ON_A_TIMESCALEDB_SERVER = """
import pytest
from tests.support import skips

@pytest.fixture(autouse=True)
def server_with_timescaledb(request):
    skips.record_timescaledb(request.config, True)

@pytest.mark.without_timescaledb
def test_needs_a_server_without_timescaledb():
    skips.skip_for_timescaledb("this server has TimescaleDB")

@pytest.mark.timescaledb
def test_needs_timescaledb_yet_skips():
    skips.skip_for_timescaledb("needs the TimescaleDB extension")
"""


def _run(
    tmp_path: Path, env_extra: dict[str, str], source: str = TESTS, plugin: str = PLUGIN
) -> tuple[int, dict[str, str]]:
    """Run `source` as a test module with `plugin` loaded; pytest's exit code and each test's
    outcome in its report."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(source))
    report = tmp_path / "report.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("CI", skips.REQUIRE_ENV)}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            plugin,
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            os.devnull,
            f"--junitxml={report}",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=SESSION_TIMEOUT,
        check=False,
    )
    outcomes: dict[str, str] = {}
    # The report is one pytest just wrote from our own test module: trusted input.
    for case in ET.parse(report).iter("testcase"):  # noqa: S314
        name = case.get("name") or case.get("classname") or "?"
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        outcomes[name] = kinds[0] if kinds else "passed"
    return done.returncode, outcomes


@pytest.mark.parametrize(
    "env", [{"IOTHUB_REQUIRE_SERVICES": "1"}, {"CI": "true"}], ids=["switch", "ci"]
)
def test_where_services_are_required_only_timescaledb_tests_skip(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """Under the switch (or CI) every skip is a failure except a TimescaleDB skip from a test
    with the marker that the server's recorded state justifies; xfail stays xfail."""
    code, outcomes = _run(tmp_path, env)
    assert code == pytest.ExitCode.TESTS_FAILED
    assert outcomes.pop("test_runs") == "passed"
    assert outcomes.pop("test_expected_failure") == "skipped"  # junit's form of xfail
    for name in ALLOWED:
        assert outcomes.pop(name) == "skipped", name
    assert outcomes and all(kind in ("failure", "error") for kind in outcomes.values()), outcomes


def test_on_a_timescaledb_server_only_the_tests_that_need_its_absence_skip(
    tmp_path: Path,
) -> None:
    """With the extension there, a `without_timescaledb` test may skip; a `timescaledb` test
    that skips anyway fails."""
    code, outcomes = _run(tmp_path, {skips.REQUIRE_ENV: "1"}, ON_A_TIMESCALEDB_SERVER)
    assert code == pytest.ExitCode.TESTS_FAILED
    assert outcomes == {
        "test_needs_a_server_without_timescaledb": "skipped",
        "test_needs_timescaledb_yet_skips": "failure",
    }


def test_a_timescaledb_skip_without_asking_the_server_fails(tmp_path: Path) -> None:
    """Where no fixture recorded the server's state, even a marked TimescaleDB skip fails."""
    source = ON_A_TIMESCALEDB_SERVER.replace("autouse=True", "autouse=False")
    code, outcomes = _run(tmp_path, {skips.REQUIRE_ENV: "1"}, source)
    assert code == pytest.ExitCode.TESTS_FAILED
    assert set(outcomes.values()) == {"failure"}


@pytest.mark.parametrize(
    ("env", "outcome"),
    [({}, "skipped"), ({"IOTHUB_REQUIRE_SERVICES": "1"}, "error"), ({"CI": "true"}, "error")],
    ids=["laptop", "switch", "ci"],
)
def test_the_suites_fixtures_error_where_a_server_cannot_be_started(
    tmp_path: Path, env: dict[str, str], outcome: str
) -> None:
    """local_mosquitto and local_postgres skip on a laptop without the binaries, and are an
    error in CI or under the switch."""
    code, outcomes = _run(tmp_path, env, WITHOUT_BINARIES, SUITE_FIXTURES)
    assert outcomes == {
        "test_needs_its_own_broker": outcome,
        "test_needs_its_own_postgres": outcome,
    }
    assert code == (pytest.ExitCode.OK if outcome == "skipped" else pytest.ExitCode.TESTS_FAILED)


def test_where_services_are_required_a_skipped_module_fails_the_run(tmp_path: Path) -> None:
    """A module that skips itself while collected is a collection error under the switch."""
    code, outcomes = _run(tmp_path, {skips.REQUIRE_ENV: "1"}, MODULE_SKIP)
    assert code == pytest.ExitCode.INTERRUPTED  # pytest stops on a collection error
    assert list(outcomes.values()) == ["error"]


def test_on_a_laptop_a_missing_service_is_a_skip(tmp_path: Path) -> None:
    """Without the switch, a service that cannot be started skips the tests that need it."""
    code, outcomes = _run(tmp_path, {})
    assert code == pytest.ExitCode.OK
    assert outcomes.pop("test_runs") == "passed"
    assert outcomes and all(kind == "skipped" for kind in outcomes.values()), outcomes
    skipped_module = (pytest.ExitCode.NO_TESTS_COLLECTED, {"test_inner": "skipped"})
    assert _run(tmp_path, {}, MODULE_SKIP) == skipped_module


def test_the_switch_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`unavailable` skips by default and fails under IOTHUB_REQUIRE_SERVICES=1."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv(skips.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception):
        skips.unavailable("no broker")
    monkeypatch.setenv(skips.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="a missing service is an error"):
        skips.unavailable("no broker")
