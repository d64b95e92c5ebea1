"""What a reviewer sees, checked in a real browser: Debian's headless Chromium on the MLflow UI (served
by `mlflow server` on the test's own store), after a real pipeline run. Screenshots are kept in
`.int8flow/test-artifacts/` at the repository root."""

from __future__ import annotations

import contextlib
import html
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import end_group
from mlflow.tracking import MlflowClient
from test_pipeline_e2e import runs_of, spec_file
from typer.testing import CliRunner

from int8flow.flows.cli import app

pytestmark = pytest.mark.e2e
runner = CliRunner()
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / ".int8flow" / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _mlflow_ui(store_uri: str, cwd: Path):
    port = _free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        store_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    server = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            assert server.poll() is None, "mlflow server exited"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        end_group(server)


def _browse(url: str, shot: str, profile: Path) -> str:
    """The page's text after its scripts ran (and a screenshot of it)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    common = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", "--window-size=1400,1600"]
    subprocess.run([*common, f"--screenshot={ARTIFACTS / shot}", url], capture_output=True, timeout=300, check=False)
    page = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=300, check=True).stdout
    text = re.sub(r"<script.*?</script>|<style.*?</style>", "", page, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))), page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/setup.sh installs it)")
def test_the_mlflow_ui_shows_the_verdict_the_table_and_the_registry_says_why(tmp_path, digits_model, mlflow_store):
    # given a finished pipeline run with a registered champion
    result = runner.invoke(app, ["run", str(spec_file(tmp_path, digits_model))])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    parents, _ = runs_of(client, "digits-e2e")
    parent = parents[0]
    experiment = parent.info.experiment_id
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    with _mlflow_ui(mlflow_store, tmp_path) as ui:
        # when a reviewer opens the parent run (the classic ML view, as the run's links ask for)
        text, page = _browse(
            f"{ui}/#/experiments/{experiment}/runs/{parent.info.run_id}?workflowType=machine_learning",
            "parent-run.png",
            tmp_path / "profile",
        )
        # then its page shows which variant won, by how much, and why every other lost
        selected = parent.data.tags["int8flow.selected"]
        assert f"Selected {selected}" in text, text[:3000]
        assert re.search(r"\d\.\d\dx FP32 \(90 % interval", text), text[:3000]
        assert "<table" in page and "deliberately-broken" in text and "failed: quantize" in text
        assert "speed-up (90 % interval)" in text and "verdict" in text
        # when they open the registered version
        text, _ = _browse(
            f"{ui}/#/models/digits-mlp/versions/{champion.version}?workflowType=machine_learning",
            "version.png",
            tmp_path / "profile",
        )
        # then it says what it is, how fast, and why it holds the alias
        assert selected in text and "x FP32 (90 % interval" in text, text[:3000]
        assert "Alias decision" in text and "int8flow.speedup" in text
    assert (ARTIFACTS / "parent-run.png").stat().st_size > 10_000
