"""Deployment files checked without a Docker engine or systemd: they parse, they reference files
that exist, and they name only real iothub commands and settings."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from config.settings import ENV_PREFIX, Settings, load_settings
from iothub.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_PROD = ROOT / "docker-compose.prod.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENTRYPOINT = ROOT / "deploy" / "docker-entrypoint.sh"
UNIT = ROOT / "deploy" / "systemd" / "iothub.service"
TOML_EXAMPLE = ROOT / "deploy" / "iothub.toml.example"
MOSQUITTO_DIR = ROOT / "mosquitto"

# The lead will replace this list with the real CLI parser.
# The real CLI's command table: a deploy file naming a command the CLI lacks fails here.
COMMANDS = set(cli.COMMANDS)
# Options of `iothub` itself that come before the command; the value says whether they take one.
GLOBAL_OPTIONS = {"--config": True, "--debug": False}
SETTING_NAMES = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
# ${NAME:-default} in compose files: the value used when NAME is unset.
DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def _compose(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


# ${NAME:?message} in compose files: compose refuses to start when NAME is unset or empty.
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")


def _with_defaults(value: str) -> str:
    return DEFAULTED.sub(lambda m: m.group(2), value)


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _copy_sources() -> list[str]:
    """Sources of every COPY from the build context (not from another stage)."""
    sources = []
    for keyword, args in _dockerfile_instructions():
        if keyword != "COPY":
            continue
        words = args.split()
        if any(word.startswith("--from=") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        sources.extend(paths[:-1])
    return sources


def _unit() -> dict[str, list[tuple[str, str]]]:
    """The unit file as section -> [(key, value)], keeping repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line in the unit: {raw!r}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def _unit_value(section: str, key: str) -> str:
    values = [v for k, v in _unit()[section] if k == key]
    assert values, f"[{section}] {key}= missing"
    return values[-1]


def iothub_commands(line: str) -> Iterator[str]:
    """The command of each `iothub ...` invocation in a shell-like line (any global options
    skipped); invocations whose command is a variable such as "$@" are not reported."""
    words = [word.strip("\"'[],") for word in line.split()]
    for index, word in enumerate(words):
        if word != "iothub" and not word.endswith("/iothub"):
            continue
        rest = iter(words[index + 1 :])
        for token in rest:
            option = token.split("=", 1)[0]
            if option in GLOBAL_OPTIONS:
                if GLOBAL_OPTIONS[option] and "=" not in token:
                    next(rest, None)
                continue
            if re.fullmatch(r"[a-z][a-z0-9-]*", token):
                yield token
            break


def test_command_extraction_understands_global_options() -> None:
    """The helper finds the command behind --config/--debug and ignores "$@" and names."""
    assert list(iothub_commands("/opt/iothub/venv/bin/iothub --config /x.toml run")) == ["run"]
    assert list(iothub_commands('exec iothub --debug --config=/x migrate "$@"')) == ["migrate"]
    assert list(iothub_commands('exec iothub "$@"')) == []
    assert list(iothub_commands("image: iothub:latest")) == []
    assert list(iothub_commands('["iothub", "simulate"]')) == ["simulate"]


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_has_the_four_services() -> None:
    """db, mqtt, iothub, and the simulator under the `sim` profile."""
    services = _compose()["services"]

    assert set(services) == {"db", "mqtt", "iothub", "simulator"}
    assert services["db"]["image"] == "timescale/timescaledb:latest-pg16"
    assert services["mqtt"]["image"] == "eclipse-mosquitto:2"
    assert services["simulator"]["profiles"] == ["sim"]
    assert "profiles" not in services["iothub"]


def test_compose_db_is_healthchecked_and_iothub_waits_for_it() -> None:
    """iothub starts only when pg_isready passes, and is itself checked on /healthz."""
    services = _compose()["services"]

    assert "pg_isready" in " ".join(services["db"]["healthcheck"]["test"])
    assert services["iothub"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(services["iothub"]["healthcheck"]["test"])


def test_compose_build_context_and_dockerfile_exist() -> None:
    """Every service built from source points at an existing context and Dockerfile."""
    for name, service in _compose()["services"].items():
        if "build" not in service:
            continue
        context = ROOT / service["build"]["context"]
        assert context.is_dir(), name
        assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_compose_bind_mounts_exist() -> None:
    """Every ./path mounted into a container exists in the repository."""
    mounts = 0
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), source
                mounts += 1
    assert mounts >= 1


