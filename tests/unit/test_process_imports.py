"""What each process of `iothub run` imports: memory per process is mostly its imports.

With `--workers N` there are N + 1 interpreters, and the benchmark's bound is their peak RSS
together (bench/ingest_bench.py, TARGET_RSS_MB). A worker only prepares, writes and evaluates:
it writes outbox rows and never delivers one, and it never holds an MQTT connection, so the
action senders (httpx ~18 MB, paho ~11 MB, smtplib ~7 MB, overlapping) are dead weight there.
protobuf and the Sparkplug B descriptors (~27 MB) are needed only when a sparkplug_b source is
configured, in any process. Each check runs in a fresh interpreter, the way a process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from iothub.cli import main as cli

REPO = Path(__file__).resolve().parents[2]

# What a spawned worker process imports before it runs: multiprocessing `spawn` runs the main
# module again as __mp_main__ (for the console script and for `python -m iothub.cli.main`
# alike, that is iothub.cli.main), then unpickles the target, iothub.daemon.ingest_worker.main.
# Then IngestWorker builds its parts (pool and catalogue listener unopened: no server needed).
WORKER = """
import multiprocessing, runpy
runpy.run_module("iothub.cli.main", run_name="__mp_main__", alter_sys=True)
from config.settings import load_settings
from iothub.daemon import ingest_worker
settings = load_settings(None, ENV)
inbox, _a = multiprocessing.Pipe(duplex=False)
_b, outbox = multiprocessing.Pipe(duplex=False)
spec = ingest_worker.WorkerSpec(settings, 0, rules_on=True, parent_pid=1)
worker = ingest_worker.IngestWorker(spec, inbox, outbox)
"""

# What `iothub run` imports and builds before it connects: the CLI, the run command, and the
# service with the rule engine, its outbox and fan-out to worker processes (none started).
RECEIVER = """
from iothub.cli import main as cli
from iothub.daemon import assemble
from config.settings import load_settings
cli.load("run")
service = assemble.build(load_settings(None, ENV), rules_on=True)
"""

ACTION_SENDERS = ("httpx", "httpcore", "smtplib", "paho")
PROTOBUF = ("google.protobuf", "ingestor.decoders.sparkplug_b")

SPARKPLUG_SOURCE = {
    "name": "spb",
    "topic": "spBv1.0/plant/{type}/{node}/{device}",
    "decoder": "sparkplug_b",
    "serial": "{node}-{device}",
}


def imported_after(script: str, env: dict[str, str]) -> set[str]:
    """The top-level and watched modules in sys.modules after `script`, in a new interpreter."""
    code = textwrap.dedent(
        f"""
        import json, sys
        ENV = {env!r}
        {textwrap.indent(textwrap.dedent(script), "        ").strip()}
        print(json.dumps(sorted(sys.modules)))
        """
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("IOTHUB_")}
    environ["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environ,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stdout.splitlines()[-1])
    return set(modules)


def present(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in modules or any(m.startswith(f"{n}.") for m in modules)]


def test_a_worker_imports_no_action_sender_and_no_protobuf_by_default() -> None:
    modules = imported_after(WORKER, {"IOTHUB_WORKERS": "2"})

    assert "iothub.daemon.ingest_worker" in modules  # the script did build the worker
    assert present(modules, ACTION_SENDERS) == [], (
        "a worker process imports an action sender: the outbox delivers only in the receiving "
        "process, and each import is paid again in every worker's RSS"
    )
    assert present(modules, PROTOBUF) == [], (
        "a worker process imports protobuf without a sparkplug_b source: ~27 MB per worker"
    )


def test_the_receiving_process_imports_no_protobuf_by_default() -> None:
    modules = imported_after(RECEIVER, {"IOTHUB_WORKERS": "2"})

    # The receiving process does deliver actions, and holds the MQTT connection.
    assert present(modules, ("httpx", "smtplib", "paho")) == ["httpx", "smtplib", "paho"]
    assert present(modules, PROTOBUF) == [], (
        "`iothub run` imports protobuf without a sparkplug_b source (~27 MB)"
    )
    # Nor the other commands' machinery: the simulator, the demo.
    assert present(modules, ("iothub.devtools",)) == []


@pytest.mark.parametrize("script", [WORKER, RECEIVER], ids=["worker", "receiver"])
def test_a_sparkplug_source_brings_its_decoder_in(script: str) -> None:
    """The other side: with a sparkplug_b source configured, its decoder is loaded at start."""
    env = {"IOTHUB_WORKERS": "2", "IOTHUB_SOURCES": json.dumps([SPARKPLUG_SOURCE])}

    assert present(imported_after(script, env), PROTOBUF) == list(PROTOBUF)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_module_imports_and_has_the_command_shape(name: str) -> None:
    """main.py imports only the command that runs: a broken import in another one must still
    fail here rather than in front of the operator who runs it."""
    module = cli.load(name)

    assert callable(module.add_arguments)
    assert callable(module.main)
