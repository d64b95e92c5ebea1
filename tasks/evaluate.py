"""Run a model over the evaluation data and score it against labels and against FP32 outputs."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import Field, ValidationInfo, field_validator, model_validator

from int8flow.tasks.data import DataError, Dataset, DataSource
from int8flow.tasks.options import CALLABLE_PATTERN, StrictModel, WithUserCode, check_callable
from int8flow.tasks.usercode import call_user

BUILTIN_METRICS: dict[str, str] = {
    "top1": "top-1 accuracy of argmax(output) against the labels (needs labels)",
    "cosine": "mean cosine similarity of each sample's output vs the FP32 model's",
    "mae": "mean absolute error vs the FP32 model's output",
    "mre": "relative error vs FP32: sum |output - fp32| / sum |fp32|",
    "nn_agreement": "share of samples whose nearest other sample (cosine of outputs) is the same as "
    "under FP32: retrieval agreement for embedding models",
    "topk_agreement": "mean share of each sample's 10 largest FP32 output elements that stay among the "
    "variant's 10 largest: what a detector's score map or a ranking needs, for models without labels",
}
LOWER_IS_BETTER = {"mae", "mre"}


class Metric(WithUserCode):
    """A built-in metric by name (`top1`, `cosine`, ...) or a user metric `module:function`."""

    name: str = Field(max_length=64, description="Built-in metric name, or the name a user metric is logged under.")
    function: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="User metric `module:function(outputs, reference_outputs, labels) -> float`: outputs and "
        "reference_outputs are lists with one array per batch (the variant's and FP32's, of the output the "
        "metrics read), labels one array of every sample's labels (a list with one array per sample when their "
        "shapes differ), None when the data has none. With `per_sample: true`: `function(output, "
        "reference_output, label) -> float` for one sample at a time, averaged by int8flow.",
    )
    per_sample: bool = Field(
        default=False,
        description="Call `function` once per sample (its output, FP32's output, its label) and average: for "
        "samples of different shapes, or labels of different lengths (a text line's characters).",
    )
    higher_is_better: bool | None = Field(
        default=None, description="Direction of a user metric; built-ins know their own."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: object) -> object:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("function")
    @classmethod
    def _findable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_callable(value, info)

    @model_validator(mode="after")
    def _known(self) -> Metric:
        if self.function is None and self.name not in BUILTIN_METRICS:
            raise ValueError(
                f"unknown metric {self.name!r}: expected one of {', '.join(BUILTIN_METRICS)} "
                "or a user metric with `function: module:function`"
            )
        if self.function is not None and self.name in BUILTIN_METRICS:
            raise ValueError(f"{self.name!r} is a built-in metric; give the user metric another name")
        if self.per_sample and self.function is None:
            raise ValueError("`per_sample` is for user metrics (`function:`); the built-ins are per sample already")
        if "." in self.name:
            raise ValueError(f"metric name {self.name!r}: no dots (int8flow logs `<metric>.<output>` per output)")
        return self

    @property
    def higher_better(self) -> bool:
        if self.function is None:
            return self.name not in LOWER_IS_BETTER
        return True if self.higher_is_better is None else self.higher_is_better


class Guards(StrictModel):
    """Fidelity guards: each variant's outputs against FP32's, beside the selection metric, so that a mean
    that stays high cannot hide a collapse (a detector keeping 1 of 10 detections at cosine 0.998)."""

    enabled: bool = Field(
        default=True,
        description="Reject a variant whose outputs collapse (below the limits here) although its metric passes.",
    )
    topk: int = Field(
        default=10, ge=1, le=1000, description="k of the top-k agreement (outputs of at least 2k elements per sample)."
    )
    min_topk_agreement: float = Field(
        default=0.5, ge=0, le=1, description="Collapse: fewer of FP32's k largest output elements kept, on average."
    )
    min_sqnr_db: float = Field(
        default=3.0, ge=-100, le=100, description="Collapse: an output's signal-to-quantization-noise ratio below this."
    )
    outputs: list[str] | None = Field(default=None, description="Outputs guarded; default: every float output.")

    def collapsed(self, fidelity: Mapping[str, Fidelity]) -> list[str]:
        """What collapsed, one line per output and guard; empty when nothing did (or guards are off)."""
        if not self.enabled:
            return []
        found = []
        for name, measured in fidelity.items():
            if self.outputs is not None and name not in self.outputs:
                continue
            if measured.sqnr_db < self.min_sqnr_db:
                found.append(f"{name}: SQNR {measured.sqnr_db:.1f} dB < {self.min_sqnr_db:g} dB")
            if measured.topk_agreement is not None and measured.topk_agreement < self.min_topk_agreement:
                found.append(
                    f"{name}: top-{self.topk} agreement {measured.topk_agreement:.2f} < {self.min_topk_agreement:g}"
                )
        return found


class Evaluation(StrictModel):
    data: DataSource = Field(description="Evaluation inputs, with labels for `top1`; selection is decided on them.")
    metrics: list[Metric] = Field(
        default_factory=lambda: [Metric.model_validate("cosine")],
        min_length=1,
        max_length=32,
        description="Metrics computed for FP32 and every variant; the first one drives selection "
        "unless `selection.metric` says otherwise.",
    )
    output: str | list[str] | None = Field(
        default=None,
        description="Model output(s) the metrics read: a name, a list of names, or `all`; default: the first "
        "output. With several, each metric is logged per output (`<metric>.<output>`) and its value is the worst "
        "of them. Every output is compared with FP32's by the guards whatever this says.",
    )
    guards: Guards = Field(default_factory=Guards, description="Fidelity guards on every output.")
    test: DataSource | None = Field(
        default=None,
        description="Held-out data that selection never sees: the selected variant's reported accuracy is measured "
        "on it, beside its selection score, and a gap between the two is flagged.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Evaluation:
        names = [metric.name for metric in self.metrics]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"metric names must be unique: {', '.join(duplicates)}")
        return self


class EvaluationError(RuntimeError):
    pass


OutputChoice = str | list[str] | None  # a name, names, "all", or None for the first output
ALL_OUTPUTS = "all"


@dataclass(frozen=True)
class ModelOutputs:
    """Every output of a model on every batch, in dataset order; the metrics read `read` (the first by default)."""

    read: tuple[str, ...]
    outputs: Mapping[str, tuple[np.ndarray, ...]]  # output name -> one array per batch
    seconds: float

    @property
    def output_name(self) -> str:
        return self.read[0]

    @property
    def batches(self) -> tuple[np.ndarray, ...]:
        return self.outputs[self.read[0]]


def outputs_read(choice: OutputChoice, names: Sequence[str]) -> tuple[str, ...]:
    """The outputs the metrics read, of a model whose outputs are `names`; an EvaluationError for a name it lacks."""
    if choice is None:
        return (names[0],)
    wanted = list(names) if choice == ALL_OUTPUTS else [choice] if isinstance(choice, str) else list(choice)
    missing = [name for name in wanted if name not in names]
    if missing or not wanted:
        raise EvaluationError(f"the model has no output {missing[0]!r}; its outputs: {', '.join(names)}")
    return tuple(dict.fromkeys(wanted))


@dataclass(frozen=True)
class Scores:
    """One model's metric values on the evaluation data, and how each of its outputs compares with FP32's."""

    metrics: dict[str, float]
    samples: int
    seconds: float
    fidelity: Mapping[str, Fidelity] = field(default_factory=dict)  # output name -> diagnostics vs FP32


def session(model: Path, threads: int) -> ort.InferenceSession:
    """An ORT CPU session; the FP32 baseline and every variant get exactly these options."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def feed_for(runner: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`inputs` cast to the session's own input types (an fp16 variant without kept IO types takes
    float16); the data is the same for every model."""
    wanted = {value.name: ORT_TYPES.get(value.type) for value in runner.get_inputs()}
    return {
        name: array.astype(wanted[name], copy=False) if wanted.get(name) is not None else array
        for name, array in inputs.items()
        if name in wanted
    }


class NonFiniteOutputs(EvaluationError):
    """The model computed NaN or Inf."""


def run_model(model: Path, dataset: Dataset, output: OutputChoice = None, threads: int = 1) -> ModelOutputs:
    """Every output of `model` on `dataset` (float16 widened to float32); NaN or Inf is an error."""
    started = time.perf_counter()
    try:
        runner = session(model, threads)
    except Exception as error:
        raise EvaluationError(f"ONNX Runtime cannot load the model: {error}") from error
    names = [value.name for value in runner.get_outputs()]
    read = outputs_read(output, names)
    sample_axes = _output_sample_axes(runner, dataset)
    collected: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for index, batch in enumerate(dataset.batches):
        try:
            results = runner.run(names, feed_for(runner, batch.inputs))
        except Exception as error:
            raise EvaluationError(f"inference failed on batch {index}: {error}") from error
        for name, result in zip(names, results, strict=True):
            array = _widened(np.asarray(result))
            if sample_axes.get(name):
                array = np.moveaxis(array, sample_axes[name], 0)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise NonFiniteOutputs(f"output {name!r} contains NaN or Inf (batch {index})")
            collected[name].append(array)
    outputs = {name: tuple(arrays) for name, arrays in collected.items()}
    return ModelOutputs(read=read, outputs=outputs, seconds=time.perf_counter() - started)


def _output_sample_axes(runner: ort.InferenceSession, dataset: Dataset) -> dict[str, int]:
    """Outputs whose samples are not on axis 0: those with the named dimension that holds the samples of
    an input declared with another sample axis (a state [2, batch, 128] in, [2, batch, 128] out)."""
    first = dataset.batches[0]
    symbols = {
        value.shape[axis]
        for value in runner.get_inputs()
        if (axis := first.axis(value.name)) and axis < len(value.shape) and isinstance(value.shape[axis], str)
    }
    moved = {}
    for value in runner.get_outputs():
        axes = [index for index, dim in enumerate(value.shape) if isinstance(dim, str) and dim in symbols]
        if axes and axes[0] != 0:
            moved[value.name] = axes[0]
    return moved


def _widened(output: np.ndarray) -> np.ndarray:
    return output.astype(np.float32) if output.dtype == np.float16 else output


def evaluate(
    outputs: ModelOutputs, reference: ModelOutputs, dataset: Dataset, metrics: Sequence[Metric], topk: int = 10
) -> Scores:
    """Score `outputs` with each metric on each output they read, and compare every output with FP32's."""
    started = time.perf_counter()
    scores: dict[str, float] = {}
    read = [name for name in reference.read if name in outputs.outputs]
    for metric in metrics:
        per_output = {name: _score(metric, outputs.outputs[name], reference.outputs[name], dataset) for name in read}
        if len(per_output) == 1:
            scores.update(next(iter(per_output.values())))
            continue
        for name, values in per_output.items():
            scores.update({f"{key}.{name}": value for key, value in values.items()})
        pick = min if metric.higher_better else max  # the worst output decides
        for key in next(iter(per_output.values())):
            scores[key] = pick(values[key] for values in per_output.values())
    fidelity = {
        name: compare_output(outputs.outputs[name], reference.outputs[name], topk)
        for name in reference.outputs
        if name in outputs.outputs
    }
    return Scores(
        scores,
        dataset.samples,
        time.perf_counter() - started,
        {name: f for name, f in fidelity.items() if f is not None},
    )


