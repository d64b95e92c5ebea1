"""Multi-user set-up, for real: PostgreSQL, the MLflow tracking server and the Prefect server started by
`infra/servers.sh`, a Prefect process worker, and `int8flow` processes talking to them.

Nothing here is mocked: every check goes through the servers' REST APIs. The servers run on free ports
and on databases named for this session (dropped at the end), so neither a developer's own servers nor
another test session on the same machine are touched. Every process started here runs in its own
process group and is ended on every exit path; time limits are generous (CI machines are busy) and
readiness is polled, never slept for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import end_group
from test_pipeline_e2e import spec_file

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SESSION = uuid.uuid4().hex[:8]
# Generous: a 2-core CI machine running other jobs can be ten times slower than a quiet one.
RUN_SECONDS = 1200
API_SECONDS = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


MLFLOW_PORT, PREFECT_PORT = _free_port(), _free_port()
MLFLOW = f"http://127.0.0.1:{MLFLOW_PORT}"
PREFECT = f"http://127.0.0.1:{PREFECT_PORT}/api"

pytestmark = [pytest.mark.servers, pytest.mark.e2e]


def _postgres_reachable() -> bool:
    if shutil.which("psql") is None:
        return False
    probe = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "select 1"]
    return subprocess.run(probe, capture_output=True, timeout=API_SECONDS).returncode == 0


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    if not _postgres_reachable():
        pytest.skip("PostgreSQL on 127.0.0.1:5432 is needed (it runs on the project's machines)")
    state = tmp_path_factory.mktemp("infra")
    infra_env = os.environ | {
        "INT8FLOW_INFRA_DIR": str(state),
        "INT8FLOW_BIN": str(BIN),
        "MLFLOW_PORT": str(MLFLOW_PORT),
        "PREFECT_PORT": str(PREFECT_PORT),
        "MLFLOW_DB": f"int8flow_test_mlflow_{SESSION}",
        "PREFECT_DB": f"int8flow_test_prefect_{SESSION}",
        "INT8FLOW_START_SECONDS": "600",
    }
    script = str(ROOT / "infra" / "servers.sh")
    try:
        started = subprocess.run(["bash", script, "start"], env=infra_env, capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        yield os.environ | {
            "MLFLOW_TRACKING_URI": MLFLOW,
            "PREFECT_API_URL": PREFECT,
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_HOME": str(state / "client-home"),
            "PREFECT_API_REQUEST_TIMEOUT": "300",
        }
    finally:
        stopped = subprocess.run(
            ["bash", script, "drop"], env=infra_env, capture_output=True, text=True, timeout=RUN_SECONDS
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


def _started(command: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    """A process in its own group, so that ending it ends whatever it started too."""
    return subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _int8flow(env: dict, *args: str, cwd: Path) -> subprocess.Popen:
    return _started([str(BIN / "int8flow"), *args], env, cwd)


def _end(process: subprocess.Popen) -> str:
    """Stop the process group (SIGTERM, then SIGKILL) and return what it printed."""
    return end_group(process)


@contextlib.contextmanager
def _running(*processes: subprocess.Popen) -> Iterator[None]:
    """Every process is ended on the way out, whatever happened inside."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                _end(process)


def _finished(process: subprocess.Popen, timeout: float = RUN_SECONDS) -> str:
    with _running(process):
        output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


def _mlflow(method: str, path: str, **kwargs) -> dict:
    response = httpx.request(method, f"{MLFLOW}/api/2.0/mlflow/{path}", timeout=API_SECONDS, **kwargs)
    response.raise_for_status()
    return response.json()


def _runs(experiment_name: str, filter_string: str = "") -> list[dict]:
    experiment = _mlflow("GET", "experiments/get-by-name", params={"experiment_name": experiment_name})["experiment"]
    found = _mlflow(
        "POST",
        "runs/search",
        json={"experiment_ids": [experiment["experiment_id"]], "filter": filter_string, "max_results": 1000},
    )
    return found.get("runs", [])


