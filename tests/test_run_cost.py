"""What keeps a run cheap (issue 17), checked for behaviour; the costs themselves are measured by
`bench/` and recorded in docs/benchmarks.md, not asserted here.

- a stage run in a child process (the export): its result, its input errors and its output come back,
  and the child is gone afterwards;
- the local Prefect server kept between runs (`int8flow server start`): a real server on a free port and
  a temporary Prefect home; `int8flow run` uses it instead of an ephemeral one, the flow runs land in
  it, and `int8flow server stop` leaves no process behind.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import run_int8flow
from test_pipeline_e2e import spec_file

from int8flow.flows.isolated import in_child_process
from int8flow.flows.runlog import LOG_ENV
from int8flow.tasks.errors import InputError

BIN = Path(sys.executable).parent
RUN_SECONDS = 1200  # generous: a busy 2-core CI machine


def _says_and_fails(message: str) -> None:
    print(f"stdout of the child: {message}")
    raise InputError(message)


def _children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_a_stage_in_a_child_process_returns_its_result_and_leaves_nothing_running(tmp_path, monkeypatch):
    before = _children()
    assert in_child_process(os.getpid) != os.getpid()
    log = tmp_path / "run.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    with pytest.raises(InputError, match="the checkpoint does not fit"):
        in_child_process(_says_and_fails, "the checkpoint does not fit")
    assert "stdout of the child: the checkpoint does not fit" in log.read_text()  # the log, not the console
    deadline = time.monotonic() + 60
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _children() - before


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _int8flow(env: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run_int8flow(*args, env=env, cwd=cwd, timeout=RUN_SECONDS)


@pytest.mark.e2e
def test_runs_use_the_local_prefect_server_and_stop_leaves_nothing_behind(tmp_path, digits_model):
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    port = _free_port()
    spec = spec_file(tmp_path, digits_model)
    # a first run before any kept server: Prefect's ephemeral server, on the same PREFECT_HOME database
    cold = _int8flow(env, tmp_path, "run", str(spec))
    assert cold.returncode == 0 and "Prefect: the local server" not in cold.stdout, cold.stdout
    try:
        started = _int8flow(env, tmp_path, "server", "start", "--port", str(port))
        assert started.returncode == 0, started.stdout
        server_pid = int(__import__("json").loads((home / "int8flow-server.json").read_text())["pid"])
        status = _int8flow(env, tmp_path, "server", "status")
        assert status.returncode == 0 and f"127.0.0.1:{port}" in status.stdout

        outputs = [_int8flow(env, tmp_path, "run", str(spec)) for _ in range(2)]
        for result in outputs:
            assert result.returncode == 0, result.stdout
            assert f"Prefect: the local server at http://127.0.0.1:{port}" in result.stdout
        # the first run creates the MLflow store: MLflow's lines about it go to the run's log
        assert "Creating initial MLflow database tables" not in outputs[0].stdout, outputs[0].stdout
        # the second run compares with the champion the first one registered: still no library output
        assert "Downloading artifacts" not in outputs[1].stdout and "Traceback" not in outputs[1].stdout

        # all three flow runs are in the kept server's database, finished
        api = f"http://127.0.0.1:{port}/api"
        flow_runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_ASC"}, timeout=60).json()
        int8flow_runs = [run for run in flow_runs if run["name"].startswith(spec.stem)]
        assert len(int8flow_runs) == 3, [run["name"] for run in flow_runs]
        assert {run["state_type"] for run in int8flow_runs} == {"COMPLETED"}
        # every run's log reached Prefect to its last line, the ephemeral server's too: the command drains
        # Prefect's log worker before the exit handlers stop that server (it used to lose the last ~12 lines)
        for flow_run in int8flow_runs:
            logs = httpx.post(
                f"{api}/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
                timeout=60,
            ).json()
            assert any(log["message"].startswith("done: ") for log in logs), [log["message"][:60] for log in logs[-5:]]

        # a deployment goes to the kept server too, without PREFECT_API_URL
        deployed = _int8flow(env, tmp_path, "deploy", str(spec), "--name", "kept")
        assert deployed.returncode == 0, deployed.stdout
        assert f"PREFECT_API_URL=http://127.0.0.1:{port}/api prefect worker start" in deployed.stdout
        deployments = httpx.post(f"http://127.0.0.1:{port}/api/deployments/filter", json={}, timeout=60).json()
        assert [deployment["name"] for deployment in deployments] == ["kept"]
    finally:
        stopped = _int8flow(env, tmp_path, "server", "stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stdout
    assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE
    assert not (home / "int8flow-server.json").exists()
    status = _int8flow(env, tmp_path, "server", "status")
    assert status.returncode == 1 and "no local Prefect server" in status.stdout


def test_server_start_on_a_port_in_use_says_so_and_records_nothing(tmp_path):
    """Another server on the port would answer the health check while Prefect's fails to bind: the
    start must not report success and leave a dead server recorded."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = _int8flow(env, tmp_path, "server", "start", "--port", str(port))
    assert started.returncode == 1, started.stdout
    assert f"127.0.0.1:{port} is already in use" in started.stdout
    assert not (home / "int8flow-server.json").exists()