def _score(
    metric: Metric, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], dataset: Dataset
) -> dict[str, float]:
    if metric.function is not None:
        return {metric.name: _user_metric(metric, outputs, reference, dataset)}
    candidate = [batch.astype(np.float64) for batch in outputs]
    baseline = [batch.astype(np.float64) for batch in reference]
    if metric.name == "cosine":
        similarity = cosine_per_sample(candidate, baseline)
        return {"cosine": float(similarity.mean()), "cosine_min": float(similarity.min())}
    return {metric.name: BUILTIN_FUNCTIONS[metric.name](candidate, baseline, dataset)}


def _per_sample(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One flat vector per sample; samples of different batches may differ in shape."""
    return [row.reshape(-1) for batch in batches for row in batch]


def top1(outputs: list[np.ndarray], reference: list[np.ndarray], dataset: Dataset) -> float:
    labels = dataset.labels()
    if labels is None:
        raise EvaluationError("metric top1 needs labels, and the evaluation data has none")
    predicted = np.asarray([int(np.argmax(vector)) for vector in _per_sample(outputs)])
    if len(predicted) != len(labels):
        raise EvaluationError(f"{len(predicted)} predictions for {len(labels)} labels")
    return float(np.mean(predicted == labels.reshape(-1)))


def cosine_per_sample(outputs: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    similarities = []
    for got, want in zip(_per_sample(outputs), _per_sample(reference), strict=True):
        norms = float(np.linalg.norm(got) * np.linalg.norm(want))
        same_zeros = norms == 0 and not got.any() and not want.any()  # two all-zero outputs are the same output
        similarities.append(1.0 if same_zeros else float(got @ want) / max(norms, 1e-12))
    return np.asarray(similarities)


def topk_agreement_per_sample(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Share of each sample's k largest FP32 output elements that are also among the variant's k largest."""
    shares = []
    for got, want in zip(_per_sample(outputs), _per_sample(reference), strict=True):
        keep = min(k, want.size)
        top_want = set(np.argpartition(-want, keep - 1)[:keep].tolist())
        top_got = set(np.argpartition(-got, keep - 1)[:keep].tolist())
        shares.append(len(top_want & top_got) / keep)
    return np.asarray(shares)


def topk_agreement(outputs: list[np.ndarray], reference: list[np.ndarray], dataset: Dataset) -> float:
    return float(topk_agreement_per_sample(outputs, reference, TOPK).mean())


def mae(outputs: list[np.ndarray], reference: list[np.ndarray], dataset: Dataset) -> float:
    total = sum(float(np.abs(got - want).sum()) for got, want in zip(outputs, reference, strict=True))
    return total / max(sum(want.size for want in reference), 1)


def mre(outputs: list[np.ndarray], reference: list[np.ndarray], dataset: Dataset) -> float:
    error = sum(float(np.abs(got - want).sum()) for got, want in zip(outputs, reference, strict=True))
    return error / max(sum(float(np.abs(want).sum()) for want in reference), 1e-12)


def nearest_neighbour_agreement(
    outputs: list[np.ndarray], reference: list[np.ndarray], dataset: Dataset | None = None
) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same under both models."""

    def neighbours(batches: list[np.ndarray]) -> np.ndarray:
        vectors = _per_sample(batches)
        if len({vector.size for vector in vectors}) != 1:
            raise EvaluationError("nn_agreement needs every sample's output to have one shape")
        matrix = np.stack(vectors)
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        similarity = matrix @ matrix.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argmax(similarity, axis=1)

    if sum(len(batch) for batch in reference) < 2:
        raise EvaluationError("nn_agreement needs at least two evaluation samples")
    return float(np.mean(neighbours(outputs) == neighbours(reference)))


TOPK = 10
BuiltinMetric = Callable[[list[np.ndarray], list[np.ndarray], Dataset], float]
BUILTIN_FUNCTIONS: dict[str, BuiltinMetric] = {
    "top1": top1,
    "mae": mae,
    "mre": mre,
    "nn_agreement": nearest_neighbour_agreement,
    "topk_agreement": topk_agreement,
}


@dataclass(frozen=True)
class Fidelity:
    """One output of a variant against FP32's: what a mean metric can hide."""

    sqnr_db: float  # signal-to-quantization-noise ratio over all samples
    topk_agreement: float | None  # mean share of FP32's k largest elements kept (None: too few elements)
    max_error_of_range: float  # largest |variant - FP32| over FP32's value range

    def as_metrics(self, prefix: str) -> dict[str, float]:
        metrics = {f"{prefix}sqnr_db": self.sqnr_db, f"{prefix}max_error_of_range": self.max_error_of_range}
        if self.topk_agreement is not None:
            metrics[f"{prefix}topk_agreement"] = self.topk_agreement
        return metrics


def compare_output(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], k: int) -> Fidelity | None:
    """The variant's output against FP32's; None for outputs that are not floats."""
    if not reference or reference[0].dtype.kind != "f":
        return None
    got = [batch.astype(np.float64) for batch in outputs]
    want = [batch.astype(np.float64) for batch in reference]
    signal = sum(float((w * w).sum()) for w in want)
    noise = sum(float(((g - w) ** 2).sum()) for g, w in zip(got, want, strict=True))
    sqnr = 100.0 if noise == 0 else min(100.0, 10 * math.log10(max(signal, 1e-30) / noise))
    value_range = max(float(w.max()) for w in want) - min(float(w.min()) for w in want)
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    per_sample = min(w[0].size for w in want)
    agreement = float(topk_agreement_per_sample(got, want, k).mean()) if per_sample >= 2 * k else None
    return Fidelity(sqnr, agreement, worst / value_range if value_range > 0 else float(worst > 0))


