"""Quantization-aware training: fake-quant export round trip, a short training run, the pipeline."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from int8flow.flows.cli import app
from int8flow.tasks.data import Batch
from int8flow.tasks.hardware import HARDWARE_PRESETS, detect, preset_for
from int8flow.tasks.kinds import QatVariant
from int8flow.tasks.sources import PyTorchModelSource

torch = pytest.importorskip("torch", reason="QAT trains in PyTorch ([torch] extra)")
from int8flow.tasks import qat

TESTS = Path(__file__).parent
THIS_CPU = HARDWARE_PRESETS[preset_for(detect())]
PIPELINES = TESTS.parent / "pipelines"
runner = CliRunner()


def source(
    factory: str, name: str, shape: list, base_dir: Path = TESTS, checkpoint: str | None = None
) -> PyTorchModelSource:
    data = {"source": "pytorch", "factory": factory, "inputs": [{"name": name, "shape": shape}], "outputs": ["out"]}
    if checkpoint:
        data["checkpoint"] = checkpoint
    return PyTorchModelSource.model_validate(data, context={"base_dir": base_dir})


def batches(name: str, shape: tuple, count: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    return [Batch({name: rng.normal(size=shape).astype(np.float32)}) for _ in range(count)]


def optimized_ops(path: Path, tmp_path: Path) -> Counter:
    """Op types of the graph ORT really runs."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize(
    ("factory", "shape", "per_channel", "integer_ops"),
    [
        ("qat_models:tiny_cnn", (8, 1, 8, 8), True, {"QLinearConv": 1, "QGemm": 2}),
        ("qat_models:tiny_cnn", (8, 1, 8, 8), False, {"QLinearConv": 1, "QGemm": 2}),
        ("qat_models:tiny_token_mlp", (8, 5, 16), True, {"QLinearMatMul": 2}),
    ],
)
def test_exported_qdq_model_matches_the_fake_quantized_torch_model(tmp_path, factory, shape, per_channel, integer_ops):
    # given: a tiny model with its layers fake-quantized and ranges set on calibration data
    name = "images" if "cnn" in factory else "tokens"
    model_source = source(factory, name, ["batch", *shape[1:]])
    module = qat.load_source_module(model_source)
    # the quantization this CPU runs: 7-bit weights where ORT's u8s8 kernels saturate (AVX2 without VNNI)
    variant = QatVariant(kind="qat", name="q", per_channel=per_channel, activation_type="QUInt8").with_preset(THIS_CPU)
    layers = qat.prepare(module, variant)
    calibration = batches(name, shape, 4)
    qat.calibrate(module, [b.inputs for b in calibration], [name])
    # when: exported to QDQ ONNX
    out = tmp_path / "model.onnx"
    notes = qat.export_qdq(model_source, module, calibration, out)
    # then: ORT's outputs match the frozen torch model's, and the weights are stored as integers
    frozen = copy.deepcopy(module)
    qat.freeze(frozen)
    unquantized = qat.load_source_module(model_source)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in batches(name, shape, 3, seed=1):
        with torch.no_grad():
            expected = frozen(torch.from_numpy(batch.inputs[name])).numpy()
            float_output = unquantized(torch.from_numpy(batch.inputs[name])).numpy()
        got = session.run(None, batch.inputs)[0]
        scale = np.abs(expected).max()
        # a rounding tie broken the other way moves a value by a quantization step (~0.4 % here), no more
        assert np.abs(got - expected).max() <= 0.01 * scale, "QDQ export drifted from the fake-quantized model"
        # most outputs match exactly; a rounding tie broken the other way moves a whole sample by one step
        assert np.mean(np.abs(got - expected) > 1e-5 * scale) <= 0.2, "most outputs match exactly"
        assert np.abs(got - float_output).max() > 1e-3 * scale, "the export must still be quantized"
    graph = onnx.load(str(out)).graph
    int8_weights = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) == len(layers)
    assert not [
        n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in {i.name for i in graph.initializer}
    ]
    assert f"{len(layers)} fake-quantized weights stored as int8 initializers" in notes
    ops = optimized_ops(out, tmp_path)
    for op, count in integer_ops.items():
        assert ops[op] == count, f"ORT runs {dict(ops)}"


