"""Test set-up: real Prefect (ephemeral, its own home), real MLflow on a temp SQLite store, offline.

Every process the suite starts, directly or through a server or a worker, inherits the environment
variable INT8FLOW_TEST_SESSION; at the end of the session (passed, failed or interrupted) any process
still carrying this session's mark is ended, and the ones that had lost their parent are listed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Before anything imports prefect: its settings are read at import time.
_PREFECT_HOME = tempfile.mkdtemp(prefix="int8flow-test-prefect-")
SESSION_MARK = uuid.uuid4().hex
os.environ.update(
    {
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # a busy 2-core CI machine: Prefect's own 20 s start and 60 s request limits are too tight
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
        "PREFECT_API_REQUEST_TIMEOUT": "300",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "INT8FLOW_TEST_SESSION": SESSION_MARK,
    }
)
sys.path.insert(0, str(Path(__file__).parent))

import contextlib

import digits


def marked_processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process carrying this session's mark, but this one."""
    found = {}
    needle = f"INT8FLOW_TEST_SESSION={SESSION_MARK}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        found[int(entry.name)] = (parent, command)
    return found


def end_processes(pids: list[int], grace_seconds: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def end_group(process, grace_seconds: float = 60.0) -> str:
    """Stop a process started with `start_new_session=True` and everything it started (SIGTERM, then
    SIGKILL after the grace time); return what it printed, if its output was piped."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        output = process.communicate(timeout=grace_seconds)[0]
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate(timeout=grace_seconds)[0]
    return output or ""


def run_int8flow(*args: str, env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`int8flow ARGS` in a process group of its own, ended (SIGKILL) if it outlives `timeout`."""
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "int8flow"), *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def _stop_own_prefect_server() -> None:
    """This process's ephemeral Prefect server, stopped the way Prefect would at exit: logs first."""
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker
        from prefect.server.api.server import SubprocessASGIServer

        APILogWorker.drain_all(timeout=10)
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind():
    """Whatever a test started ends with the session; orphans (a parent that died first) are reported."""
    # SIGTERM (a CI time limit) ends the session like Ctrl-C: fixtures' `finally` blocks still run.
    signal.signal(signal.SIGTERM, _interrupt)
    yield
    _stop_own_prefect_server()
    leftovers = marked_processes()
    orphans = {
        pid: command
        for pid, (parent, command) in leftovers.items()
        if parent not in leftovers and parent != os.getpid()
    }
    end_processes(list(leftovers))
    if orphans:
        lines = "\n".join(f"  {pid}: {command[:160]}" for pid, command in orphans.items())
        sys.stderr.write(
            f"\nint8flow tests: {len(orphans)} process(es) had outlived their parent and were ended:\n{lines}\n"
        )


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory) -> digits.DigitsFixture:
    """A small model fitted to scikit-learn's real handwritten digits, with its data files."""
    return digits.build(tmp_path_factory.mktemp("digits"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow SQLite store (and artifact folder) under tmp_path, used as the working dir."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
