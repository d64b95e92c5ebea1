"""Data of any shape: samples of different lengths in a folder, labels of different lengths, a state whose
samples are on axis 1, a scalar fed to every batch, metrics over chosen outputs; each through the stages
with real ORT sessions, then through `int8flow validate` and `int8flow run`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import shapes
from mlflow.tracking import MlflowClient
from test_pipeline_e2e import runs_of
from typer.testing import CliRunner

from int8flow.flows.cli import app
from int8flow.tasks.calibrate import Calibration, calibrate
from int8flow.tasks.data import DataError, DataSource, load_dataset
from int8flow.tasks.evaluate import Metric, evaluate, evaluate_model, run_model
from int8flow.tasks.kinds import DynamicVariant, MakeJob
from int8flow.tasks.model import inspect_model
from int8flow.tasks.profile import input_feed
from int8flow.tasks.quantize import quantize

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> shapes.ShapesFixture:
    return shapes.build(tmp_path_factory.mktemp("shapes"))


def _load(model: Path, source: DataSource):
    info = inspect_model(model)
    return load_dataset(source, info.input_dtypes, input_shapes={t.name: t.shape for t in info.inputs})


def test_samples_of_different_lengths_are_scored_per_sample(models, tmp_path):
    data = _load(models.sequence_model, DataSource(path=models.sequence_data, batch_size=8))
    assert data.samples == 24 and len({batch.inputs["x"].shape[1] for batch in data.batches}) > 10
    reference = run_model(models.sequence_model, data)
    fp32 = evaluate(reference, reference, data, [Metric(name="cosine"), Metric(name="topk_agreement")])
    assert fp32.metrics["cosine"] == pytest.approx(1.0) and fp32.metrics["topk_agreement"] == 1.0
    # labels of different lengths: one array per sample, never concatenated
    assert [label.shape for label in data.sample_labels()][:4] == [(1,), (2,), (3,), (4,)]
    with pytest.raises(DataError, match="read them per sample"):
        data.labels()
    # a quantized model is scored sample by sample, and its error shows
    made = quantize(models.sequence_model, DynamicVariant(kind="dynamic"), MakeJob(tmp_path / "dyn" / "model.onnx", {}))
    scores = evaluate_model(made.path, data, reference, [Metric(name="cosine")])
    assert 0.9 < scores.metrics["cosine"] < 1.0 and scores.metrics["cosine_min"] <= scores.metrics["cosine"]


def test_a_per_sample_user_metric_gets_each_sample_and_its_label(models, tmp_path, monkeypatch):
    (tmp_path / "seq_metrics.py").write_text(
        textwrap.dedent(
            """\
            import numpy as np
            def label_hits(output, reference, label):
                # output [T, 16] of one sample; label [L]: share of the label's classes among the argmaxes
                assert output.ndim == 2 and reference.shape == output.shape and label.ndim == 1
                return float(np.isin(label, output.argmax(-1)).mean())
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    metric = Metric.model_validate({"name": "label_hits", "function": "seq_metrics:label_hits", "per_sample": True})
    data = _load(models.sequence_model, DataSource(path=models.sequence_data, batch_size=4))
    reference = run_model(models.sequence_model, data)
    value = evaluate(reference, reference, data, [metric]).metrics["label_hits"]
    expected = np.mean(
        [
            np.isin(label, row.argmax(-1)).mean()
            for row, label in zip(
                [row for batch in reference.batches for row in batch], data.sample_labels(), strict=True
            )
        ]
    )
    assert value == pytest.approx(expected) and 0 < value < 1


def test_a_state_on_axis_1_and_a_scalar_are_fed_with_every_batch(models, tmp_path):
    source = DataSource.model_validate(
        {"path": models.state_data, "batch_size": 16, "inputs": {"state": {"sample_axis": 1}, "sr": {"value": 16000}}}
    )
    data = _load(models.state_model, source)
    assert [batch.size for batch in data.batches] == [16, 16, 8]
    last = data.batches[-1]
    assert (
        last.inputs["state"].shape == (2, 8, 4)
        and last.inputs["sr"].shape == ()
        and last.inputs["sr"].dtype == np.int64
    )
    # the state's samples stay with their frames: sample 35 is frame 35 and state column 35
    raw = np.load(models.state_data)
    assert np.array_equal(last.take(slice(3, 4))["state"][:, 0], raw["state"][:, 35])
    # profiling's feed of any batch size, and calibration, one sample at a time
    feed = input_feed(data, 3)
    assert feed["frames"].shape == (3, 8) and feed["state"].shape == (2, 3, 4) and feed["sr"].shape == ()
    ranges = calibrate(models.state_model, data, "minmax", Calibration(data=source), tmp_path / "ranges.json")
    assert ranges.samples == 40 and "mixed" in json.loads(ranges.path.read_text())["data"]
    # the metrics read both outputs: each is logged, the worst decides
    reference = run_model(models.state_model, data, "all")
    scores = evaluate(reference, reference, data, [Metric(name="cosine")])
    assert {"cosine.score", "cosine.stateN", "cosine"} <= set(scores.metrics)
    # a state not in the data at all: zeros shaped by each batch
    zeros = DataSource.model_validate(
        {"path": models.state_data, "inputs": {"state": {"zeros": [2, "batch", 4]}, "sr": {"value": 16000}}}
    )
    assert _load(models.state_model, zeros).batches[0].inputs["state"].shape == (2, 16, 4)


