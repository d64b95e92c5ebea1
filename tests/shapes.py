"""Two small real models whose data does not fit "one array per input, samples on axis 0", with their data:

- a sequence model over samples of different lengths (`x` [N, T, 8] -> `y` [N, T, 16], T varies per
  sample), with a per-sample label of varying length; its data is a folder with one `.npz` per sample;
- a stateful model (`frames` [N, 8], `state` [2, N, 4] with its samples on axis 1, `sr` a scalar) whose
  outputs are a score and the next state, as silero-vad's stateful graph has them.
Weights are seeded random numbers: what matters is the shapes, and that quantization changes the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class ShapesFixture:
    sequence_model: Path
    sequence_data: Path  # folder, one .npz per sample
    state_model: Path
    state_data: Path  # .npz: frames [N, 8], state [2, N, 4], labels [N]


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _sequence_model(path: Path, rng: np.random.Generator) -> Path:
    w1 = rng.normal(0, 0.4, (8, 32)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="head"),
        ],
        "sequence",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", 16])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    return _save(graph, path)


def _state_model(path: Path, rng: np.random.Generator) -> Path:
    w = rng.normal(0, 0.5, (8, 4)).astype(np.float32)
    v = rng.normal(0, 0.5, (4, 2)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["frames", "W"], ["h"], name="encode"),
            helper.make_node("ReduceMean", ["state", "axes0"], ["memory"], name="memory", keepdims=0),
            helper.make_node("Add", ["h", "memory"], ["mixed"], name="mix"),
            helper.make_node("Cast", ["sr"], ["sr_float"], to=TensorProto.FLOAT, name="sr_float"),
            helper.make_node("Div", ["sr_float", "khz16"], ["rate"], name="rate"),
            helper.make_node("Mul", ["mixed", "rate"], ["scaled"], name="scale"),
            helper.make_node("Tanh", ["scaled"], ["z"], name="tanh"),
            helper.make_node("MatMul", ["z", "V"], ["score"], name="score"),
            helper.make_node("Unsqueeze", ["z", "axes0"], ["z1"], name="z1"),
            helper.make_node("Add", ["state", "z1"], ["stateN"], name="next_state"),
        ],
        "stateful",
        [
            helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["batch", 8]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", 4]),
        ],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(v, "V"),
            numpy_helper.from_array(np.array([0], np.int64), "axes0"),
            numpy_helper.from_array(np.array(16000.0, np.float32), "khz16"),
        ],
    )
    return _save(graph, path)


def build(directory: Path) -> ShapesFixture:
    rng = np.random.default_rng(7)
    directory.mkdir(parents=True, exist_ok=True)
    sequence = _sequence_model(directory / "sequence.onnx", rng)
    folder = directory / "sequence-data"
    folder.mkdir()
    for index in range(24):
        steps = 3 + (index * 5) % 17  # 3..19 time steps: no two neighbours share a length
        x = rng.normal(0, 1, (1, steps, 8)).astype(np.float32)
        label = rng.integers(0, 16, (1, 1 + index % 4)).astype(np.int64)  # labels of varying length too
        np.savez(folder / f"sample-{index:03d}.npz", x=x, labels=label)
    state = _state_model(directory / "stateful.onnx", rng)
    frames = rng.normal(0, 1, (40, 8)).astype(np.float32)
    state_in = rng.normal(0, 0.5, (2, 40, 4)).astype(np.float32)
    labels = (frames[:, 0] > 0).astype(np.int64)
    np.savez(directory / "stateful.npz", frames=frames, state=state_in, labels=labels)
    return ShapesFixture(sequence, folder, state, directory / "stateful.npz")
