"""Run a model over the evaluation data and score it against labels and against FP32 outputs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from pydantic import Field, ValidationInfo, field_validator, model_validator

from int8flow.tasks.data import Dataset, DataSource
from int8flow.tasks.options import CALLABLE_PATTERN, StrictModel, WithUserCode, check_callable
from int8flow.tasks.usercode import call_user

BUILTIN_METRICS: dict[str, str] = {
    "top1": "top-1 accuracy of argmax(output) against the labels (needs labels)",
    "cosine": "mean cosine similarity of each sample's output vs the FP32 model's",
    "mae": "mean absolute error vs the FP32 model's output",
    "mre": "relative error vs FP32: sum |output - fp32| / sum |fp32|",
    "nn_agreement": "share of samples whose nearest other sample (cosine of outputs) is the same as "
    "under FP32: retrieval agreement for embedding models",
}
LOWER_IS_BETTER = {"mae", "mre"}


class Metric(WithUserCode):
    """A built-in metric by name (`top1`, `cosine`, ...) or a user metric `module:function`."""

    name: str = Field(max_length=64, description="Built-in metric name, or the name a user metric is logged under.")
    function: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="User metric `module:function(outputs, reference_outputs, labels) -> float`; "
        "outputs are lists of arrays per batch, labels None when the data has none.",
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
        return self

    @property
    def higher_better(self) -> bool:
        if self.function is None:
            return self.name not in LOWER_IS_BETTER
        return True if self.higher_is_better is None else self.higher_is_better


class Evaluation(StrictModel):
    data: DataSource = Field(description="Evaluation inputs, with labels for `top1`.")
    metrics: list[Metric] = Field(
        default_factory=lambda: [Metric.model_validate("cosine")],
        min_length=1,
        max_length=32,
        description="Metrics computed for FP32 and every variant; the first one drives selection "
        "unless `selection.metric` says otherwise.",
    )
    output: str | None = Field(default=None, description="Model output the metrics read; default: the first output.")

    @model_validator(mode="after")
    def _unique_names(self) -> Evaluation:
        names = [metric.name for metric in self.metrics]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"metric names must be unique: {', '.join(duplicates)}")
        return self


class EvaluationError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelOutputs:
    """The evaluated output of every batch, in dataset order."""

    output_name: str
    batches: tuple[np.ndarray, ...]
    seconds: float


@dataclass(frozen=True)
class Scores:
    """One model's metric values on the evaluation data."""

    metrics: dict[str, float]
    samples: int
    seconds: float


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


def run_model(model: Path, dataset: Dataset, output: str | None = None, threads: int = 1) -> ModelOutputs:
    started = time.perf_counter()
    try:
        runner = session(model, threads)
    except Exception as error:
        raise EvaluationError(f"ONNX Runtime cannot load the model: {error}") from error
    names = [value.name for value in runner.get_outputs()]
    output_name = output or names[0]
    if output_name not in names:
        raise EvaluationError(f"model has no output {output_name!r}; outputs: {names}")
    try:
        batches = tuple(
            _widened(np.asarray(runner.run([output_name], feed_for(runner, batch.inputs))[0]))
            for batch in dataset.batches
        )
    except Exception as error:
        raise EvaluationError(f"inference failed: {error}") from error
    return ModelOutputs(output_name=output_name, batches=batches, seconds=time.perf_counter() - started)


def _widened(output: np.ndarray) -> np.ndarray:
    return output.astype(np.float32) if output.dtype == np.float16 else output


def evaluate(outputs: ModelOutputs, reference: ModelOutputs, dataset: Dataset, metrics: Sequence[Metric]) -> Scores:
    """Score `outputs` with each metric; `reference` are the FP32 model's outputs on the same data."""
    started = time.perf_counter()
    scores: dict[str, float] = {}
    candidate = [batch.astype(np.float64) for batch in outputs.batches]
    baseline = [batch.astype(np.float64) for batch in reference.batches]
    for metric in metrics:
        if metric.function is not None:
            scores[metric.name] = _user_metric(metric, outputs, reference, dataset)
        elif metric.name == "top1":
            scores["top1"] = top1(candidate, dataset)
        elif metric.name == "cosine":
            similarity = cosine_per_sample(candidate, baseline)
            scores["cosine"] = float(similarity.mean())
            scores["cosine_min"] = float(similarity.min())
        elif metric.name == "mae":
            scores["mae"] = float(np.mean(np.abs(_flat(candidate) - _flat(baseline))))
        elif metric.name == "nn_agreement":
            scores["nn_agreement"] = nearest_neighbour_agreement(candidate, baseline)
        elif metric.name == "mre":
            scores["mre"] = float(
                np.sum(np.abs(_flat(candidate) - _flat(baseline))) / max(np.sum(np.abs(_flat(baseline))), 1e-12)
            )
    return Scores(metrics=scores, samples=dataset.samples, seconds=time.perf_counter() - started)


def top1(outputs: list[np.ndarray], dataset: Dataset) -> float:
    labels = dataset.labels()
    if labels is None:
        raise EvaluationError("metric top1 needs labels, and the evaluation data has none")
    predicted = np.concatenate([np.argmax(batch.reshape(len(batch), -1), axis=-1) for batch in outputs])
    if len(predicted) != len(labels):
        raise EvaluationError(f"{len(predicted)} predictions for {len(labels)} labels")
    return float(np.mean(predicted == labels.reshape(-1)))


def cosine_per_sample(outputs: list[np.ndarray], reference: list[np.ndarray]) -> np.ndarray:
    candidate = np.concatenate([batch.reshape(len(batch), -1) for batch in outputs])
    baseline = np.concatenate([batch.reshape(len(batch), -1) for batch in reference])
    norms = np.linalg.norm(candidate, axis=1) * np.linalg.norm(baseline, axis=1)
    return np.sum(candidate * baseline, axis=1) / np.maximum(norms, 1e-12)


def nearest_neighbour_agreement(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Share of samples whose nearest other sample (by cosine) is the same under both models."""

    def neighbours(batches: list[np.ndarray]) -> np.ndarray:
        vectors = np.concatenate([batch.reshape(len(batch), -1) for batch in batches])
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        similarity = vectors @ vectors.T
        np.fill_diagonal(similarity, -np.inf)
        return np.argmax(similarity, axis=1)

    if sum(len(batch) for batch in reference) < 2:
        raise EvaluationError("nn_agreement needs at least two evaluation samples")
    return float(np.mean(neighbours(outputs) == neighbours(reference)))


def _flat(batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([batch.reshape(-1) for batch in batches])


def _user_metric(metric: Metric, outputs: ModelOutputs, reference: ModelOutputs, dataset: Dataset) -> float:
    reference_name = str(metric.function)
    function = metric.load(reference_name)
    value = call_user(reference_name, function, list(outputs.batches), list(reference.batches), dataset.labels())
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise EvaluationError(
            f"metric {metric.name} ({reference_name}) returned {type(value).__name__}, not a number"
        ) from error


def evaluate_model(
    model: Path, dataset: Dataset, reference: ModelOutputs, metrics: Sequence[Metric], output: str | None = None
) -> Scores:
    """Run `model` on `dataset` and score it against labels and the FP32 `reference` outputs."""
    outputs = run_model(model, dataset, output or reference.output_name)
    return evaluate(outputs, reference, dataset, metrics)
