"""Calibration and evaluation data: `.npz`, a folder of `.npz`/`.npy`, or a `module:function`.

Everything becomes a `Dataset`: a list of batches (input name -> array, optional labels) cast to the
model's input dtypes, plus a fingerprint so two runs can tell whether they saw the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from int8flow.tasks.errors import InputError
from int8flow.tasks.options import (
    CALLABLE_PATTERN,
    MAX_COUNT,
    StrictModel,
    WithUserCode,
    check_callable,
    resolve_path,
)
from int8flow.tasks.usercode import UserCodeError, call_user

LABELS_KEY = "labels"


BATCH: Literal["batch"] = "batch"


class InputData(StrictModel):
    """How one model input is fed when it is not a per-sample array with the samples on its first axis.

    Exactly one of `value`, `zeros`, `path` (the input is not in the data: the same array for every batch),
    or only `sample_axis` (the input is in the data, with its samples on another axis, or on none)."""

    value: int | float | list[Any] | None = Field(
        default=None, description="Fed as is to every batch (cast to the input's type), e.g. a sample rate: 16000."
    )
    zeros: list[Annotated[int, Field(ge=0, le=1_000_000)] | Literal["batch"]] | None = Field(
        default=None,
        max_length=16,
        description="Zeros of this shape for every batch; `batch` stands for the batch's size, e.g. a recurrent "
        "state [2, batch, 128] whose samples are on axis 1.",
    )
    path: Path | None = Field(default=None, description="A `.npy` array fed as is to every batch.")
    sample_axis: int | None = Field(
        default=0,
        ge=0,
        le=15,
        description="For an input in the data: the axis that counts samples (0 by default; null: the array has "
        "no sample axis and is fed as is to every batch).",
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @model_validator(mode="after")
    def _one_way(self) -> InputData:
        given = [name for name in ("value", "zeros", "path") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of `value`, `zeros`, `path`, not {' and '.join(given)}")
        if given and "sample_axis" in self.model_fields_set:
            raise ValueError(f"`sample_axis` is for inputs in the data; `{given[0]}` says where this one comes from")
        if self.value is not None and np.asarray(self.value).dtype.kind not in "biuf":
            raise ValueError("`value` must be a number or a nested list of numbers of one shape")
        if self.zeros is not None and self.zeros.count(BATCH) > 1:
            raise ValueError("`zeros` may name the `batch` axis once")
        return self

    @property
    def in_data(self) -> bool:
        return self.value is None and self.zeros is None and self.path is None

    @property
    def axis(self) -> int | None:
        """Where this input's samples are, once fed: None for an array that is the same for every batch."""
        if self.zeros is not None:
            return self.zeros.index(BATCH) if BATCH in self.zeros else None
        return self.sample_axis if self.in_data else None

    def array(self, batch_size: int) -> np.ndarray:
        """The array fed with a batch of `batch_size` samples (for inputs not in the data)."""
        if self.zeros is not None:
            return np.zeros([batch_size if dim == BATCH else int(dim) for dim in self.zeros], np.float32)
        if self.path is not None:
            try:
                return np.load(self.path, allow_pickle=False)
            except (OSError, ValueError) as error:
                raise DataError(f"cannot read {self.path}: {error}") from error
        return np.asarray(self.value)


class DataSource(WithUserCode):
    """Inputs (and optional labels), from exactly one of `path`, `callable` or `texts`."""

    path: Path | None = Field(
        default=None,
        description="An `.npz` file (arrays keyed by model input name, optional `labels`; first axis = "
        "samples) or a folder of `.npz`/`.npy` files (a `.npy` feeds a single-input model).",
    )
    callable: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="`module:function` returning an iterable of input dicts, or of (input dict, labels) "
        "pairs; each dict maps input names to arrays with a batch axis. The spec's folder is importable.",
    )
    texts: Path | None = Field(
        default=None,
        description="A `.txt` file, one text per line, tokenized with the `huggingface` model's tokenizer.",
    )
    inputs: dict[str, InputData] = Field(
        default_factory=dict,
        max_length=256,
        description="Inputs fed otherwise than as per-sample arrays with samples on axis 0: a state or a "
        "constant not in the data (`value`, `zeros`, `path`), or an array in the data whose samples are on "
        "another axis or on none (`sample_axis`).",
    )
    batch_size: int = Field(default=16, ge=1, le=4096, description="Samples per inference call.")
    limit: int | None = Field(default=None, ge=1, le=MAX_COUNT, description="Use at most this many samples.")

    @field_validator("path", "texts")
    @classmethod
    def _path_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("callable")
    @classmethod
    def _findable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_callable(value, info)

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        if sum(value is not None for value in (self.path, self.callable, self.texts)) != 1:
            raise ValueError("give exactly one of `path`, `callable` or `texts`")
        return self

    @property
    def origin(self) -> str:
        return str(self.path or self.texts or self.callable)


