"""The watcher: each model content quantized once, from a folder and from the MLflow registry, also
when two watchers overlap. Real Prefect (ephemeral), MLflow on a temp SQLite store, real ORT."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import digits
import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper, numpy_helper
from test_pipeline_e2e import spec_file

from int8flow.tasks.discover import NotReady, candidate_files, fingerprint, onnx_file_in, parse_tag, version_filter

PIPELINE = "digits-e2e"  # the name spec_file writes


def quick_spec(directory: Path, digits_model) -> Path:
    """The e2e test spec cut to one dynamic variant, short profiling and no registry: the watcher
    is under test here, not the pipeline."""
    path = spec_file(
        directory,
        digits_model,
        registry="",
        profiling="profiling: {batch_sizes: [1], threads: [1], warmup: 1, runs: 3}",
    )
    text = path.read_text()
    path.write_text(
        text.replace(text[text.index("variants:") : text.index("selection:")], "variants:\n  - kind: dynamic\n")
    )
    return path


def settle(path: Path) -> Path:
    """Back-date a file as if its copy had finished a while ago (the watcher waits ~2 s otherwise)."""
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def wrong_input_model(path: Path) -> Path:
    """A valid model whose input (`image`) is not in the spec's data: its pipeline run fails."""
    weight = numpy_helper.from_array(np.ones((64, 10), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["image", "W"], ["probabilities"])],
        "wrong",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def claims(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("int8flow-watch")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def pipeline_runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name(PIPELINE)
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


# -- the pure part: which files are models ready to be fingerprinted ---------------------------------


def test_only_complete_visible_onnx_files_are_candidates(tmp_path, digits_model):
    folder = tmp_path / "incoming"
    (folder / "nested").mkdir(parents=True)
    for name in ("b.onnx", "a.onnx", ".copying.onnx", "notes.txt", "nested/c.onnx"):
        shutil.copy(digits_model.model, folder / name)
    assert [p.name for p in candidate_files(folder)] == ["a.onnx", "b.onnx"]

    # a file modified just now may still be growing; a truncated one is not a model yet
    with pytest.raises(NotReady, match="modified less than"):
        fingerprint(folder / "a.onnx")
    truncated = folder / "truncated.onnx"
    truncated.write_bytes(digits_model.model.read_bytes()[:500])
    with pytest.raises(NotReady, match="not readable yet"):
        fingerprint(settle(truncated))

    # the fingerprint is the content's: the same bytes under two names are one model
    a, b = fingerprint(settle(folder / "a.onnx")), fingerprint(settle(folder / "b.onnx"))
    assert a.sha256 == b.sha256 and len(a.sha256) == 64


def test_registry_filters_and_mlflow_model_folders(tmp_path):
    assert parse_tag("stage=int8=yes") == ("stage", "int8=yes")
    assert version_filter("src", ("stage", "candidate")) == "name = 'src' AND tags.`stage` = 'candidate'"
    assert version_filter(None, ("stage", "candidate")) == "tags.`stage` = 'candidate'"
    with pytest.raises(ValueError):
        parse_tag("stage")
    (tmp_path / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "extra.onnx").write_bytes(b"")
    assert onnx_file_in(tmp_path) == tmp_path / "model.onnx"


# -- the flow ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_folder_each_content_runs_once_and_a_failure_spares_the_others(tmp_path, digits_model, mlflow_store):
    from int8flow.flows.watch import watch_models

    client = MlflowClient(mlflow_store)
    spec = str(quick_spec(tmp_path, digits_model))
    folder = tmp_path / "incoming"
    folder.mkdir()
    settle(Path(shutil.copy(digits_model.model, folder / "digits.onnx")))

    # when the watcher finds a model, it claims it and runs the pipeline on it
    first = watch_models(spec, folder=str(folder))
    sha256 = fingerprint(folder / "digits.onnx").sha256
    assert [(Path(n["source"]).name, n["sha256"]) for n in first["new"]] == [("digits.onnx", sha256)]
    assert first["triggered"][0]["status"] == "finished"
    [run] = pipeline_runs(client)
    assert run.info.status == "FINISHED" and run.info.run_id == first["triggered"][0]["pipeline_run_id"]
    assert run.data.tags["int8flow.source_sha256"] == sha256
    assert run.data.tags["int8flow.model_path"] == str(folder / "digits.onnx")
    [claim] = claims(client)
    assert claim.info.status == "FINISHED"
    assert claim.data.tags["int8flow.claim.sha256"] == sha256
    assert claim.data.tags["int8flow.claim.source"] == str(folder / "digits.onnx")
    assert claim.data.tags["int8flow.claim.pipeline"] == PIPELINE
    assert claim.data.tags["int8flow.claim.pipeline_run_id"] == run.info.run_id

    # when the watcher runs again with the same bytes also under another name, nothing runs again;
    # a file still being written waits for the next watch
    settle(Path(shutil.copy(digits_model.model, folder / "renamed.onnx")))
    other = digits.build(tmp_path / "other", hidden=64)
    shutil.copy(other.model, folder / "late.onnx")  # modified just now
    second = watch_models(spec, folder=str(folder))
    assert second["new"] == [] and second["triggered"] == []
    assert [Path(s["source"]).name for s in second["skipped"]] == ["digits.onnx", "renamed.onnx"]
    assert {s["claim_run_id"] for s in second["skipped"]} == {claim.info.run_id}
    assert [Path(w["source"]).name for w in second["waiting"]] == ["late.onnx"]
    assert len(pipeline_runs(client)) == 1 and len(claims(client)) == 1

    # when the late model is complete and a model that fails its pipeline arrives (first by name),
    # the failure is recorded on its claim and the other model still runs, once
    settle(folder / "late.onnx")
    settle(wrong_input_model(folder / "a-wrong-input.onnx"))
    third = watch_models(spec, folder=str(folder))
    outcomes = {Path(t["source"]).name: t for t in third["triggered"]}
    assert set(outcomes) == {"a-wrong-input.onnx", "late.onnx"}
    assert outcomes["a-wrong-input.onnx"]["status"] == "failed"
    assert "data does not match the model inputs ['image']" in outcomes["a-wrong-input.onnx"]["error"]
    assert outcomes["late.onnx"]["status"] == "finished"
    finished = [run for run in pipeline_runs(client) if run.info.status == "FINISHED"]
    assert len(finished) == 2
    by_source = {Path(c.data.tags["int8flow.claim.source"]).name: c for c in claims(client)}
    assert set(by_source) == {"digits.onnx", "late.onnx", "a-wrong-input.onnx"}
    failed = by_source["a-wrong-input.onnx"]
    assert failed.info.status == "FAILED" and "DataError" in failed.data.tags["int8flow.error"]
    assert watch_models(spec, folder=str(folder))["new"] == []


@pytest.mark.e2e
def test_registry_versions_with_the_tag_run_once(tmp_path, digits_model, mlflow_store):
    import mlflow
    import mlflow.onnx

    from int8flow.flows.watch import watch_models

    client = MlflowClient(mlflow_store)
    # given two versions of a source model; only the first carries the tag
    other = digits.build(tmp_path / "other", hidden=64)
    for model in (digits_model.model, other.model):
        with mlflow.start_run():
            mlflow.onnx.log_model(
                onnx.load(str(model)),
                name="model",
                registered_model_name="digits-source",
                pip_requirements=["onnxruntime"],  # inferring them takes seconds
            )
    client.set_model_version_tag("digits-source", "1", "stage", "candidate")
    # and a tagged version that is no ONNX model at all
    with mlflow.start_run() as run:
        mlflow.log_text("not a model", "notes/readme.txt")
    source = f"runs:/{run.info.run_id}/notes"
    client.create_model_version("digits-source", source, run.info.run_id, tags={"stage": "candidate"})
    spec = str(quick_spec(tmp_path, digits_model))
    cache = str(tmp_path / "cache")

    # when the watcher looks at the tagged versions of the model, it runs the ONNX one, once
    first = watch_models(spec, registry_model="digits-source", registry_tag="stage=candidate", cache_dir=cache)
    assert [n["source"] for n in first["new"]] == ["models:/digits-source/1"]
    assert [u["source"] for u in first["unusable"]] == ["models:/digits-source/3"]
    assert "expected one .onnx file" in first["unusable"][0]["reason"]
    assert first["triggered"][0]["status"] == "finished"
    [run] = pipeline_runs(client)
    assert run.data.tags["int8flow.source_sha256"] == first["new"][0]["sha256"]
    assert run.data.tags["int8flow.model_path"].startswith(str(tmp_path / "cache" / "digits-source" / "1"))

    # and a second watch, here by the tag alone (any model's versions), finds nothing new
    second = watch_models(spec, registry_tag="stage=candidate", cache_dir=cache)
    assert second["new"] == [] and [s["source"] for s in second["skipped"]] == ["models:/digits-source/1"]
    assert len(pipeline_runs(client)) == 1 and len(claims(client)) == 1


@pytest.mark.e2e
def test_concurrent_claims_of_one_model_make_one_claim_per_pipeline(mlflow_store):
    from int8flow.flows.tracking import Claims, MlflowStore
    from int8flow.flows.watch import Found, claim, ensure_claim_lock

    # given six watchers that reach the claim step for the same content at the same moment
    # (without the lock, 5-6 of them created a claim in trials on this machine)
    claims = Claims(MlflowStore())
    ensure_claim_lock()
    model = Found(source="incoming/m.onnx", path="incoming/m.onnx", sha256="ab" * 32)
    barrier = threading.Barrier(6)
    created: list[tuple[str, bool]] = []

    def watcher() -> None:
        barrier.wait()
        created.append(claim(claims, "pipeline-a", model))

    threads = [threading.Thread(target=watcher) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then one claimed it and the other five were pointed to that claim
    winners = [run_id for run_id, new in created if new]
    assert len(created) == 6 and len(winners) == 1
    assert {run_id for run_id, _ in created} == set(winners)
    # the same content under another pipeline is another job
    assert claim(claims, "pipeline-b", model)[1] is True
    assert claim(claims, "pipeline-b", model)[1] is False


@pytest.mark.e2e
def test_two_overlapping_watchers_trigger_a_deployment_once(tmp_path, digits_model, mlflow_store):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from int8flow.flows.pipeline import quantization_pipeline
    from int8flow.flows.watch import watch_models

    # given a deployment of the pipeline (nothing executes it: the flow run stays scheduled)
    deployment_id = quantization_pipeline.to_deployment(name="watch-test").apply()
    spec = str(quick_spec(tmp_path, digits_model))
    folder = tmp_path / "incoming"
    folder.mkdir()
    settle(Path(shutil.copy(digits_model.model, folder / "digits.onnx")))

    # when two watchers look at the same folder at the same time
    reports: list[dict] = []
    start = threading.Barrier(2)

    def watcher() -> None:
        start.wait()
        reports.append(watch_models(spec, folder=str(folder), deployment="int8flow/watch-test"))

    threads = [threading.Thread(target=watcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then exactly one claimed the model and triggered one flow run with the model as parameter
    assert sorted(len(r["new"]) for r in reports) == [0, 1]
    assert sorted(len(r["skipped"]) for r in reports) == [0, 1]
    [triggered] = [t for r in reports for t in r["triggered"]]
    assert triggered["status"] == "scheduled"
    with get_client(sync_client=True) as prefect:
        [flow_run] = prefect.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
    assert str(flow_run.id) == triggered["flow_run_id"]
    assert flow_run.parameters == {"spec_file": spec, "model_path": str(folder / "digits.onnx")}
    [claim] = claims(MlflowClient(mlflow_store))
    assert claim.data.tags["int8flow.claim.flow_run_id"] == triggered["flow_run_id"]
    assert claim.data.tags["int8flow.claim.status"] == "scheduled"