def test_fake_quantization_rounds_forward_and_passes_gradients_straight_through():
    module = qat.load_source_module(source("qat_models:tiny_token_mlp", "tokens", ["batch", 5, 16]))
    variant = QatVariant(kind="qat", name="q", activation_type="QUInt8", reduce_range=True)
    qat.prepare(module, variant)
    qat.calibrate(module, [b.inputs for b in batches("tokens", (8, 5, 16), 2)], ["tokens"])
    layer = module.up
    weight = layer.quantized_weight().detach()
    steps = weight / layer.weight_scale().unsqueeze(1)
    assert np.allclose(steps.numpy(), np.round(steps.numpy()), atol=1e-3), "weights land on the integer grid"
    assert steps.abs().max() <= 63.0 + 1e-3, "reduce_range keeps weights in 7 bits"
    output = module(torch.from_numpy(batches("tokens", (8, 5, 16), 1)[0].inputs["tokens"]))
    output.sum().backward()
    assert layer.layer.weight.grad is not None and layer.layer.weight.grad.abs().sum() > 0
    assert layer.input_quantizer.scale_factor.grad is not None, "activation scales are learned (LSQ)"


def mnist_source() -> PyTorchModelSource:
    return source("mnist.model:build_model", "images", ["batch", 1, 28, 28], PIPELINES, "mnist/checkpoint.pt")


def mnist_batches(file: str, batch_size: int) -> list[Batch]:
    data = np.load(PIPELINES / "mnist" / file)
    images = data["images"].astype(np.float32)
    labels = data.get("labels", None)
    return [
        Batch({"images": images[i : i + batch_size]}, None if labels is None else labels[i : i + batch_size])
        for i in range(0, len(images), batch_size)
    ]


def test_short_qat_run_is_deterministic_and_lowers_the_distillation_loss(tmp_path):
    variant = QatVariant(
        kind="qat",
        name="q",
        per_channel=False,
        activation_type="QUInt8",
        reduce_range=False,
        compare_untrained=False,
        training={"steps": 24, "learning_rate": 1e-4, "seed": 3},
    )
    calibration = mnist_batches("calibration.npz", 50)
    runs = [
        qat.quantization_aware_training(
            mnist_source(), variant, calibration, calibration, calibration, tmp_path / f"run{i}" / "model.onnx"
        )
        for i in range(2)
    ]
    losses = [[step.loss for step in run.steps] for run in runs]
    assert len(losses[0]) == 24 and runs[0].stopped == "24 steps done"
    assert losses[0] == losses[1], "same seed, same training"
    assert np.mean(losses[0][-6:]) < np.mean(losses[0][:6]), "training lowers the distillation loss"
    assert runs[0].checkpoint.read_bytes() == runs[1].checkpoint.read_bytes()
    ops = optimized_ops(runs[0].path, tmp_path)
    assert ops["QLinearConv"] == 3 and ops["QGemm"] == 2


def test_training_stops_at_its_time_budget(tmp_path):
    variant = QatVariant(
        kind="qat",
        name="q",
        activation_type="QUInt8",
        reduce_range=False,
        compare_untrained=False,
        training={"steps": 10_000, "max_seconds": 0.5},
    )
    calibration = mnist_batches("calibration.npz", 50)
    result = qat.quantization_aware_training(
        mnist_source(), variant, calibration, calibration, calibration, tmp_path / "model.onnx"
    )
    assert result.stopped.startswith("time budget")
    assert 1 <= len(result.steps) < 10_000 and result.planned_steps == 10_000
    assert result.path.exists()


def test_task_loss_needs_labels(tmp_path):
    variant = QatVariant(
        kind="qat", name="q", activation_type="QUInt8", reduce_range=False, training={"steps": 2, "loss": "task"}
    )
    unlabelled = mnist_batches("calibration.npz", 50)
    with pytest.raises(qat.QatError, match="needs labels"):
        qat.quantization_aware_training(
            mnist_source(), variant, unlabelled, unlabelled, unlabelled, tmp_path / "model.onnx"
        )