def _user_metric(
    metric: Metric, outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray], dataset: Dataset
) -> float:
    reference_name = str(metric.function)
    function = metric.load(reference_name)
    if metric.per_sample:
        labels = dataset.sample_labels()
        got, want = _rows(outputs), _rows(reference)
        values = [
            _number(metric, call_user(reference_name, function, row, expected, None if labels is None else labels[i]))
            for i, (row, expected) in enumerate(zip(got, want, strict=True))
        ]
        return float(np.mean(values)) if values else math.nan
    try:
        labels_arg: object = dataset.labels()
    except DataError:  # labels of different shapes: one array per sample
        labels_arg = dataset.sample_labels()
    return _number(metric, call_user(reference_name, function, list(outputs), list(reference), labels_arg))


def _rows(batches: Sequence[np.ndarray]) -> list[np.ndarray]:
    """One array per sample, its shape as the model gives it minus the batch axis."""
    return [row for batch in batches for row in batch]


def _number(metric: Metric, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise EvaluationError(
            f"metric {metric.name} ({metric.function}) returned {type(value).__name__}, not a number"
        ) from error


def evaluate_model(
    model: Path,
    dataset: Dataset,
    reference: ModelOutputs,
    metrics: Sequence[Metric],
    output: OutputChoice = None,
    topk: int = TOPK,
) -> Scores:
    """Run `model` on `dataset` and score it against labels and the FP32 `reference` outputs."""
    outputs = run_model(model, dataset, output if output is not None else list(reference.read))
    return evaluate(outputs, reference, dataset, metrics, topk)
