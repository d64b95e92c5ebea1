"""Fan-out over Dask: the same spec through Prefect's DaskTaskRunner on a local 2-worker cluster logs the
same results as through the default thread-pool runner."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from test_pipeline_e2e import runs_of, spec_file
from typer.testing import CliRunner

from int8flow.flows.cli import app

pytest.importorskip("prefect_dask", reason="the [dask] extra")
runner = CliRunner()
# Accuracy and size are deterministic; latencies are not and are left out of the comparison.
COMPARED = ("top1", "top1_drop", "cosine", "cosine_min", "mae", "size_mb", "compression_ratio")


def _results(client: MlflowClient, parent_id: str) -> dict:
    _, children = runs_of(client, "digits-e2e")
    return {
        run.info.run_name: (
            run.info.status,
            {key: round(run.data.metrics[key], 9) for key in COMPARED if key in run.data.metrics},
            run.data.tags["int8flow.selected"],
        )
        for run in children
        if run.data.tags["mlflow.parentRunId"] == parent_id
    }


@pytest.mark.e2e
def test_local_dask_cluster_logs_the_same_results_as_the_default_runner(tmp_path, digits_model, mlflow_store):
    spec = spec_file(tmp_path, digits_model)
    default = runner.invoke(app, ["run", str(spec)])
    assert default.exit_code == 0, default.output
    fanned_out = runner.invoke(app, ["run", str(spec), "--dask-workers", "2"])
    assert fanned_out.exit_code == 0, fanned_out.output

    client = MlflowClient(mlflow_store)
    parents, _ = runs_of(client, "digits-e2e")
    assert len(parents) == 2 and all(parent.info.status == "FINISHED" for parent in parents)
    first, second = sorted(parents, key=lambda run: run.info.start_time)
    assert _results(client, first.info.run_id) == _results(client, second.info.run_id)
    assert len(_results(client, first.info.run_id)) == 5  # every variant ran (one fails on purpose) in both
    assert first.data.tags["int8flow.selected"] == second.data.tags["int8flow.selected"] != "none"
