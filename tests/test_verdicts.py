"""Verdicts that garbage cannot pass: NaN, labels of the wrong kind, complex inputs, a collapse that a
mean metric hides, and a held-out split selection never sees."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from mlflow.tracking import MlflowClient
from onnx import TensorProto, helper, numpy_helper
from test_pipeline_e2e import runs_of, spec_file
from typer.testing import CliRunner

from int8flow.flows.cli import app

pytestmark = pytest.mark.e2e
runner = CliRunner()
ONE_VARIANT = "variants:\n  - kind: dynamic\n"


def _with_data(tmp_path, digits_model, evaluation: dict) -> str:
    path = tmp_path / "garbage.npz"
    np.savez(path, **evaluation)
    spec = spec_file(tmp_path, digits_model)
    text = spec.read_text().replace(str(digits_model.evaluation), str(path))
    spec.write_text(text[: text.index("variants:")] + ONE_VARIANT + text[text.index("selection:") :])
    return str(spec)


def _refused(spec: str, mlflow_store: str, *fragments: str) -> None:
    """Exit 2 with the problem named, no traceback, nothing registered, and no run left RUNNING: refused
    before any run exists (what validation sees in file headers), or with the run ended FAILED."""
    result = runner.invoke(app, ["run", spec])
    assert result.exit_code == 2, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("digits-e2e")
    if experiment is not None:
        parents, _ = runs_of(client, "digits-e2e")
        assert [parent.info.status for parent in parents] == ["FAILED"]
    assert client.search_registered_models() == []


@pytest.mark.parametrize(
    ("case", "fragments"),
    [
        ("nan", ["input 'pixels' contains NaN or Inf"]),
        ("complex", ["array 'pixels' holds complex64 values"]),
        ("strings", ["array 'pixels' holds <U"]),
        ("string_labels", ["labels are <U", "class indices"]),
        ("fraction_labels", ["top1 needs integer class indices"]),
        ("wrong_rank", ["array 'pixels' has shape (450, 8, 8)", "rank 2"]),
    ],
)
def test_garbage_data_ends_without_a_promotion_and_says_what_is_wrong(
    tmp_path, digits_model, mlflow_store, case, fragments
):
    real = np.load(digits_model.evaluation)
    pixels, labels = real["pixels"], real["labels"]
    evaluation = {
        "nan": {"pixels": np.full_like(pixels, np.nan), "labels": labels},
        "complex": {"pixels": pixels.astype(np.complex64), "labels": labels},
        "strings": {"pixels": pixels.astype(str), "labels": labels},
        "string_labels": {"pixels": pixels, "labels": labels.astype(str)},
        "fraction_labels": {"pixels": pixels, "labels": labels / 10.0},
        "wrong_rank": {"pixels": pixels[:450].reshape(450, 8, 8), "labels": labels[:450]},
    }[case]
    _refused(_with_data(tmp_path, digits_model, evaluation), mlflow_store, *fragments)


def test_a_model_that_computes_nan_is_bad_input(tmp_path, digits_model, mlflow_store):
    # given a model that takes the log of its (non-negative) input minus one: NaN for most pixels
    graph = helper.make_graph(
        [helper.make_node("Sub", ["pixels", "one"], ["shifted"]), helper.make_node("Log", ["shifted"], ["logits"])],
        "nan",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(np.ones(64, np.float32), "one")],
    )
    model = tmp_path / "nan.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    spec = spec_file(tmp_path, digits_model)
    spec.write_text(spec.read_text().replace(str(digits_model.model), str(model)))
    _refused(str(spec), mlflow_store, "output 'logits' contains NaN or Inf")


def _detector(path) -> None:
    """One MatMul computes a head whose first 64 columns are large box values and whose last 64 are
    tiny score logits, scaled back up after a Slice: one activation scale for the whole head rounds
    every score to the same few steps. Cosine on the boxes cannot see that; the scores' top-k can."""
    rng = np.random.default_rng(5)
    weight = np.concatenate([rng.normal(0, 30.0, (32, 64)), rng.normal(0, 0.003, (32, 64))], axis=1).astype(np.float32)
    constants = {
        "W": weight,
        "starts_boxes": np.array([0], np.int64),
        "ends_boxes": np.array([64], np.int64),
        "starts_scores": np.array([64], np.int64),
        "ends_scores": np.array([128], np.int64),
        "axes": np.array([1], np.int64),
        "gain": np.array(1000.0, np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["head"], name="head"),
        helper.make_node("Slice", ["head", "starts_boxes", "ends_boxes", "axes"], ["boxes"], name="boxes"),
        helper.make_node("Slice", ["head", "starts_scores", "ends_scores", "axes"], ["raw_scores"], name="raw_scores"),
        helper.make_node("Mul", ["raw_scores", "gain"], ["scores"], name="scores"),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 32])],
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 64]),
        ],
        [numpy_helper.from_array(value, name) for name, value in constants.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def _detector_spec(tmp_path, guards: str) -> str:
    _detector(tmp_path / "detector.onnx")
    rng = np.random.default_rng(6)
    np.savez(tmp_path / "frames.npz", x=rng.normal(size=(96, 32)).astype(np.float32))
    spec = tmp_path / "detector.yaml"
    spec.write_text(
        "name: detector\nmodel: {source: onnx, path: detector.onnx}\n"
        "calibration: {data: {path: frames.npz}, samples: 64}\n"
        f"evaluation: {{data: {{path: frames.npz}}, metrics: [cosine], guards: {guards}}}\n"
        "variants:\n  - {kind: static, per_channel: false}\n"
        "selection: {max_drop: 0.01, min_speedup: 0.0}\nprofiling: {warmup: 1, runs: 6}\n"
        "registry: {model_name: detector}\n"
    )
    return str(spec)


def test_a_detector_whose_scores_collapse_is_not_promoted_under_cosine(tmp_path, mlflow_store):
    # given a static variant whose box output keeps cosine ~1 while its score output loses its top-k
    result = runner.invoke(app, ["run", _detector_spec(tmp_path, "{enabled: true}")])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    _, children = runs_of(client, "detector")
    (variant,) = children
    # then cosine alone would have passed it, the guard on `scores` did not, and nothing was registered
    assert variant.data.metrics["cosine"] > 0.99
    assert variant.data.metrics["guard.scores.topk_agreement"] < 0.5
    assert variant.data.metrics["guard.boxes.topk_agreement"] > 0.9
    assert "guard: scores:" in variant.data.tags["int8flow.verdict"]
    assert client.search_registered_models() == []

    # and with the guards off, the spec says so and the same variant is promoted
    again = runner.invoke(app, ["run", _detector_spec(tmp_path, "{enabled: false}")])
    assert again.exit_code == 0, again.output
    assert str(client.get_model_version_by_alias("detector", "champion").version) == "1"


def test_the_selected_variant_is_measured_on_held_out_data_and_a_near_chance_fp32_is_flagged(
    tmp_path, digits_model, mlflow_store
):
    real = np.load(digits_model.evaluation)
    held_out = tmp_path / "held_out.npz"
    np.savez(held_out, pixels=real["pixels"][::2], labels=real["labels"][::2])
    shuffled = tmp_path / "shuffled.npz"
    np.savez(shuffled, pixels=real["pixels"], labels=np.random.default_rng(0).permutation(real["labels"]))
    spec = spec_file(tmp_path, digits_model)
    text = spec.read_text().replace(
        "metrics: [top1, cosine, mae]", f"metrics: [top1, cosine, mae]\n  test: {{path: {held_out}}}"
    )
    spec.write_text(text)
    # when the pipeline runs with a held-out split
    result = runner.invoke(app, ["run", str(spec)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    parents, children = runs_of(client, "digits-e2e")
    selected = next(run for run in children if run.data.tags["int8flow.selected"] == "true")
    # then the selected run carries its held-out accuracy beside the selection score
    assert 0.9 < selected.data.metrics["test.top1"] <= 1.0
    assert "held-out samples" in selected.data.tags["int8flow.held_out"]
    assert parents[0].data.metrics["test.fp32.top1"] > 0.9

    # when the labels do not belong to the samples, FP32 scores near chance and the run says so
    spec.write_text(text.replace(str(digits_model.evaluation), str(shuffled)))
    flagged = runner.invoke(app, ["run", str(spec)])
    assert flagged.exit_code == 0, flagged.output
    parents, _ = runs_of(client, "digits-e2e")
    newest = max(parents, key=lambda run: run.info.start_time)
    assert "near chance" in newest.data.tags["int8flow.run_warnings"]