@pytest.mark.e2e
def test_pipeline_trains_logs_and_judges_a_qat_variant_beside_its_untrained_twin(mlflow_store, tmp_path):
    spec = yaml.safe_load((PIPELINES / "mnist-cnn-qat.yaml").read_text())
    spec["name"] = "mnist-qat-test"
    spec["registry"]["model_name"] = "mnist-qat-test"
    spec["variants"] = [v for v in spec["variants"] if v["kind"] == "qat"]
    spec["variants"][0]["training"]["steps"] = 20
    # every quantized variant misses a zero cosine drop: rejected, yet timed because of `all_variants`
    spec["profiling"] = {"batch_sizes": [1], "threads": [1], "warmup": 2, "runs": 5, "all_variants": True}
    spec["selection"] = {"metric": "cosine", "max_drop": 0.0}
    path = PIPELINES / "_test-mnist-qat.yaml"  # beside the spec: its relative paths resolve the same
    path.write_text(yaml.safe_dump(spec))
    try:
        result = runner.invoke(app, ["run", str(path)])
    finally:
        path.unlink()
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("mnist-qat-test").experiment_id
    runs = {run.info.run_name: run for run in client.search_runs([experiment], "tags.`int8flow.kind` = 'qat'")}
    trained_name = next(name for name in runs if not name.endswith("-untrained"))
    trained, untrained = runs[trained_name], runs[f"{trained_name}-untrained"]
    history = client.get_metric_history(trained.info.run_id, "qat.loss")
    assert [m.step for m in history] == list(range(20))
    assert trained.data.metrics["qat.steps"] == 20
    assert untrained.data.params["training.steps"] == "0"
    assert [a.path for a in client.list_artifacts(trained.info.run_id, "qat") if a.path.endswith(".pt")]
    for run in (trained, untrained):
        assert run.data.metrics["ops.integer.QLinearConv"] == 3 and run.data.metrics["ops.integer.QGemm"] == 2
        assert abs(run.data.metrics["top1_drop"]) <= 0.003
        assert "b1_t1_speedup" in run.data.metrics
        assert "max_drop" in run.data.tags["int8flow.verdict"]


def test_token_splice_builds_well_formed_sequences_from_two_texts():
    rng = np.random.default_rng(0)
    ids = np.zeros((8, 12), np.int64)
    mask = np.zeros((8, 12), np.int64)
    for row in range(8):
        length = 4 + row % 5
        ids[row, :length] = [101, *range(1000 * (row + 1), 1000 * (row + 1) + length - 2), 102]
        mask[row, :length] = 1
    spliced = qat._token_splice(
        {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, 0.5, rng
    )
    new_ids, new_mask = spliced["input_ids"], spliced["attention_mask"]
    changed = [row for row in range(8) if not np.array_equal(new_ids[row], ids[row])]
    assert 1 <= len(changed) <= 4
    for row in range(8):
        length = int(new_mask[row].sum())
        assert new_mask[row, :length].all() and not new_mask[row, length:].any(), "mask stays a prefix"
        assert new_ids[row, 0] == 101 and new_ids[row, length - 1] == 102, "[CLS] ... [SEP] kept"
        assert not new_ids[row, length:].any()
    assert ids[0, 0] == 101 and mask.sum() == sum(4 + r % 5 for r in range(8)), "the input batch is not modified"


def test_trim_padding_drops_only_columns_that_are_padding_everywhere():
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    trimmed = qat._trim_padding({"input_ids": mask * 7, "attention_mask": mask, "state": np.ones((1, 3))})
    assert trimmed["input_ids"].shape == (2, 3) and trimmed["attention_mask"].shape == (2, 3)
    assert trimmed["state"].shape == (1, 3)


def test_qat_variant_takes_the_target_preset_and_names_its_untrained_twin():
    from int8flow.flows.spec import PipelineSpec

    spec = PipelineSpec.model_validate(
        {
            "name": "t",
            "model": mnist_source().model_dump(),
            "calibration": {"data": {"path": str(PIPELINES / "mnist" / "calibration.npz")}},
            "evaluation": {"data": {"path": str(PIPELINES / "mnist" / "evaluation.npz")}},
            "variants": [{"kind": "qat", "per_channel": False}],
            "target": {"preset": "avx2"},
        },
        context={"base_dir": PIPELINES},
    )
    (variant,) = spec.resolved_variants()
    assert (variant.name, variant.activation_type, variant.weight_type, variant.reduce_range) == (
        "qat-pt",
        "QUInt8",
        "QInt8",
        True,
    )
    with pytest.raises(ValueError, match="qat-pt-untrained"):
        PipelineSpec.model_validate(
            spec.model_dump(mode="json")
            | {
                "variants": [
                    {"kind": "qat", "per_channel": False},
                    {"kind": "fp32", "name": "qat-pt-untrained"},
                ]
            },
            context={"base_dir": PIPELINES},
        )
