"""Which 8-bit weights saturate ORT's u8s8 kernels, asked of the CPU the test runs on.

`tasks.hardware.saturating_weights` decides where the avx2 preset's `reduce_range: where_needed` puts
7-bit weights. Its rule (neighbouring pairs along the reduction axis, same sign, |sum| > 128) is checked
here against ORT's own kernels: on an AVX2 CPU without VNNI exactly the predicted weights saturate, on a
VNNI (or ARM) CPU none does. tests/test_cpu_kinds.py runs this module again on an emulated AVX2 CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic

from int8flow.tasks.hardware import detect, pairs_saturate, preset_for, saturating_weights
from int8flow.tasks.kinds._ort import weight_ranges

PAIRS_SATURATE_HERE = preset_for(detect()) == "avx2"
ALL_255 = 255  # the worst case: every activation at the top of its u8 range


def _session(nodes, inputs, initializers, output_type=TensorProto.INT32) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", output_type, None)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _zero(name: str, dtype: int) -> onnx.TensorProto:
    return helper.make_tensor(name, dtype, [], [0])


def _matmul_integer(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    session = _session(
        [helper.make_node("MatMulInteger", ["a", "w", "az", "wz"], ["y"])],
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [None, weights.shape[0]])],
        [numpy_helper.from_array(weights, "w"), _zero("az", TensorProto.UINT8), _zero("wz", TensorProto.INT8)],
    )
    return session.run(None, {"a": activations})[0]


def _conv_integer(weights: np.ndarray, image: np.ndarray) -> np.ndarray:
    session = _session(
        [helper.make_node("ConvInteger", ["x", "w", "xz", "wz"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(image.shape))],
        [numpy_helper.from_array(weights, "w"), _zero("xz", TensorProto.UINT8), _zero("wz", TensorProto.INT8)],
    )
    return session.run(None, {"x": image})[0]


def _qlinear_conv(weights: np.ndarray, image: np.ndarray) -> np.ndarray:
    """QLinearConv with unit scales and an output scale of 512 (so the exact sums fit in u8)."""
    scale = lambda name, value: helper.make_tensor(name, TensorProto.FLOAT, [], [value])  # noqa: E731
    session = _session(
        [
            helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["q"], pads=[1, 1, 1, 1]),
            helper.make_node("DequantizeLinear", ["q", "ys", "yz"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(image.shape))],
        [
            scale("xs", 1.0),
            _zero("xz", TensorProto.UINT8),
            numpy_helper.from_array(weights, "w"),
            scale("ws", 1.0),
            _zero("wz", TensorProto.INT8),
            scale("ys", 512.0),
            _zero("yz", TensorProto.UINT8),
        ],
        TensorProto.FLOAT,
    )
    return session.run(None, {"x": image})[0]


def _saturated(got: np.ndarray, exact: np.ndarray, tolerance: float = 0.0) -> bool:
    return bool(np.any(np.abs(got.astype(np.float64) - exact) > tolerance))


@pytest.mark.parametrize(
    ("pair", "k"),
    [((127, 127), 0), ((64, 65), 0), ((64, 64), 0), ((127, -127), 0), ((127, 2), 0), ((127, 127), 1)],
)
def test_matmul_pairs_saturate_exactly_where_the_rule_says_on_this_cpu(pair, k):
    weights = np.zeros((64, 8), np.int8)
    weights[k, :], weights[k + 1, :] = pair
    activations = np.full((4, 64), ALL_255, np.uint8)
    exact = activations.astype(np.int64) @ weights.astype(np.int64)
    predicted = pairs_saturate(weights.astype(np.int32), 0)
    assert predicted == (k % 2 == 0 and pair[0] * pair[1] > 0 and abs(sum(pair)) > 128)
    assert _saturated(_matmul_integer(weights, activations), exact) == (predicted and PAIRS_SATURATE_HERE)


def test_random_weights_the_rule_calls_safe_never_saturate_and_the_others_do_here():
    rng = np.random.default_rng(0)
    activations = rng.integers(200, 256, (16, 64)).astype(np.uint8)
    outcomes = {True: 0, False: 0}
    safe = 0
    for index in range(40):
        weights = rng.integers(-127, 128, (64, 4)).astype(np.int8)
        if index % 2:  # every weight within 7 bits: no pair can pass 128 (but the peak's, made safe below)
            weights //= 2
        weights[rng.random((64, 4)) < 0.5] //= 3
        weights[62, 0], weights[63, 0] = -5, 127  # the peak, so ORT's symmetric int8 values are these weights
        predicted = bool(saturating_weights(_matmul_graph(weights), "dynamic", per_channel=False))
        got = _matmul_integer(weights, activations)
        exact = activations.astype(np.int64) @ weights.astype(np.int64)
        if not predicted:
            safe += 1
            assert not _saturated(got, exact), "a weight the rule calls safe saturated"
        elif PAIRS_SATURATE_HERE:
            outcomes[_saturated(got, exact)] += 1
    assert 10 <= safe <= 30, safe  # both kinds of weights were tried
    if PAIRS_SATURATE_HERE:  # with activations near 255, a predicted pair mostly saturates
        assert outcomes[True] > outcomes[False]


def _matmul_graph(weights: np.ndarray) -> onnx.GraphProto:
    """A float MatMul whose symmetric int8 weights are exactly `weights` (their peak is 127)."""
    assert np.abs(weights.astype(np.int32)).max() == 127
    float_weights = weights.astype(np.float32)
    return helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(float_weights, "w")],
    )


def test_conv_pairs_are_input_channels_for_qlinearconv_and_none_for_convinteger():
    image = np.full((1, 8, 6, 6), ALL_255, np.uint8)
    channel_pair = np.zeros((4, 8, 3, 3), np.int8)
    channel_pair[:, 0, 1, 1] = channel_pair[:, 1, 1, 1] = 127
    spatial_pair = np.zeros((4, 8, 3, 3), np.int8)
    spatial_pair[:, 0, 1, 0] = spatial_pair[:, 0, 1, 1] = 127
    exact = float(ALL_255 * 254)
    # QLinearConv (static): neighbouring input channels at one kernel position are a pair
    assert _saturated(_qlinear_conv(channel_pair, image)[0, 0, 3, 3], exact, 256) == PAIRS_SATURATE_HERE
    assert not _saturated(_qlinear_conv(spatial_pair, image)[0, 0, 3, 3], exact, 256)
    # ConvInteger (dynamic): never, on any CPU
    assert _conv_integer(channel_pair, image)[0, 0, 3, 3] == ALL_255 * 254
    conv = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(channel_pair.astype(np.float32), "w")],
    )
    assert saturating_weights(conv, "static", per_channel=True) == {"w": "conv"}
    assert saturating_weights(conv, "dynamic", per_channel=True) == {}


def test_where_needed_gives_7_bit_weights_only_to_the_weights_that_saturate(tmp_path: Path):
    rng = np.random.default_rng(1)
    safe = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)
    safe[0::2], safe[1::2] = np.abs(safe[0::2]), -np.abs(safe[1::2])  # neighbours of opposite sign
    risky = (rng.standard_normal((32, 16)) * 0.1).astype(np.float32)
    risky[0, :] = risky[1, :] = 1.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "safe"], ["h"], name="a"),
            helper.make_node("MatMul", ["h", "risky"], ["y"], name="b"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(safe, "safe"), numpy_helper.from_array(risky, "risky")],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    for per_channel in (False, True):
        reduce_range, options, notes = weight_ranges(model, "where_needed", "dynamic", per_channel, {})
        assert reduce_range is False and list(options["TensorQuantOverrides"]) == ["risky"]
        assert "7-bit weights for 1 weight(s)" in notes[0]
        out = tmp_path / f"q{per_channel}.onnx"
        quantize_dynamic(
            model,
            out,
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            extra_options=options,
        )
        peaks = {
            tensor.name: int(np.abs(numpy_helper.to_array(tensor).astype(np.int32)).max())
            for tensor in onnx.load(str(out)).graph.initializer
            if tensor.data_type == TensorProto.INT8 and len(tensor.dims) == 2
        }
        assert peaks == {"safe_quantized": 127, "risky_quantized": 64}
    # where nothing can saturate (s8 activations, u8 weights) nothing is reduced
    assert weight_ranges(model, "where_needed", "static", False, {}, (), "QInt8", "QInt8")[1] == {}
    assert weight_ranges(model, True, "dynamic", False, {})[0] is True


def test_where_needed_keeps_ort_s_own_per_channel_lstm_weights_at_7_bits(tmp_path: Path):
    """ORT's dynamic LSTM quantizes W and R per channel whatever `per_channel` says; the 7-bit override
    must name that axis (a per-tensor one made ORT refuse the model on silero-vad)."""
    rng = np.random.default_rng(2)
    hidden, features = 8, 16
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)
    graph = helper.make_graph(
        [lstm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R"),
        ],
    )
    model = tmp_path / "lstm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), model)
    for per_channel in (False, True):
        reduce_range, options, _ = weight_ranges(model, "where_needed", "dynamic", per_channel, {})
        assert options["TensorQuantOverrides"] == {
            "W": [{"reduce_range": True, "axis": 0}],
            "R": [{"reduce_range": True, "axis": 0}],
        }
        out = tmp_path / f"q{per_channel}.onnx"
        quantize_dynamic(model, out, per_channel=per_channel, reduce_range=reduce_range, extra_options=options)
        quantized = onnx.load(str(out))
        assert any(node.op_type == "DynamicQuantizeLSTM" for node in quantized.graph.node)
        peaks = [
            int(np.abs(numpy_helper.to_array(tensor).astype(np.int32)).max())
            for tensor in quantized.graph.initializer
            if tensor.data_type == TensorProto.INT8 and len(tensor.dims) == 3
        ]
        assert peaks and max(peaks) <= 64
