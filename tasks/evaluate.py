"""Run a model over the evaluation data and score it against labels and against FP32 outputs."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from flows.spec import Metric, resolve_callable
from tasks.data import Dataset


class EvaluationError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelOutputs:
    """The evaluated output of every batch, in dataset order."""

    output_name: str
    batches: tuple[np.ndarray, ...]
    seconds: float


@dataclass(frozen=True)
class Evaluation:
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
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
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


def evaluate(
    outputs: ModelOutputs, reference: ModelOutputs, dataset: Dataset, metrics: Sequence[Metric]
) -> Evaluation:
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
            scores["mre"] = float(np.sum(np.abs(_flat(candidate) - _flat(baseline))) / max(np.sum(np.abs(_flat(baseline))), 1e-12))
    return Evaluation(metrics=scores, samples=dataset.samples, seconds=time.perf_counter() - started)


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
    function = resolve_callable(str(metric.function))
    try:
        return float(function(list(outputs.batches), list(reference.batches), dataset.labels()))
    except Exception as error:
        raise EvaluationError(f"metric {metric.name} ({metric.function}) raised {type(error).__name__}: {error}") from error


def evaluate_model(
    model: Path, dataset: Dataset, reference: ModelOutputs, metrics: Sequence[Metric], output: str | None = None
) -> Evaluation:
    """Run `model` on `dataset` and score it against labels and the FP32 `reference` outputs."""
    outputs = run_model(model, dataset, output or reference.output_name)
    return evaluate(outputs, reference, dataset, metrics)
