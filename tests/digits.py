"""A small real model on real data for the tests: a two-layer network fitted to scikit-learn's
handwritten digits, written as an ONNX graph (MatMul/Add/Relu/Softmax) from its weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class DigitsFixture:
    model: Path
    calibration: Path
    evaluation: Path
    fp32_top1: float


def build(directory: Path, hidden: int = 256, opset: int = 17) -> DigitsFixture:
    """Random ReLU features + a ridge-regression read-out: trains in well under a second, ~0.97 top-1."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    features = (digits.data / 16.0).astype(np.float32)
    train_x, test_x, train_y, test_y = train_test_split(
        features, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 1 / np.sqrt(features.shape[1]), (features.shape[1], hidden)).astype(np.float32)
    b1 = rng.normal(0, 0.5, hidden).astype(np.float32)
    activations = np.maximum(train_x @ w1 + b1, 0)
    targets = np.eye(10)[train_y]
    w2 = np.linalg.solve(activations.T @ activations + 0.1 * np.eye(hidden), activations.T @ targets).astype(np.float32)
    b2 = np.zeros(10, dtype=np.float32)
    layers = [(w1, b1), (w2, b2)]
    predicted = np.argmax(np.maximum(test_x @ w1 + b1, 0) @ w2 + b2, axis=1)

    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / "digits_mlp.onnx"
    onnx.save(_graph(layers, opset), str(model_path))
    calibration = directory / "calibration.npz"
    np.savez(calibration, pixels=train_x[:128])
    evaluation = directory / "evaluation.npz"
    np.savez(evaluation, pixels=test_x, labels=test_y.astype(np.int64))
    return DigitsFixture(model_path, calibration, evaluation, float(np.mean(predicted == test_y)))


def _graph(layers, opset: int) -> onnx.ModelProto:
    nodes, initializers, current = [], [], "pixels"
    for index, (weight, bias) in enumerate(layers):
        w_name, b_name = f"W{index}", f"B{index}"
        initializers += [
            numpy_helper.from_array(weight.astype(np.float32), w_name),
            numpy_helper.from_array(bias.astype(np.float32), b_name),
        ]
        nodes += [
            helper.make_node("MatMul", [current, w_name], [f"mm{index}"], name=f"dense{index}/MatMul"),
            helper.make_node("Add", [f"mm{index}", b_name], [f"add{index}"], name=f"dense{index}/Add"),
        ]
        current = f"add{index}"
        if index < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"relu{index}"], name=f"dense{index}/Relu"))
            current = f"relu{index}"
    nodes.append(helper.make_node("Softmax", [current], ["probabilities"], axis=-1, name="softmax"))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="int8flow-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model