class DataError(InputError):
    """The data source does not fit the model (missing input, wrong type, unreadable file)."""


@dataclass(frozen=True)
class Batch:
    """Some samples: input name -> array, optional labels. `axes` says where an input's samples are when
    not on axis 0 (None: the same array for every sample, e.g. a sample rate)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    axes: Mapping[str, int | None] = field(default_factory=dict)

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    @property
    def size(self) -> int:
        for name, array in self.inputs.items():
            axis = self.axis(name)
            if axis is not None:
                return int(array.shape[axis])
        return 1  # nothing has a sample axis: one sample

    def take(self, indices: slice | np.ndarray) -> dict[str, np.ndarray]:
        """These samples' inputs; inputs without a sample axis pass through."""
        taken = {}
        for name, array in self.inputs.items():
            axis = self.axis(name)
            if axis is None:
                taken[name] = array
            elif isinstance(indices, slice):
                taken[name] = array[(slice(None),) * axis + (indices,)]
            else:
                taken[name] = np.take(array, indices, axis=axis)
        return taken

    def subset(self, indices: slice) -> Batch:
        labels = None if self.labels is None else self.labels[indices]
        return Batch(self.take(indices), labels, self.axes)

    def sample_labels(self) -> list[np.ndarray] | None:
        return None if self.labels is None else [np.asarray(label) for label in self.labels]


@dataclass(frozen=True)
class Dataset:
    batches: tuple[Batch, ...]
    fingerprint: str

    @property
    def samples(self) -> int:
        return sum(batch.size for batch in self.batches)

    @property
    def has_labels(self) -> bool:
        return all(batch.labels is not None for batch in self.batches)

    def labels(self) -> np.ndarray | None:
        """Every sample's labels in one array; None without labels, a DataError when their shapes differ
        from batch to batch (use `sample_labels`)."""
        if not self.has_labels:
            return None
        try:
            return np.concatenate([batch.labels for batch in self.batches if batch.labels is not None])
        except ValueError as error:
            raise DataError(f"labels differ in shape from batch to batch ({error}); read them per sample") from error

    def sample_labels(self) -> list[np.ndarray] | None:
        """One label array per sample (labels of any shape), None without labels."""
        if not self.has_labels:
            return None
        return [label for batch in self.batches for label in batch.sample_labels() or []]


Tokenizer = Callable[[list[str]], dict[str, np.ndarray]]


def load_dataset(
    source: DataSource,
    input_dtypes: dict[str, np.dtype],
    *,
    max_samples: int | None = None,
    tokenize: Tokenizer | None = None,
    ignore_extra_inputs: bool = False,
    input_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
) -> Dataset:
    """Read `source` into batches for a model whose inputs are `input_dtypes` (name -> dtype).

    `tokenize` turns a list of texts into model inputs; it is needed for a `texts:` source.
    `ignore_extra_inputs` drops arrays the model has no input for (an exporter prunes unused inputs,
    e.g. `token_type_ids`), instead of calling that an error. `input_shapes`: the model's input shapes
    (names for dynamic axes), checked against the data's ranks and fixed dimensions.
    """
    try:
        return _load(source, input_dtypes, max_samples, tokenize, ignore_extra_inputs, input_shapes)
    except (DataError, UserCodeError) as error:
        raise DataError(f"{source.origin}: {error}") from error


def _load(
    source: DataSource,
    input_dtypes: dict[str, np.dtype],
    max_samples: int | None,
    tokenize: Tokenizer | None,
    ignore_extra_inputs: bool,
    input_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
) -> Dataset:
    limit = min(filter(None, (source.limit, max_samples)), default=None)
    raw: Iterable[Batch]
    if source.texts is not None:
        if tokenize is None:
            raise DataError("texts need a tokenizer (a huggingface model source)")
        raw = _from_texts(source.texts, tokenize, source.batch_size, limit)
    elif source.callable is not None:
        raw = _from_callable(source, source.callable)
    elif source.path is not None and source.path.is_dir():
        raw = _from_folder(source.path, _in_files(input_dtypes, source.inputs), source.batch_size, source.inputs)
    elif source.path is not None:
        raw = _split(_read_npz(source.path), source.batch_size, source.inputs)
    else:  # the spec guarantees one of the two
        raise DataError("data source has neither path nor callable")
    unknown = sorted(set(source.inputs) - set(input_dtypes))
    if unknown:
        raise DataError(f"`inputs` names {unknown}, which the model does not take; its inputs: {sorted(input_dtypes)}")
    batches = tuple(
        _truncate(
            (
                _checked(_declared(batch, source.inputs), input_dtypes, ignore_extra_inputs, input_shapes)
                for batch in raw
            ),
            limit,
        )
    )
    if not batches:
        raise DataError("the data source gave no samples")
    return Dataset(batches=batches, fingerprint=fingerprint(batches))