def test_compose_broker_config_exists_in_the_mounted_directory() -> None:
    """The mosquitto config the broker is started with (by default) is in ./mosquitto."""
    mqtt = _compose()["services"]["mqtt"]
    config_arg = _with_defaults(mqtt["command"][mqtt["command"].index("-c") + 1])
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in mqtt["volumes"]}

    container_dir, _, file_name = config_arg.rpartition("/")
    assert container_dir in mounts, f"{container_dir} is not mounted"
    assert (ROOT / mounts[container_dir] / file_name).is_file()
    assert "/mosquitto/data" in mounts, "broker persistence must be on a volume"


def test_compose_sets_only_real_iothub_settings() -> None:
    """Every IOTHUB_* variable in compose is a setting: iothub refuses unknown ones at start."""
    seen = set()
    for service in _compose()["services"].values():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), "use the mapping form for environment"
        seen |= {name for name in environment if name.startswith(ENV_PREFIX)}

    assert seen >= {
        "IOTHUB_DATABASE_URL",
        "IOTHUB_MQTT_URL",
        "IOTHUB_HTTP_PORT",
        "IOTHUB_LOG_LEVEL",
        "IOTHUB_SEED_DATA",
    }
    assert seen <= SETTING_NAMES, seen - SETTING_NAMES


def test_compose_iothub_port_matches_its_http_port() -> None:
    """The published container port and the health check use IOTHUB_HTTP_PORT."""
    iothub = _compose()["services"]["iothub"]
    port = str(iothub["environment"]["IOTHUB_HTTP_PORT"])

    assert any(_with_defaults(str(p)).endswith(f":{port}") for p in iothub["ports"])
    assert f":{port}/healthz" in " ".join(iothub["healthcheck"]["test"])
    # In a container the server must listen beyond loopback for the published port to work.
    assert iothub["environment"]["IOTHUB_HTTP_HOST"] == "0.0.0.0"  # noqa: S104


def test_compose_publishes_every_port_on_localhost_by_default() -> None:
    """The development stack (anonymous broker, default passwords, seeded admin) is reachable
    from this host only, unless a bind address is set."""
    published = {
        name: [_with_defaults(str(port)) for port in service.get("ports", [])]
        for name, service in _compose()["services"].items()
    }

    assert published["db"] and published["mqtt"] and published["iothub"]
    for name, ports in published.items():
        for port in ports:
            assert port.startswith("127.0.0.1:") and port.count(":") == 2, (name, port)
    # ... and the address is the operator's to change.
    services = _compose()["services"].values()
    raw = [str(port) for service in services for port in service.get("ports", [])]
    assert all(re.match(r"\$\{\w+_BIND_ADDRESS:-127\.0\.0\.1\}:", port) for port in raw), raw


def test_compose_dev_stack_still_seeds_by_default() -> None:
    """`docker compose up` loads the development data; IOTHUB_SEED_DATA=false turns it off."""
    seed = _compose()["services"]["iothub"]["environment"]["IOTHUB_SEED_DATA"]

    assert seed == "${IOTHUB_SEED_DATA:-true}"


def _prod_environment(service: str) -> dict[str, str]:
    environment = _compose(COMPOSE_PROD)["services"][service]["environment"]
    assert isinstance(environment, dict), "use the mapping form for environment"
    return {name: str(value) for name, value in environment.items()}


def test_compose_prod_overrides_only_existing_services() -> None:
    """The override changes services of docker-compose.yml and adds none (and no ports)."""
    prod = _compose(COMPOSE_PROD)["services"]

    assert set(prod) <= set(_compose()["services"])
    assert all("ports" not in service for service in prod.values())


def test_compose_prod_requires_every_password_and_does_not_seed() -> None:
    """Database and broker passwords come from the environment with no default; no seeding."""
    iothub = _prod_environment("iothub")
    db = _prod_environment("db")

    assert REQUIRED.fullmatch(db["POSTGRES_PASSWORD"])
    assert iothub["IOTHUB_SEED_DATA"] == "false"
    for name in ("IOTHUB_DATABASE_URL", "IOTHUB_MQTT_URL", "IOTHUB_MQTT_ACTIONS_URL"):
        userinfo = _with_defaults(iothub[name]).split("://", 1)[1].rsplit("@", 1)[0]
        password = userinfo.partition(":")[2]
        assert REQUIRED.fullmatch(password), (name, password)
    assert "POSTGRES_PASSWORD" in REQUIRED.findall(iothub["IOTHUB_DATABASE_URL"])
    assert set(iothub) <= SETTING_NAMES, set(iothub) - SETTING_NAMES
    # Compose reads these on the host, where iothub refuses unknown IOTHUB_* variables.
    required = {m for value in iothub.values() for m in REQUIRED.findall(value)}
    assert not any(name.startswith(ENV_PREFIX) for name in required), required


