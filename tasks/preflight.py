"""What can be checked of a spec's model and data files before anything runs, and without running code.

`int8flow validate` (and `run`, before it creates anything) reads the ONNX graph's inputs and outputs
(not its weights) and the headers of `.npz`/`.npy` data files (not their arrays), and reports what
cannot work: a file that is not an ONNX model, an `evaluation.output` the model does not have, data
arrays named, typed or shaped unlike the model's inputs, `top1` without labels, pickled arrays.
Data from a `callable:` or `texts:` is only seen at run time, and so are the sources of PyTorch and
Hugging Face models (their ONNX graph exists after export).
"""

from __future__ import annotations

import contextlib
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8flow.tasks.data import LABELS_KEY, DataSource
from int8flow.tasks.errors import InputError
from int8flow.tasks.evaluate import EvaluationError, OutputChoice, outputs_read
from int8flow.tasks.model import TensorInfo, load_graph, tensor_info

Location = tuple[str | int, ...]


@dataclass(frozen=True)
class Mismatch:
    location: Location  # where in the spec the problem comes from
    message: str


@dataclass(frozen=True)
class ArrayHeader:
    shape: tuple[int, ...]
    dtype: np.dtype


def array_headers(path: Path) -> dict[str, ArrayHeader]:
    """The arrays of an `.npz` or `.npy` file, by name, from their headers (nothing is loaded)."""
    if path.suffix == ".npy":
        with open(path, "rb") as handle:
            return {path.stem: _header(handle)}
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if member.endswith(".npy"):
                with archive.open(member) as handle:
                    headers[member.removesuffix(".npy")] = _header(handle)
    return headers


def _header(handle: object) -> ArrayHeader:
    version = np.lib.format.read_magic(handle)  # type: ignore[arg-type]
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read(handle)  # type: ignore[arg-type]
    return ArrayHeader(tuple(shape), np.dtype(dtype))


def check_against_model(
    model: Path, sources: Mapping[Location, DataSource], output: OutputChoice, needs_labels: Location | None
) -> list[Mismatch]:
    """Problems of `model` and of the `.npz`/`.npy` data `sources` (by their spec location) against it."""
    try:
        graph = load_graph(model).graph
    except InputError as error:
        return [Mismatch(("model", "path"), str(error))]
    initializers = {tensor.name for tensor in graph.initializer}
    inputs = [tensor_info(value) for value in graph.input if value.name not in initializers]
    outputs = [value.name for value in graph.output]
    problems = []
    try:
        outputs_read(output, outputs)
    except EvaluationError as error:
        problems.append(Mismatch(("evaluation", "output"), str(error)))
    for location, source in sources.items():
        problems += _declared_problems(location, source, inputs)
        if source.path is not None:
            in_data = [
                tensor for tensor in inputs if tensor.name not in source.inputs or source.inputs[tensor.name].in_data
            ]
            problems += [Mismatch((*location, "path"), message) for message in _data_problems(source.path, in_data)]
    evaluation = sources.get(("evaluation", "data"))
    path = evaluation.path if evaluation is not None else None
    readable = list(_headers_of(path)) if path is not None and not problems else []
    if needs_labels is not None and path is not None and readable and not any(LABELS_KEY in h for h in readable):
        problems.append(Mismatch(needs_labels, f"top1 needs labels, and {path.name} has no `labels` array"))
    return problems


def _headers_of(path: Path) -> Iterator[dict[str, ArrayHeader]]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    for file in files:
        with contextlib.suppress(OSError, ValueError, zipfile.BadZipFile):  # unreadable files are reported apart
            yield array_headers(file)


def _declared_problems(location: Location, source: DataSource, inputs: Sequence[TensorInfo]) -> list[Mismatch]:
    """The spec's `inputs:` against the model: names it takes, and the rank of arrays the spec writes."""
    expected = {tensor.name: tensor for tensor in inputs}
    problems = []
    for name, how in source.inputs.items():
        where = (*location, "inputs", name)
        tensor = expected.get(name)
        if tensor is None:
            problems.append(Mismatch(where, f"the model has no input {name!r}; its inputs: {', '.join(expected)}"))
            continue
        rank = len(how.zeros) if how.zeros is not None else np.ndim(how.value) if how.value is not None else None
        if rank is not None and rank != len(tensor.shape):
            shape = "[" + ", ".join(str(dim) for dim in tensor.shape) + "]"
            problems.append(
                Mismatch(where, f"rank {rank} given; the model's input {name!r} is rank {len(tensor.shape)} {shape}")
            )
        if how.sample_axis is not None and how.in_data and how.sample_axis >= max(len(tensor.shape), 1):
            problems.append(
                Mismatch((*where, "sample_axis"), f"the model's input {name!r} has no axis {how.sample_axis}")
            )
    return problems


def _data_problems(path: Path, inputs: Sequence[TensorInfo]) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy")) if path.is_dir() else [path]
    problems = []
    expected = {tensor.name: tensor for tensor in inputs}
    for file in files[:64]:  # a folder's first files show a systematic mistake; the run checks every file
        try:
            headers = array_headers(file)
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            problems.append(f"{file.name} is not a NumPy .npz/.npy file ({type(error).__name__}: {error})")
            continue
        if file.suffix == ".npy" and len(expected) == 1:
            headers = {next(iter(expected)): next(iter(headers.values()))}
        problems += [
            f"{file.name}: {message}" for message in _arrays_against_inputs(headers, expected, file.suffix == ".npy")
        ]
    return problems


def _arrays_against_inputs(
    headers: Mapping[str, ArrayHeader], expected: Mapping[str, TensorInfo], single: bool
) -> list[str]:
    problems = []
    arrays = {name: header for name, header in headers.items() if name != LABELS_KEY}
    missing = sorted(set(expected) - set(arrays))
    unknown = sorted(set(arrays) - set(expected))
    if (missing or unknown) and not single:
        problems.append(
            f"arrays {sorted(arrays)} do not match the model inputs {sorted(expected)} (missing {missing or 'none'}, unknown {unknown or 'none'})"
        )
    for name, header in arrays.items():
        if header.dtype.kind in "OUSVc":
            what = "pickled Python objects" if header.dtype.kind == "O" else f"{header.dtype} values"
            problems.append(f"array {name!r} holds {what}; the model takes numbers")
            continue
        tensor = expected.get(name)
        if tensor is not None and len(tensor.shape) and len(header.shape) != len(tensor.shape):
            shape = "[" + ", ".join(str(dim) for dim in tensor.shape) + "]"
            problems.append(
                f"array {name!r} has shape {header.shape}; the model's input {name!r} is rank {len(tensor.shape)} {shape}"
            )
    return problems
