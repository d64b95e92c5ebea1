"""Automatic repairs on small real graphs: each one is shown to be needed, then shown to work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_dynamic, quantize_static

from int8flow.tasks.kinds import DynamicVariant, Fp16Variant, StaticVariant
from int8flow.tasks.repair import default_opset, repair_model, required_opset

RNG = np.random.default_rng(7)


def _conv_model(path: Path, opset: int) -> Path:
    weight = numpy_helper.from_array(RNG.normal(size=(8, 3, 3, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(RNG.normal(size=8).astype(np.float32), "bias")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "weight", "bias"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
        [weight, bias],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7), str(path))
    return path


class _Reader(CalibrationDataReader):
    def __init__(self):
        self._feeds = iter([{"x": RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)} for _ in range(4)])

    def get_next(self):
        return next(self._feeds, None)


def _load(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_per_channel_qdq_needs_opset_13_and_the_repair_upgrades_the_model(tmp_path):
    # given a Conv model exported at opset 11
    model = _conv_model(tmp_path / "opset11.onnx", opset=11)

    # then per-channel QDQ of the model as given writes a model ORT refuses (DequantizeLinear's axis)
    quantize_static(model, tmp_path / "broken.onnx", _Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    with pytest.raises(Exception, match="axis"):
        _load(tmp_path / "broken.onnx")

    # when repaired for a per-channel static variant
    needed = required_opset([StaticVariant(kind="static", per_channel=True)])
    repaired = repair_model(model, tmp_path / "repaired.onnx", needed)

    # then the copy is opset 13, says so, computes the same, and quantizes into a loadable model
    assert needed == 13 and default_opset(onnx.load(str(repaired.path))) == 13
    assert any("opset 11 -> 13" in note for note in repaired.repairs)
    x = RNG.normal(size=(1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(
        _load(repaired.path).run(None, {"x": x})[0], _load(model).run(None, {"x": x})[0], rtol=1e-5, atol=1e-5
    )
    quantize_static(repaired.path, tmp_path / "fixed.onnx", _Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    assert _load(tmp_path / "fixed.onnx").run(None, {"x": x})[0].shape == (1, 8, 8, 8)


def test_required_opset_follows_the_variants():
    assert required_opset([Fp16Variant(kind="fp16")]) == 0
    assert required_opset([DynamicVariant(kind="dynamic")]) == 11
    assert required_opset([StaticVariant(kind="static", per_channel=False), DynamicVariant(kind="dynamic")]) == 11
    assert required_opset([StaticVariant(kind="static", per_channel=True)]) == 13


def _constant_weight_model(path: Path) -> Path:
    """A Paddle-style MatMul whose weight comes from a Constant node instead of an initializer."""
    weight = numpy_helper.from_array(RNG.normal(size=(16, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w_value"], name="weight_constant", value=weight),
            helper.make_node("MatMul", ["x", "w_value"], ["y"], name="matmul"),
        ],
        "constant_weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _integer_ops(path: Path) -> list[str]:
    return [
        n.op_type for n in onnx.load(str(path)).graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
    ]


def test_constant_weights_become_initializers_so_dynamic_quantization_sees_them(tmp_path):
    # given a MatMul whose weight is a Constant node: quantize_dynamic leaves it in float
    model = _constant_weight_model(tmp_path / "model.onnx")
    quantize_dynamic(model, tmp_path / "as_given.onnx")
    assert _integer_ops(tmp_path / "as_given.onnx") == []

    # when repaired
    repaired = repair_model(model, tmp_path / "repaired.onnx", min_opset=11)

    # then the weight is an initializer, the repair is reported, the maths unchanged, and it quantizes
    graph = onnx.load(str(repaired.path)).graph
    assert [i.name for i in graph.initializer] == ["w_value"] and all(n.op_type != "Constant" for n in graph.node)
    assert repaired.repairs == ("1 Constant node(s) turned into initializers, so the quantizers see those weights",)
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    np.testing.assert_array_equal(_load(repaired.path).run(None, {"x": x})[0], _load(model).run(None, {"x": x})[0])
    quantize_dynamic(repaired.path, tmp_path / "quantized.onnx")
    assert _integer_ops(tmp_path / "quantized.onnx") == ["MatMulInteger"]


def test_a_model_that_needs_nothing_is_left_untouched(tmp_path):
    model = _conv_model(tmp_path / "opset17.onnx", opset=17)
    repaired = repair_model(model, tmp_path / "out" / "model.onnx", min_opset=13)
    assert repaired.path == model and repaired.repairs == ()
    assert not (tmp_path / "out").exists()


def test_external_data_is_kept_external_through_a_repair(tmp_path):
    # given a Constant-weight model saved with its tensors in a separate file
    proto = onnx.load(str(_constant_weight_model(tmp_path / "inline.onnx")))
    proto.graph.initializer.append(numpy_helper.from_array(RNG.normal(size=(64, 64)).astype(np.float32), "unused_big"))
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    onnx.save(proto, str(external), save_as_external_data=True, location="model.onnx.data", size_threshold=0)

    # when repaired
    repaired = repair_model(external, tmp_path / "repaired" / "model.onnx", min_opset=11)

    # then the repaired copy keeps external data next to it, says so, and still runs
    assert (tmp_path / "repaired" / "model.onnx.data").exists()
    assert any(note.startswith("external data") for note in repaired.repairs)
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    np.testing.assert_array_equal(_load(repaired.path).run(None, {"x": x})[0], _load(external).run(None, {"x": x})[0])