def test_compose_prod_uses_the_production_broker_and_its_logins() -> None:
    """The broker runs mosquitto.conf; intake and action publisher log in as the two service
    logins of the acl, each its own."""
    mqtt = _compose(COMPOSE_PROD)["services"]["mqtt"]
    iothub = _prod_environment("iothub")
    acl_users = set(re.findall(r"^user (\S+)$", (MOSQUITTO_DIR / "acl").read_text(), re.M))

    assert mqtt["command"] == ["mosquitto", "-c", "/mosquitto/config/mosquitto.conf"]
    intake = iothub["IOTHUB_MQTT_URL"].split("://", 1)[1].split(":", 1)[0]
    actions = iothub["IOTHUB_MQTT_ACTIONS_URL"].split("://", 1)[1].split(":", 1)[0]
    assert (intake, actions) == ("iothub", "iothub-actions")
    assert {intake, actions} <= acl_users
    simulator = _prod_environment("simulator")["IOTHUB_MQTT_URL"]
    assert simulator.startswith("mqtt://simulator:") and "simulator" in acl_users


# --- mosquitto/ ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mosquitto.conf", "mosquitto-dev.conf"])
def test_mosquitto_configs_reference_shipped_files(name: str) -> None:
    """acl_file points at the shipped acl; password_file at passwd, made from passwd.example."""
    text = (MOSQUITTO_DIR / name).read_text()
    settings = dict(
        line.split(None, 1) for line in text.splitlines() if line.strip() and line[0] != "#"
    )

    if "acl_file" in settings:
        assert settings["acl_file"] == "/mosquitto/config/acl"
        assert (MOSQUITTO_DIR / "acl").is_file()
    if "password_file" in settings:
        assert settings["password_file"] == "/mosquitto/config/passwd"
        assert (MOSQUITTO_DIR / "passwd.example").is_file()
    assert settings["persistence_location"] == "/mosquitto/data/"


def test_passwd_example_is_mosquitto_passwd_input() -> None:
    """passwd.example is login:password lines only: mosquitto_passwd -U rejects comments."""
    lines = (MOSQUITTO_DIR / "passwd.example").read_text().splitlines()

    assert lines
    assert all(re.fullmatch(r"[^:#\s]+:\S+", line) for line in lines), lines
    assert {line.split(":")[0] for line in lines} >= {"iothub", "iothub-actions", "simulator"}


def _mosquitto_settings(name: str) -> dict[str, str]:
    text = (MOSQUITTO_DIR / name).read_text()
    return dict(
        line.split(None, 1) for line in text.splitlines() if line.strip() and line[0] != "#"
    )


# Fixed header (5) + topic length (2) + the longest topic (65535) + packet id (2): what a
# publish may add to its payload before any property.
MQTT_PUBLISH_OVERHEAD = 5 + 2 + 65_535 + 2


@pytest.mark.parametrize("name", ["mosquitto.conf", "mosquitto-dev.conf"])
def test_broker_packet_limit_leaves_room_for_the_services_max_payload(name: str) -> None:
    """max_packet_size lets a max_payload_bytes payload on any topic through, not much more."""
    limit = int(_mosquitto_settings(name)["max_packet_size"])
    max_payload = Settings().max_payload_bytes

    assert limit >= max_payload + MQTT_PUBLISH_OVERHEAD
    assert limit <= 2 * max_payload


def test_production_broker_binds_client_ids_to_logins() -> None:
    """mosquitto.conf replaces each client id by the login: no login reaches another session."""
    settings = _mosquitto_settings("mosquitto.conf")

    assert settings["use_username_as_clientid"] == "true"
    assert settings["allow_anonymous"] == "false"


def test_every_example_login_has_an_acl_block() -> None:
    """Each login of passwd.example but the device is a `user` block of the acl, and back."""
    logins = {
        line.split(":")[0] for line in (MOSQUITTO_DIR / "passwd.example").read_text().splitlines()
    }
    acl_users = set(re.findall(r"^user (\S+)$", (MOSQUITTO_DIR / "acl").read_text(), re.M))

    assert acl_users == {"iothub", "iothub-actions", "alerts-consumer", "simulator"}
    assert logins - acl_users == {"SN-A1-TEMP-0001"}


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_copy_sources_exist() -> None:
    """Every file or directory copied from the build context is in the repository."""
    sources = _copy_sources()

    assert sources
    missing = [source for source in sources if not (ROOT / source).exists()]
    assert not missing, f"COPY sources missing from the repository: {missing}"