def fingerprint(batches: Iterable[Batch]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch.inputs):
            array = np.ascontiguousarray(batch.inputs[name])
            digest.update(f"{name}|{array.dtype}|{array.shape}".encode())
            digest.update(array.tobytes())
        if batch.labels is not None:
            digest.update(np.ascontiguousarray(batch.labels).tobytes())
    return digest.hexdigest()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {error}") from error


def _split(
    arrays: dict[str, np.ndarray], batch_size: int, declared: Mapping[str, InputData] | None = None
) -> list[Batch]:
    declared = declared or {}
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError("no input arrays (only labels) in the data file")
    axes = {name: declared[name].axis if name in declared else 0 for name in arrays}
    counts = {
        name: array.shape[axis] if axis is not None and array.ndim > axis else None
        for name, array in arrays.items()
        if (axis := axes[name]) is not None
    }
    if None in counts.values():
        short = sorted(name for name, count in counts.items() if count is None)
        raise DataError(f"arrays {short} have no axis {[axes[name] for name in short]} to hold their samples")
    if len(set(counts.values())) > 1 or (labels is not None and counts and len(labels) != next(iter(counts.values()))):
        sizes = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise DataError(
            f"arrays in one data file must hold the same number of samples (here: {sizes}"
            + (f", labels {len(labels)}" if labels is not None else "")
            + "); an input without a sample axis, or with its samples on another axis, is declared under `inputs:` "
            "(`sample_axis`), and one that is not in the data at all with `value`, `zeros` or `path`"
        )
    count = int(next(iter(counts.values()), 1) or 1)
    whole = Batch(inputs=arrays, labels=labels, axes={name: axis for name, axis in axes.items() if axis != 0})
    return [whole.subset(slice(start, start + batch_size)) for start in range(0, count, batch_size)]


def read_texts(path: Path) -> list[str]:
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [text for text in texts if text]


def _from_texts(path: Path, tokenize: Tokenizer, batch_size: int, limit: int | None) -> list[Batch]:
    texts = read_texts(path)[:limit]
    return [Batch(inputs=tokenize(texts[start : start + batch_size])) for start in range(0, len(texts), batch_size)]


def _in_files(input_dtypes: Mapping[str, np.dtype], declared: Mapping[str, InputData]) -> list[str]:
    return [name for name in input_dtypes if name not in declared or declared[name].in_data]


def _from_folder(
    folder: Path, input_names: list[str], batch_size: int, declared: Mapping[str, InputData]
) -> list[Batch]:
    """Each file its own batches: a folder can hold samples of different shapes (text lines of different
    widths, clips of different lengths), one shape per file."""
    files = sorted(path for path in folder.iterdir() if path.suffix in {".npz", ".npy"})
    if not files:
        raise DataError(f"no .npz or .npy files in {folder}")
    batches: list[Batch] = []
    for path in files:
        if path.suffix == ".npz":
            batches.extend(_split(_read_npz(path), batch_size, declared))
        elif len(input_names) != 1:
            raise DataError(f"{path.name}: a .npy file can only feed a single-input model, inputs: {input_names}")
        else:
            batches.extend(_split({input_names[0]: np.load(path, allow_pickle=False)}, batch_size, declared))
    return batches


def _declared(batch: Batch, declared: Mapping[str, InputData]) -> Batch:
    """The batch with the inputs the spec declares: arrays not in the data added, sample axes set."""
    if not declared:
        return batch
    size = batch.size
    inputs = dict(batch.inputs)
    for name, how in declared.items():
        if not how.in_data:
            inputs[name] = how.array(size)
    axes = {**batch.axes, **{name: how.axis for name, how in declared.items()}}
    return Batch(inputs, batch.labels, {name: axis for name, axis in axes.items() if axis != 0})