def test_declared_inputs_are_checked_against_the_model(models):
    wrong_rank = DataSource.model_validate(
        {"path": models.state_data, "inputs": {"state": {"sample_axis": 1}, "sr": {"value": [16000]}}}
    )
    with pytest.raises(DataError, match="'sr' has shape \\(1,\\); the model takes rank 0"):
        _load(models.state_model, wrong_rank)
    unknown = DataSource.model_validate(
        {"path": models.state_data, "inputs": {"state": {"sample_axis": 1}, "sr": {"value": 1}, "h": {"value": 0}}}
    )
    with pytest.raises(DataError, match=r"`inputs` names \['h'\], which the model does not take"):
        _load(models.state_model, unknown)
    undeclared = DataSource.model_validate({"path": models.state_data, "inputs": {"sr": {"value": 16000}}})
    with pytest.raises(DataError, match=r"same number of samples .*`sample_axis`"):
        _load(models.state_model, undeclared)
    with pytest.raises(ValueError, match=r"give one of `value`, `zeros`, `path`"):
        DataSource.model_validate({"path": models.state_data, "inputs": {"sr": {"value": 1, "zeros": [1]}}})


def _spec(directory: Path, body: str) -> Path:
    path = directory / "spec.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def _run_and_check(spec: Path, mlflow_store: str, name: str) -> dict:
    assert runner.invoke(app, ["validate", str(spec)]).exit_code == 0
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    parents, children = runs_of(MlflowClient(mlflow_store), name)
    assert [parent.info.status for parent in parents] == ["FINISHED"]
    assert children and all(child.info.status == "FINISHED" for child in children)
    return {child.info.run_name: child.data.metrics for child in children}


@pytest.mark.e2e
def test_a_variable_length_model_validates_and_runs_with_built_in_metrics(models, tmp_path, mlflow_store):
    spec = _spec(
        tmp_path,
        f"""\
        name: sequence-e2e
        model: {{source: onnx, path: {models.sequence_model}}}
        calibration: {{data: {{path: {models.sequence_data}, batch_size: 1}}, method: minmax}}
        evaluation:
          data: {{path: {models.sequence_data}, batch_size: 4}}
          metrics: [cosine, topk_agreement]
        variants:
          - kind: dynamic
          - kind: static
            per_channel: true
        profiling: {{batch_sizes: [1], threads: [1], warmup: 1, runs: 6}}
        selection: {{metric: cosine, max_drop: 0.05, min_speedup: 0.0}}
        registry: {{model_name: sequence-int8}}
        """,
    )
    metrics = _run_and_check(spec, mlflow_store, "sequence-e2e")
    assert all(0.9 < values["cosine"] <= 1.0 for values in metrics.values())


@pytest.mark.e2e
def test_a_stateful_model_validates_and_runs_with_built_in_metrics(models, tmp_path, mlflow_store):
    spec = _spec(
        tmp_path,
        f"""\
        name: stateful-e2e
        model: {{source: onnx, path: {models.state_model}}}
        calibration:
          data:
            path: {models.state_data}
            inputs: {{state: {{sample_axis: 1}}, sr: {{value: 16000}}}}
          method: minmax
        evaluation:
          data:
            path: {models.state_data}
            batch_size: 8
            inputs: {{state: {{sample_axis: 1}}, sr: {{value: 16000}}}}
          metrics: [top1, cosine]
          output: all
        variants:
          - kind: dynamic
          - kind: static
        profiling: {{batch_sizes: [4], threads: [1], warmup: 1, runs: 6}}
        selection: {{metric: cosine, max_drop: 0.2, min_speedup: 0.0}}
        registry: {{model_name: stateful-int8}}
        """,
    )
    metrics = _run_and_check(spec, mlflow_store, "stateful-e2e")
    for values in metrics.values():
        assert values["cosine"] == min(values["cosine.score"], values["cosine.stateN"])
    # a declared input the model does not take is refused at validate, located in the spec
    bad = spec.read_text().replace("sr: {value: 16000}}\n  method", "sr: {value: 16000}, h: {value: 0}}\n  method")
    assert bad != spec.read_text()
    spec.write_text(bad)
    result = runner.invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2 and "calibration.data.inputs.h" in result.output and "no input 'h'" in result.output