def test_dockerfile_copies_what_pip_install_needs() -> None:
    """pyproject.toml, its readme, and every package it lists are copied before `pip install .`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The top-level packages: each include pattern of packages.find is "<package>*".
    found = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = {"pyproject.toml", *(pattern.rstrip("*") for pattern in found)}
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    copied = {source.rstrip("/") for source in _copy_sources()}

    assert needed <= copied, needed - copied
    assert any(k == "RUN" and "pip install ." in args for k, args in _dockerfile_instructions())


def test_dockerignore_lets_every_copy_source_through() -> None:
    """The allow-list .dockerignore re-includes each COPY source, or the build would miss it."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "the .dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}

    for source in _copy_sources():
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_dockerfile_runs_the_entrypoint_as_a_non_root_user() -> None:
    """ENTRYPOINT is the copied entry script, USER is iothub, HEALTHCHECK probes /healthz."""
    instructions = _dockerfile_instructions()
    copies = [args for k, args in instructions if k == "COPY" and "docker-entrypoint.sh" in args]
    destination = copies[0].split()[-1]
    entrypoint = [args for k, args in instructions if k == "ENTRYPOINT"][-1]
    users = [args for k, args in instructions if k == "USER"]

    assert Path(destination).name in entrypoint
    assert users and users[-1].split(":")[0] == "iothub"
    assert any(k == "HEALTHCHECK" and "/healthz" in args for k, args in instructions)
    froms = [args for k, args in instructions if k == "FROM"]
    assert len(froms) == 2, "builder and runtime stages"


def test_dockerfile_sets_only_real_iothub_settings() -> None:
    """IOTHUB_* variables baked into the image are settings (unknown ones stop iothub)."""
    names = set(re.findall(r"\b(IOTHUB_[A-Z_]+)=", DOCKERFILE.read_text()))

    assert names <= SETTING_NAMES, names - SETTING_NAMES


# --- entry point ---------------------------------------------------------------------------------


