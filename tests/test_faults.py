"""Faults, for real: `int8flow run` processes killed with SIGKILL at named points, then run again.

After each kill the store must hold no RUNNING run of the dead process (the next run marks it FAILED
and says why), no duplicate model version, a sane alias, no lock left taken, and the re-run completes.
Also: two first runs at once on a fresh Prefect home both complete. Everything runs in subprocesses in
their own process groups, ended on every path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import marked_processes, run_int8flow
from mlflow.tracking import MlflowClient
from test_pipeline_e2e import runs_of, spec_file

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
RUN_SECONDS = 900
SMALL = "variants:\n  - kind: dynamic\n  - kind: static\n    per_channel: true\n"


def _spec(tmp_path: Path, digits_model) -> Path:
    path = spec_file(tmp_path, digits_model)
    text = path.read_text()
    path.write_text(text[: text.index("variants:")] + SMALL + text[text.index("selection:") :])
    return path


def _run(spec: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run_int8flow("run", str(spec), env=env, cwd=cwd, timeout=RUN_SECONDS)


def _environment(tmp_path: Path, prefect_home: Path | None = None) -> dict[str, str]:
    return os.environ | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PREFECT_HOME": str(prefect_home or tmp_path / "prefect"),
    }


def _no_orphans_of(output: str) -> None:
    """The killed process's ephemeral Prefect server died with it (poll: the kernel signals, it exits)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        servers = [command for parent, command in marked_processes().values() if parent == 1 and "uvicorn" in command]
        if not servers:
            return
        time.sleep(0.5)
    raise AssertionError(f"left running after the kill: {servers}\n{output[-2000:]}")


@pytest.mark.parametrize("point", ["fp32-done", "variant-logged", "registered"])
def test_a_run_killed_at_a_named_point_leaves_a_store_the_next_run_completes_on(tmp_path, digits_model, point):
    spec, env = _spec(tmp_path, digits_model), _environment(tmp_path)
    # given a run killed with SIGKILL at `point`
    killed = _run(spec, env | {"INT8FLOW_FAULT_AT": point}, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]
    _no_orphans_of(killed.stdout)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents, children = runs_of(client, "digits-e2e")
    assert [run.info.status for run in parents] == ["RUNNING"], "the dead run is still RUNNING until someone looks"
    dead = parents[0].info.run_id
    left_running = {run.info.run_id for run in children if run.info.status == "RUNNING"}
    # when the same spec runs again
    again = _run(spec, env, tmp_path)
    assert again.returncode == 0, again.stdout[-3000:]
    assert "left RUNNING by processes that are gone were marked FAILED" in again.stdout
    # then nothing is RUNNING, the dead run and its variants are FAILED and say why
    parents, children = runs_of(client, "digits-e2e")
    assert not [run for run in parents + children if run.info.status == "RUNNING"]
    dead_run = client.get_run(dead)
    assert dead_run.info.status == "FAILED" and "is gone" in dead_run.data.tags["int8flow.abandoned"]
    for child in children:
        if child.info.run_id in left_running:  # finished variant runs stay finished
            assert child.info.status == "FAILED" and "int8flow.abandoned" in child.data.tags
    # and the registry holds one version of the selected recipe, with the alias and a complete registration
    versions = client.search_model_versions("name='digits-mlp'")
    assert len(versions) == 1, [v.version for v in versions]
    assert versions[0].tags["int8flow.registration"] == "complete"
    assert str(client.get_model_version_by_alias("digits-mlp", "champion").version) == str(versions[0].version)


def test_two_first_runs_at_once_on_a_fresh_prefect_home_both_complete(tmp_path, digits_model):
    spec = _spec(tmp_path, digits_model)
    home = tmp_path / "fresh-prefect-home"
    envs = [_environment(tmp_path / name, home) for name in ("a", "b")]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    processes = [
        subprocess.Popen(
            [str(BIN / "int8flow"), "run", str(spec)],
            env=env,
            cwd=tmp_path / name,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for env, name in zip(envs, ("a", "b"), strict=True)
    ]
    try:
        outputs = [process.communicate(timeout=RUN_SECONDS)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
    assert [process.returncode for process in processes] == [0, 0], "\n".join(output[-2000:] for output in outputs)