def _from_callable(source: DataSource, reference: str) -> Iterable[Batch]:
    items = call_user(reference, iter, call_user(reference, source.load(reference)))
    end = object()
    # pulled one at a time, so `limit` stops a long (or endless) generator early
    while (item := call_user(reference, next, items, end)) is not end:
        if isinstance(item, tuple) and len(item) == 2:
            inputs, labels = item
            yield Batch(inputs=dict(inputs), labels=None if labels is None else np.asarray(labels))
        elif isinstance(item, dict):
            yield Batch(inputs=dict(item))
        else:
            raise DataError(f"{reference} must yield input dicts or (inputs, labels) pairs, got {type(item).__name__}")


def _checked(
    batch: Batch,
    input_dtypes: Mapping[str, np.dtype],
    ignore_extra_inputs: bool = False,
    input_shapes: Mapping[str, Sequence[int | str | None]] | None = None,
) -> Batch:
    """The batch's inputs as the model takes them, or a DataError naming the input and what is wrong:
    missing or unknown inputs, a type that would silently change the values (complex, strings, objects,
    floats for integer inputs), NaN or Inf, a rank or a fixed dimension the model does not have."""
    missing = sorted(set(input_dtypes) - set(batch.inputs))
    unknown = [] if ignore_extra_inputs else sorted(set(batch.inputs) - set(input_dtypes))
    if missing or unknown:
        raise DataError(
            f"data does not match the model inputs {sorted(input_dtypes)}: "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    counts = {
        name: np.shape(array)[axis] if np.ndim(array) > axis else None
        for name, array in batch.inputs.items()
        if name in input_dtypes and (axis := batch.axis(name)) is not None
    }
    if len(set(counts.values())) > 1:
        sizes = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise DataError(
            f"the inputs of one batch must hold the same number of samples (here: {sizes}); an input without a "
            "sample axis (a recurrent state fed once per batch), or with its samples on another axis, is declared "
            "under the data source's `inputs:` (`sample_axis: null` or the axis)"
        )
    inputs = {}
    for name, dtype in input_dtypes.items():
        array = np.asarray(batch.inputs[name])
        _check_values(name, array, np.dtype(dtype))
        if input_shapes is not None and name in input_shapes:
            _check_shape(name, array.shape, input_shapes[name], batch.axis(name))
        inputs[name] = array.astype(dtype, copy=False)
    return Batch(inputs=inputs, labels=_checked_labels(batch.labels), axes=batch.axes)


def _check_values(name: str, array: np.ndarray, wanted: np.dtype) -> None:
    kind = array.dtype.kind
    if kind in "OUSV":
        raise DataError(f"input {name!r} holds {array.dtype} values; the model takes {wanted} numbers")
    if kind == "c":
        raise DataError(f"input {name!r} is complex ({array.dtype}); casting to {wanted} would drop the imaginary part")
    if not np.can_cast(array.dtype, wanted, casting="same_kind") and not (kind == "b" or wanted.kind == "b"):
        raise DataError(
            f"input {name!r} is {array.dtype}; the model takes {wanted}, and the cast would change the values"
        )
    if kind == "f" and not np.isfinite(array).all():
        bad = int(np.argwhere(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))[0][0]) if array.ndim else 0
        raise DataError(f"input {name!r} contains NaN or Inf (first in sample {bad} of its batch)")


def _check_shape(
    name: str, shape: tuple[int, ...], expected: Sequence[int | str | None], sample_axis: int | None = 0
) -> None:
    if len(shape) != len(expected):
        wanted = "[" + ", ".join(str(dim) for dim in expected) + "]"
        raise DataError(f"input {name!r} has shape {shape}; the model takes rank {len(expected)} {wanted}")
    for axis, (got, want) in enumerate(zip(shape, expected, strict=True)):
        if isinstance(want, int) and want > 0 and got != want and axis != sample_axis:
            raise DataError(f"input {name!r} has shape {shape}; the model's axis {axis} is fixed at {want}")


def _checked_labels(labels: np.ndarray | None) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iubf":
        raise DataError(f"labels are {labels.dtype} values; metrics take numbers (top1: class indices 0..C-1)")
    if labels.dtype.kind == "f" and not np.isfinite(labels).all():
        raise DataError("labels contain NaN or Inf")
    return labels


def _truncate(batches: Iterable[Batch], limit: int | None) -> Iterable[Batch]:
    taken = 0
    for batch in batches:
        if limit is not None and taken + batch.size > limit:
            keep = limit - taken
            if keep > 0:
                yield batch.subset(slice(0, keep))
            return
        taken += batch.size
        yield batch