def test_entrypoint_is_executable_and_valid_bash() -> None:
    """The entry script is executable, parses with `bash -n`, and runs in strict mode."""
    bash = shutil.which("bash")
    assert bash is not None
    text = ENTRYPOINT.read_text()

    assert os.access(ENTRYPOINT, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -o errexit -o pipefail -o nounset" in text
    result = subprocess.run(
        [bash, "-n", str(ENTRYPOINT)], capture_output=True, text=True, check=False, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_entrypoint_runs_the_preparation_steps_in_order() -> None:
    """migrate, then setup-timescaledb, then seed, then exec run."""
    code = [
        line for line in ENTRYPOINT.read_text().splitlines() if not line.strip().startswith("#")
    ]
    commands = [command for line in code for command in iothub_commands(line)]

    assert commands == ["migrate", "setup-timescaledb", "seed", "run"]
    assert any(re.search(r"\bexec iothub run\b", line) for line in code)


FAKE_IOTHUB = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
migrate) exit "${MIGRATE_RC:-0}" ;;
setup-timescaledb) exit "${TIMESCALE_RC:-0}" ;;
seed) exit "${SEED_RC:-0}" ;;
esac
"""


@pytest.mark.parametrize(
    ("env", "expected_rc", "expected_calls"),
    [
        ({}, 0, ["migrate", "setup-timescaledb", "run --flag"]),
        ({"IOTHUB_SEED_DATA": "true"}, 0, ["migrate", "setup-timescaledb", "seed", "run --flag"]),
        ({"TIMESCALE_RC": "3"}, 0, ["migrate", "setup-timescaledb", "run --flag"]),
        (
            {"IOTHUB_SEED_DATA": "1", "SEED_RC": "4"},
            0,
            ["migrate", "setup-timescaledb", "seed", "run --flag"],
        ),
        ({"TIMESCALE_RC": "1"}, 1, ["migrate", "setup-timescaledb"]),
        (
            {"IOTHUB_SEED_DATA": "yes", "SEED_RC": "70"},
            70,
            ["migrate", "setup-timescaledb", "seed"],
        ),
        ({"MIGRATE_RC": "69", "ENTRYPOINT_DB_WAIT": "0"}, 69, ["migrate"]),
        ({"MIGRATE_RC": "78"}, 78, ["migrate"]),
    ],
    ids=[
        "plain",
        "seeded",
        "no-timescaledb",
        "already-seeded",
        "timescale-fails",
        "seed-fails",
        "db-unreachable",
        "bad-config",
    ],
)
def test_entrypoint_steps_and_exit_codes(
    tmp_path: Path, env: dict[str, str], expected_rc: int, expected_calls: list[str]
) -> None:
    """Exit 3 of setup-timescaledb and 4 of seed let the start continue; other failures stop it."""
    fake = tmp_path / "bin" / "iothub"
    fake.parent.mkdir()
    fake.write_text(FAKE_IOTHUB)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    environment = {
        "PATH": f"{fake.parent}:{os.environ['PATH']}",
        "CALLS": str(calls),
        **env,
    }

    result = subprocess.run(
        [str(ENTRYPOINT), "run", "--flag"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )

    assert result.returncode == expected_rc, result.stderr
    assert calls.read_text().splitlines() == expected_calls


def test_entrypoint_passes_other_commands_through(tmp_path: Path) -> None:
    """Any command but run goes straight to iothub, with no database preparation."""
    fake = tmp_path / "iothub"
    fake.write_text(FAKE_IOTHUB)
    fake.chmod(0o755)
    calls = tmp_path / "calls"
    environment = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "CALLS": str(calls)}

    result = subprocess.run(
        [str(ENTRYPOINT), "simulate", "--rate", "5"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )

    assert result.returncode == 0, result.stderr
    assert calls.read_text().splitlines() == ["simulate --rate 5"]


def test_entrypoint_reads_only_real_iothub_settings() -> None:
    """The IOTHUB_* variables the entry script reads exist as settings."""
    names = set(re.findall(r"\b(IOTHUB_[A-Z_]+)", ENTRYPOINT.read_text()))

    assert "IOTHUB_SEED_DATA" in names
    assert names <= SETTING_NAMES, names - SETTING_NAMES


# --- systemd -------------------------------------------------------------------------------------


def test_unit_has_the_required_service_keys() -> None:
    """Type=notify with a watchdog, restart on failure, and the agreed commands and paths."""
    assert _unit_value("Service", "Type") == "notify"
    assert _unit_value("Service", "NotifyAccess") == "main"
    assert _unit_value("Service", "WatchdogSec") == "30"
    assert _unit_value("Service", "Restart") == "on-failure"
    assert _unit_value("Service", "RestartSec") == "5"
    assert _unit_value("Service", "TimeoutStopSec") == "60"
    assert _unit_value("Service", "User") == "iothub"
    assert _unit_value("Service", "EnvironmentFile") == "-/etc/iothub/iothub.env"
    assert list(iothub_commands(_unit_value("Service", "ExecStartPre"))) == ["migrate"]
    exec_start = _unit_value("Service", "ExecStart")
    assert exec_start.startswith("/opt/iothub/venv/bin/iothub ")
    assert list(iothub_commands(exec_start)) == ["run"]
    assert "--config /etc/iothub/iothub.toml" in exec_start
    assert _unit_value("Install", "WantedBy") == "multi-user.target"


def test_unit_is_sandboxed() -> None:
    """The hardening options are set, and the capability bounding set is empty."""
    service = dict(_unit()["Service"])
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
    }

    assert {key: service.get(key) for key in expected} == expected
    filters = [v for k, v in _unit()["Service"] if k == "SystemCallFilter"]
    assert "@system-service" in filters


def test_toml_example_loads_with_the_real_settings() -> None:
    """deploy/iothub.toml.example is valid for the settings model, with no unknown key."""
    settings = load_settings(TOML_EXAMPLE, environ={})

    assert settings.http_port == 9108


# --- commands named anywhere ---------------------------------------------------------------------


def _named_commands() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in ENTRYPOINT.read_text().splitlines():
        if not line.strip().startswith("#"):
            found.setdefault("docker-entrypoint.sh", []).extend(iothub_commands(line))
    for name, service in _compose()["services"].items():
        for key in ("entrypoint", "command"):
            value = service.get(key)
            if value:
                line = " ".join(value) if isinstance(value, list) else str(value)
                found.setdefault(f"compose {name}.{key}", []).extend(iothub_commands(line))
    for key, value in _unit()["Service"]:
        if key.startswith("Exec"):
            found.setdefault(f"unit {key}", []).extend(iothub_commands(value))
    cmd = [args for k, args in _dockerfile_instructions() if k == "CMD"]
    # CMD is the argument list of the entry script, whose first word is an iothub command.
    found["Dockerfile CMD"] = [yaml.safe_load(cmd[-1])[0]]
    return found


def test_every_named_iothub_command_exists() -> None:
    """Entry point, compose file, Dockerfile and unit name only commands the CLI has."""
    found = _named_commands()
    unknown = {where: sorted(set(cmds) - COMMANDS) for where, cmds in found.items()}

    assert {where: cmds for where, cmds in unknown.items() if cmds} == {}
    assert {"migrate", "setup-timescaledb", "seed", "run", "simulate"} <= {
        command for cmds in found.values() for command in cmds
    }
