"""Op coverage on tiny real graphs: quantized with onnxruntime.quantization, optimized and run by ORT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from int8flow.tasks.coverage import CLASSES, op_coverage, slow_int8_warnings

SHAPE = (1, 8, 16, 16)


class _RandomInputs(CalibrationDataReader):
    def __init__(self, count: int = 4) -> None:
        rng = np.random.default_rng(1)
        self._batches = iter([{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(count)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _save(path: Path, nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        [numpy_helper.from_array(array, name) for name, array in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Conv+Relu+Conv in FP32, dynamic int8 and static QDQ int8, plus a QDQ ConvTranspose ORT cannot fuse."""
    folder = tmp_path_factory.mktemp("coverage")
    rng = np.random.default_rng(0)
    fp32 = _save(
        folder / "fp32.onnx",
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"]),
            helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        {
            "w1": (0.2 * rng.standard_normal((8, 8, 3, 3))).astype(np.float32),
            "b1": (0.1 * rng.standard_normal(8)).astype(np.float32),
            "w2": (0.2 * rng.standard_normal((8, 8, 3, 3))).astype(np.float32),
        },
    )
    quantize_dynamic(fp32, folder / "dynamic.onnx", weight_type=QuantType.QUInt8)
    quantize_static(fp32, folder / "static.onnx", _RandomInputs(), quant_format=QuantFormat.QDQ)
    transpose = _save(
        folder / "transpose.onnx",
        [
            helper.make_node("ConvTranspose", ["x", "wt"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        {"wt": (0.2 * rng.standard_normal((8, 8, 3, 3))).astype(np.float32)},
    )
    quantize_static(
        transpose,
        folder / "transpose_qdq.onnx",
        _RandomInputs(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["ConvTranspose", "Relu"],
    )
    return {name: folder / f"{name}.onnx" for name in ("fp32", "dynamic", "static", "transpose_qdq")}


@pytest.fixture(scope="module")
def feed() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)}


def test_dynamic_conv_runs_as_conv_integer_and_is_flagged(models, feed):
    coverage = op_coverage(models["dynamic"], feed, runs=3)

    assert coverage.counts["integer"] == {"ConvInteger": 2}
    assert coverage.counts["qdq"] == {"DynamicQuantizeLinear": 2}
    assert coverage.total("float_compute") == 0
    assert any("ConvInteger" in warning for warning in slow_int8_warnings(coverage))


def test_static_qdq_conv_is_fused_to_qlinearconv(models, feed):
    coverage = op_coverage(models["static"], feed, runs=3)

    # ORT fuses DQ->Conv(->Relu)->Q into QLinearConv (NHWC, between Transposes); only the model's
    # input Q and output DQ are left.
    assert coverage.counts["integer"] == {"QLinearConv": 2}
    assert coverage.counts["qdq"] == {"DequantizeLinear": 1, "QuantizeLinear": 1}
    assert coverage.total("float_compute") == 0
    assert coverage.float_between_qdq == {}
    assert coverage.time_share["integer"] > 0
    assert not any("ConvInteger" in warning for warning in slow_int8_warnings(coverage))


def test_fp32_model_has_no_integer_ops(models, feed):
    coverage = op_coverage(models["fp32"], feed, runs=3)

    assert coverage.total("integer") == 0
    assert coverage.total("qdq") == 0
    # NCHWc layout: ORT runs Conv in domain com.microsoft.nchwc (still op type "Conv"), with reorders
    # around it (with AVX-512 the first Conv reads the plain NCHW input directly: no ReorderInput).
    assert coverage.counts["float_compute"] == {"Conv": 2}
    assert "ReorderOutput" in coverage.counts["other"]
    assert set(coverage.counts["other"]) <= {"ReorderInput", "ReorderOutput"}
    assert coverage.time_share["integer"] == 0.0
    assert any("nothing runs in integer" in warning for warning in slow_int8_warnings(coverage))


def test_unfused_qdq_group_is_reported_as_float_between_qdq(models, feed):
    coverage = op_coverage(models["transpose_qdq"], feed, runs=3)

    # ORT's CPU provider has no integer ConvTranspose, so the QDQ group stays DQ -> ConvTranspose -> Q.
    assert coverage.float_between_qdq == {"ConvTranspose": 1}
    warnings = slow_int8_warnings(coverage)
    assert any("ConvTranspose" in warning and "could not fuse" in warning for warning in warnings)
    assert any("nothing runs in integer" in warning for warning in warnings)


@pytest.mark.parametrize("name", ["fp32", "dynamic", "static"])
def test_time_shares_are_fractions_summing_to_one(models, feed, name):
    coverage = op_coverage(models[name], feed, runs=3)

    assert set(coverage.time_share) == set(CLASSES)
    assert all(0.0 <= share <= 1.0 for share in coverage.time_share.values())
    assert sum(coverage.time_share.values()) == pytest.approx(1.0)
    assert sum(coverage.op_time_share.values()) == pytest.approx(1.0)
    assert coverage.node_ms_per_run > 0
    # every op that took time is an op of the optimized graph
    graph_ops = {op for by_type in coverage.counts.values() for op in by_type}
    assert set(coverage.op_time_share) <= graph_ops


def test_metrics_and_summary_agree_with_counts(models, feed):
    coverage = op_coverage(models["static"], feed, runs=2)

    metrics = coverage.as_metrics()
    assert metrics["ops.integer.QLinearConv"] == 2.0
    assert metrics["ops.count.integer"] == 2.0
    assert metrics["ops.time_share.integer"] == coverage.time_share["integer"]
    assert all(isinstance(value, float) for value in metrics.values())
    assert coverage.summary().startswith("integer 2 ops (")
    assert "Q/DQ 2 (" in coverage.summary()
