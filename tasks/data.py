"""Calibration and evaluation data: `.npz`, a folder of `.npz`/`.npy`, or a `module:function`.

Everything becomes a `Dataset`: a list of batches (input name -> array, optional labels) cast to the
model's input dtypes, plus a fingerprint so two runs can tell whether they saw the same data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationInfo, field_validator, model_validator

from int8flow.tasks.errors import InputError
from int8flow.tasks.options import CALLABLE_PATTERN, MAX_COUNT, WithUserCode, check_callable, resolve_path
from int8flow.tasks.usercode import UserCodeError, call_user

LABELS_KEY = "labels"


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
    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, indices: slice | np.ndarray) -> dict[str, np.ndarray]:
        """These samples' inputs. Inputs without the batch axis (a recurrent model's initial state,
        shape [1, ...] beside a batch of frames) are the same for every sample and pass through."""
        size = self.size
        return {name: array[indices] if len(array) == size else array for name, array in self.inputs.items()}


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
        return np.concatenate([batch.labels for batch in self.batches]) if self.has_labels else None


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
        raw = _from_folder(source.path, list(input_dtypes), source.batch_size)
    elif source.path is not None:
        raw = _split(_read_npz(source.path), source.batch_size)
    else:  # the spec guarantees one of the two
        raise DataError("data source has neither path nor callable")
    batches = tuple(
        _truncate((_checked(batch, input_dtypes, ignore_extra_inputs, input_shapes) for batch in raw), limit)
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


def _split(arrays: dict[str, np.ndarray], batch_size: int) -> list[Batch]:
    labels = arrays.pop(LABELS_KEY, None)
    if not arrays:
        raise DataError("no input arrays (only labels) in the data file")
    count = len(next(iter(arrays.values())))
    if any(len(array) != count for array in arrays.values()) or (labels is not None and len(labels) != count):
        raise DataError("arrays in one data file must share their first (sample) axis length")
    return [
        Batch(
            inputs={name: array[start : start + batch_size] for name, array in arrays.items()},
            labels=None if labels is None else labels[start : start + batch_size],
        )
        for start in range(0, count, batch_size)
    ]


def read_texts(path: Path) -> list[str]:
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [text for text in texts if text]


def _from_texts(path: Path, tokenize: Tokenizer, batch_size: int, limit: int | None) -> list[Batch]:
    texts = read_texts(path)[:limit]
    return [Batch(inputs=tokenize(texts[start : start + batch_size])) for start in range(0, len(texts), batch_size)]


def _from_folder(folder: Path, input_names: list[str], batch_size: int) -> list[Batch]:
    files = sorted(path for path in folder.iterdir() if path.suffix in {".npz", ".npy"})
    if not files:
        raise DataError(f"no .npz or .npy files in {folder}")
    batches: list[Batch] = []
    for path in files:
        if path.suffix == ".npz":
            batches.extend(_split(_read_npz(path), batch_size))
        elif len(input_names) != 1:
            raise DataError(f"{path.name}: a .npy file can only feed a single-input model, inputs: {input_names}")
        else:
            batches.extend(_split({input_names[0]: np.load(path, allow_pickle=False)}, batch_size))
    return batches


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
    inputs = {}
    for name, dtype in input_dtypes.items():
        array = np.asarray(batch.inputs[name])
        _check_values(name, array, np.dtype(dtype))
        if input_shapes is not None and name in input_shapes:
            _check_shape(name, array.shape, input_shapes[name])
        inputs[name] = array.astype(dtype, copy=False)
    return Batch(inputs=inputs, labels=_checked_labels(batch.labels))


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


def _check_shape(name: str, shape: tuple[int, ...], expected: Sequence[int | str | None]) -> None:
    if len(shape) != len(expected):
        wanted = "[" + ", ".join(str(dim) for dim in expected) + "]"
        raise DataError(f"input {name!r} has shape {shape}; the model takes rank {len(expected)} {wanted}")
    for axis, (got, want) in enumerate(zip(shape, expected, strict=True)):
        if isinstance(want, int) and want > 0 and got != want and axis > 0:
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
                yield Batch(
                    inputs=batch.take(slice(0, keep)),
                    labels=None if batch.labels is None else batch.labels[:keep],
                )
            return
        taken += batch.size
        yield batch