def _tags(run: dict) -> dict:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def _parents(runs: list[dict]) -> list[dict]:
    return [run for run in runs if "mlflow.parentRunId" not in _tags(run)]


def _champion(model_name: str) -> dict:
    return _mlflow("GET", "registered-models/alias", params={"name": model_name, "alias": "champion"})["model_version"]


def test_a_deployment_triggered_through_the_prefect_api_runs_and_lands_in_mlflow(servers, tmp_path, digits_model):
    # given a deployment made by `int8flow deploy`, with a cron schedule, and a process worker
    spec = spec_file(tmp_path, digits_model, registry="registry: {model_name: digits-deployed}")
    deployed = _finished(
        _int8flow(
            servers,
            "deploy",
            str(spec),
            "--name",
            "digits-nightly",
            "--pool",
            "int8flow-test",
            "--cron",
            "0 3 * * *",
            cwd=tmp_path,
        )
    )
    assert "deployment int8flow/digits-nightly" in deployed
    deployment = httpx.get(f"{PREFECT}/deployments/name/int8flow/digits-nightly", timeout=API_SECONDS).json()
    assert deployment["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    worker = _started(
        [str(BIN / "prefect"), "worker", "start", "--pool", "int8flow-test", "--type", "process"], servers, tmp_path
    )
    with _running(worker):
        # when a run is created through the Prefect REST API
        created = httpx.post(f"{PREFECT}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=API_SECONDS)
        flow_run = created.json()
        state = None
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline and worker.poll() is None:
            state = httpx.get(f"{PREFECT}/flow_runs/{flow_run['id']}", timeout=API_SECONDS).json()["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(2)
        # The state turns COMPLETED before the flow-run process has sent its last log lines: wait for them
        # while the worker (and so that process) still lives.
        run_id = flow_run["id"]
        wanted = ("select: selected", "time: b1_t1", "done: selected")
        messages = ""
        while state == "COMPLETED" and time.monotonic() < deadline:
            logs = httpx.post(
                f"{PREFECT}/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [run_id]}}, "limit": 200, "sort": "TIMESTAMP_DESC"},
                timeout=API_SECONDS,
            ).json()
            messages = "\n".join(entry["message"] for entry in logs)
            if all(line in messages for line in wanted):
                break
            time.sleep(1)
        worker_output = _end(worker)
    # then it completes, and its runs, metrics and the alias are visible through MLflow's REST API
    assert state == "COMPLETED", worker_output[-3000:]
    # and the Prefect UI has the story: stage messages in the run's logs, a summary artifact, a name, tags
    assert all(line in messages for line in wanted), messages[:2000]  # the newest first
    artifacts = httpx.post(
        f"{PREFECT}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}, timeout=API_SECONDS
    ).json()
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    summary = by_key["digits-e2e-summary"]
    assert "**Selected" in summary["data"] and "| variant |" in summary["data"]
    assert (
        "workflowType=machine_learning" in summary["data"]
        and "#/experiments/" in by_key["digits-e2e-mlflow-run"]["data"]
    )
    finished = httpx.get(f"{PREFECT}/flow_runs/{run_id}", timeout=API_SECONDS).json()
    assert finished["name"] == "digits" and "spec:digits-e2e" in finished["tags"]
    parents = _parents(_runs("digits-e2e", "tags.`int8flow.registered_version` != ''"))
    assert len(parents) == 1 and parents[0]["info"]["status"] == "FINISHED"
    metrics = {metric["key"] for metric in parents[0]["data"]["metrics"]}
    assert {"fp32.top1", "variants_total"} <= metrics
    champion = _champion("digits-deployed")
    children = _runs("digits-e2e", f"tags.`mlflow.parentRunId` = '{parents[0]['info']['run_id']}'")
    assert champion["run_id"] in {run["info"]["run_id"] for run in children}


def test_two_flows_at_once_lose_nothing_and_agree_on_one_alias(servers, tmp_path, digits_model):
    spec = spec_file(tmp_path, digits_model, registry="registry: {model_name: digits-concurrent}")
    # given two pipeline processes started together against the same servers
    first, second = (_int8flow(servers, "run", str(spec), cwd=tmp_path) for _ in range(2))
    with _running(first, second):
        _finished(first), _finished(second)
    # then both parent runs and all their variants are there, finished, with their metrics
    parents = _parents(_runs("digits-e2e", "params.`spec.registry.model_name` = 'digits-concurrent'"))
    assert len(parents) == 2 and all(run["info"]["status"] == "FINISHED" for run in parents)
    for parent in parents:
        children = _runs("digits-e2e", f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
        assert len(children) == 5
        for child in children:
            if child["info"]["status"] == "FINISHED":
                assert {"top1", "cosine", "size_mb", "b1_t1_p50_ms"} <= {m["key"] for m in child["data"]["metrics"]}
    # and the registry is consistent: the identical recipe was registered once (promotion runs under a
    # lock, so the second run found the first one's version), both runs name a version that exists,
    # and exactly one version holds the alias
    versions = _mlflow("GET", "model-versions/search", params={"filter": "name='digits-concurrent'"})["model_versions"]
    assert len(versions) == 1
    assert {_tags(parent)["int8flow.registered_version"] for parent in parents} == {versions[0]["version"]}
    assert _champion("digits-concurrent")["version"] == versions[0]["version"]


def test_a_model_dropped_into_the_watched_folder_starts_exactly_one_run(servers, tmp_path, digits_model):
    import digits

    # given a watched folder and a spec whose data and constraints apply to the new model
    spec = spec_file(tmp_path, digits_model, registry="registry: {model_name: digits-watched}")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    new_model = digits.build(tmp_path / "new", hidden=64).model
    shutil.copy(new_model, incoming / "candidate.onnx")
    os.utime(incoming / "candidate.onnx", (time.time() - 10, time.time() - 10))  # fully written
    # when two watcher processes look at the folder at the same time
    watchers = [_int8flow(servers, "watch", str(spec), "--folder", str(incoming), cwd=tmp_path) for _ in range(2)]
    with _running(*watchers):
        outputs = [_finished(watcher) for watcher in watchers]
    # then exactly one of them claimed the model and exactly one pipeline run quantized it
    assert sorted(output.count("1 new,") for output in outputs) == [0, 1], outputs
    claims = _runs("int8flow-watch", "tags.`int8flow.claim.pipeline` = 'digits-e2e'")
    assert len(claims) == 1
    sha256 = _tags(claims[0])["int8flow.claim.sha256"]
    pipeline_runs = _parents(_runs("digits-e2e", f"tags.`int8flow.source_sha256` = '{sha256}'"))
    assert len(pipeline_runs) == 1 and pipeline_runs[0]["info"]["status"] == "FINISHED"
    assert _tags(pipeline_runs[0])["int8flow.model_path"] == str((incoming / "candidate.onnx").resolve())
    # and a later watch finds nothing new
    assert "0 new, 1 already claimed" in _finished(
        _int8flow(servers, "watch", str(spec), "--folder", str(incoming), cwd=tmp_path)
    )


def test_the_declarative_deployments_in_infra_register(servers, tmp_path):
    # `prefect deploy` reads infra/prefect.yaml from the repository root, like a user would, after
    # creating the pool it names (`prefect deploy` refuses a missing one)
    pool = subprocess.run(
        [str(BIN / "prefect"), "work-pool", "create", "int8flow", "--type", "process", "--overwrite"],
        env=servers,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = subprocess.run(
        [str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
        env=servers | {"INT8FLOW_HOME": str(ROOT)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    nightly = httpx.get(f"{PREFECT}/deployments/name/int8flow/minilm-nightly", timeout=API_SECONDS).json()
    assert nightly["parameters"] == {"spec_file": "pipelines/minilm-int8.yaml"}
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    watcher = httpx.get(f"{PREFECT}/deployments/name/int8flow-watch/watch-incoming-models", timeout=API_SECONDS).json()
    assert watcher["parameters"]["folder"] == "incoming"
