"""Facts about an ONNX model file: content hash, size, opset, inputs and outputs."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from int8flow.tasks.errors import InputError


class Graph(StrEnum):
    """Which FP32 graph a variant starts from."""

    GIVEN = "given"  # the model as given (after repairs)
    PREPROCESSED = "preprocessed"  # after ORT's quant_pre_process
    FUSED = "fused"  # after ORT's transformer optimizer (it is the fused graph's pre-processing)


class ModelError(InputError):
    """The model file cannot be used: missing, a folder, empty, or not an ONNX protobuf."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str | None, ...]  # ints, symbolic names, or None when unknown


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    sha256: str
    size_bytes: int
    opset: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @property
    def input_dtypes(self) -> dict[str, np.dtype]:
        return {tensor.name: np.dtype(tensor.dtype) for tensor in self.inputs}

    @property
    def input_shapes(self) -> dict[str, tuple[int | str | None, ...]]:
        return {tensor.name: tensor.shape for tensor in self.inputs}


def load_graph(path: Path) -> onnx.ModelProto:
    """The model without its external weights, or ModelError saying why this file is not an ONNX model."""
    if path.is_dir():
        raise ModelError(f"{path} is a folder, not an .onnx file")
    try:
        size = path.stat().st_size
    except OSError as error:
        raise ModelError(f"{path}: {error.strerror or error}") from error
    if size == 0:
        raise ModelError(f"{path} is empty, not an ONNX model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ModelError(f"{path} is not an ONNX model (protobuf cannot parse it: {type(error).__name__})") from error
    if not model.graph.node and not model.graph.output:
        raise ModelError(f"{path} parses, but holds no graph: not an ONNX model")
    return model


def model_files(path: Path) -> list[Path]:
    """The .onnx file and the external-data files it references (sizes and hashes cover both)."""
    model = load_graph(path)
    locations = set()
    for tensor in _all_initializers(model.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    files = [path, *(path.parent / location for location in sorted(locations))]
    missing = [file.name for file in files[1:] if not file.is_file()]
    if missing:
        raise ModelError(f"{path}: its external data {', '.join(missing)} is not beside it")
    return files


def _all_initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_initializers(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_initializers(subgraph)


# protobuf's hard limit is 2 GiB; stay clear of it
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def uses_external_data(path: Path) -> bool:
    """Whether outputs derived from this model should keep weights in a side `.data` file."""
    files = model_files(path)
    return len(files) > 1 or sum(file.stat().st_size for file in files) > EXTERNAL_DATA_THRESHOLD


def file_sha256(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def model_size_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in model_files(path))


def inspect_model(path: Path) -> ModelInfo:
    model = load_graph(path)
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    files = model_files(path)
    default_opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
    return ModelInfo(
        path=path,
        sha256=file_sha256(files),
        size_bytes=sum(file.stat().st_size for file in files),
        opset=default_opset,
        inputs=tuple(tensor_info(value) for value in model.graph.input if value.name not in initializer_names),
        outputs=tuple(tensor_info(value) for value in model.graph.output),
    )


def tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor_type = value.type.tensor_type
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
    shape = tuple(
        dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim
    )
    return TensorInfo(name=value.name, dtype=dtype, shape=shape)


def private_link(model: Path, directory: Path) -> Path:
    """Symlink `model` into `directory`, with a copy of its external data.

    ORT's quantizers write `<name>-inferred.onnx` beside the model they read, so two variants
    quantized at once from the same file would overwrite each other's scratch file. External data
    is copied: onnx refuses it behind a symlink or a hard link (it guards against link attacks).
    """
    directory.mkdir(parents=True, exist_ok=True)
    model_file, *data_files = model_files(model)
    target = directory / model_file.name
    if not target.exists():
        target.symlink_to(model_file.resolve())
    for file in data_files:
        if not (directory / file.name).exists():
            shutil.copyfile(file, directory / file.name)
    return target


def save_model(model: onnx.ModelProto, out: Path, external: bool) -> None:
    """Write `model` to `out`, its tensors in `<out>.data` when the source kept external data."""
    if external or model.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        onnx.save(
            model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{out.name}.data"
        )
    else:
        onnx.save(model, str(out))


def tracing_session(model: Path, names: Sequence[str]) -> ort.InferenceSession:
    """A session whose outputs are `names`: no graph optimisation, so every tensor keeps its name."""
    proto = onnx.load(str(model))
    present = {output.name for output in proto.graph.output}
    # ORT accepts an output with a name only and takes its type from the node that produces it.
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names) if name not in present)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
