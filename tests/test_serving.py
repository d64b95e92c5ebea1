"""Serving the champion the way the README shows: `mlflow models serve -m models:/NAME@champion`, with the
venv's `bin` on PATH (MLflow runs `uvicorn` from PATH), answering like ONNX Runtime on the same model."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from conftest import end_group
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from int8flow.flows.cli import app
from int8flow.flows.tracking import MlflowStore

pytestmark = pytest.mark.e2e
pytest.importorskip("torch", reason="the MNIST flagship exports from PyTorch ([torch] extra)")
PIPELINES = Path(__file__).parent.parent / "pipelines"
BIN = Path(sys.executable).parent
runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_mnist_champion_serves_what_onnx_runtime_computes(tmp_path, mlflow_store):
    # given the MNIST flagship's champion in the registry
    result = runner.invoke(app, ["run", str(PIPELINES / "mnist-cnn-int8.yaml")])
    assert result.exit_code == 0, result.output
    champion = MlflowClient(mlflow_store).get_model_version_by_alias("mnist-cnn-int8", "champion")
    model = MlflowStore(mlflow_store).download_version("mnist-cnn-int8", str(champion.version), tmp_path / "champion")
    images = np.load(PIPELINES / "mnist" / "evaluation.npz")["images"][:16].astype(np.float32)
    expected = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"images": images})[0]
    # when it is served as the README says
    port = _free_port()
    env = os.environ | {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_TRACKING_URI": mlflow_store}
    command = [
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/mnist-cnn-int8@champion",
        "--env-manager",
        "local",
        "-p",
        str(port),
    ]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and server.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            time.sleep(0.5)
        assert server.poll() is None, server.stdout.read() if server.stdout else "exited"
        response = httpx.post(
            f"http://127.0.0.1:{port}/invocations", json={"inputs": {"images": images.tolist()}}, timeout=120
        )
    finally:
        end_group(server)
    # then it answers exactly what ONNX Runtime computes on the same model
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    served = np.asarray(predictions["logits"] if isinstance(predictions, dict) else predictions, dtype=np.float32)
    assert served.shape == expected.shape
    assert np.abs(served - expected).max() == 0.0
