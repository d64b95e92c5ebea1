"""Accuracy-aware fallback: keep the nodes that quantize worst in float until the variant is accurate enough.

In the spirit of ORT's `qdq_loss_debug`: every tensor of the FP32 graph is compared with the same tensor
in the quantized model on a few calibration samples (signal-to-quantization-noise ratio, dB). A node's
quantization error is how much SQNR its own step loses: the worst SQNR among its inputs minus the SQNR
of its output. In a QDQ model a tensor's name holds the value *before* its QuantizeLinear, so the
rounding of a tensor is charged to the nodes that read it, which are exactly the nodes that must stay
in float for that tensor to stay float. Errors are accumulated sample by sample, so memory stays at one
sample's activations whatever the model size.

The loop itself: exclude the worst 1, 2, 4, ... nodes until `selection.max_drop` holds; when the
objective is latency or size (fewer float nodes is faster and smaller), bisect back towards the fewest
nodes that still pass; stop at `max_steps` or `max_seconds`. Every step is kept for the selection.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import Field

from int8flow.tasks.data import Dataset
from int8flow.tasks.evaluate import Scores, feed_for
from int8flow.tasks.kinds import VariantBase
from int8flow.tasks.options import StrictModel
from int8flow.tasks.quantize import QuantizedModel
from int8flow.tasks.select import AccuracyCheck


class AccuracyFallback(StrictModel):
    """What to do with a dynamic/static variant that misses `selection.max_drop`."""

    enabled: bool = Field(
        default=True,
        description="Keep the nodes with the largest quantization error in float, step by step, until the "
        "variant meets `selection.max_drop` or the budget runs out.",
    )
    max_steps: int = Field(default=6, ge=1, le=64, description="Most re-quantizations per variant.")
    max_seconds: float = Field(default=600.0, gt=0, le=86_400, description="Time budget per variant.")
    samples: int = Field(
        default=8, ge=1, le=1024, description="Calibration samples used to measure each tensor's quantization error."
    )


# Tensors a node reads that match FP32 exactly (graph inputs, weights) count as this clean (dB).
CLEAN_SQNR_DB = 100.0


@dataclass(frozen=True)
class NodeError:
    node: str
    op_type: str
    input_sqnr_db: float
    output_sqnr_db: float

    @property
    def loss_db(self) -> float:
        return self.input_sqnr_db - self.output_sqnr_db

    @property
    def added_noise(self) -> float:
        """Noise-to-signal power this node adds, each side capped at 1 (0 dB, no signal left).

        In linear terms an early layer going from 100 dB to a harmless 40 dB ranks behind a later one
        going from 30 dB to 0 dB, which dB lost would not do; the cap keeps nodes downstream of a
        collapse, whose inputs are noise already, from outranking the node where it happened.
        """
        return _noise_ratio(self.output_sqnr_db) - _noise_ratio(self.input_sqnr_db)


def _noise_ratio(sqnr_db: float) -> float:
    return min(1.0, 10 ** (-sqnr_db / 10))


def quantizable_nodes(graph: onnx.GraphProto, variant: VariantBase) -> list[onnx.NodeProto]:
    """Nodes of the FP32 graph the variant's quantizer may touch, minus those already excluded."""
    op_types = variant.fallback_op_types()
    excluded = set(variant.excluded_nodes())
    return [node for node in graph.node if node.op_type in op_types and node.name and node.name not in excluded]


def _tracing_session(model: Path, names: Sequence[str]) -> ort.InferenceSession:
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


def _as_consumers_see_it(graph: onnx.GraphProto) -> dict[str, str]:
    """FP32 tensor name -> the quantized model's tensor holding it as its consumers read it.

    In QDQ that is the DequantizeLinear output after the tensor's QuantizeLinear: rounding, and the
    clipping that replaces a Relu the quantizer folded away, are part of what the next node gets.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    seen = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            dequantize = next((r for r in readers.get(node.output[0], []) if r.op_type == "DequantizeLinear"), None)
            if dequantize is not None:
                seen[node.input[0]] = dequantize.output[0]
    return seen


def tensor_sqnr(
    float_model: Path, quantized_model: Path, feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """SQNR (dB) of each float tensor of the FP32 graph that the quantized model also computes, over `feeds`."""
    float_graph = onnx.load(str(float_model), load_external_data=False).graph
    quantized_graph = onnx.load(str(quantized_model), load_external_data=False).graph
    quantized_tensors = {name for node in quantized_graph.node for name in node.output}
    seen = _as_consumers_see_it(quantized_graph)
    pairs = {
        name: seen.get(name, name)
        for node in float_graph.node
        for name in node.output
        if name and seen.get(name, name) in quantized_tensors
    }
    reference, candidate = (
        _tracing_session(float_model, list(pairs)),
        _tracing_session(quantized_model, list(pairs.values())),
    )
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for feed in feeds:
        expected = dict(
            zip(
                [o.name for o in reference.get_outputs()],
                reference.run(None, feed_for(reference, dict(feed))),
                strict=True,
            )
        )
        actual = dict(
            zip(
                [o.name for o in candidate.get_outputs()],
                candidate.run(None, feed_for(candidate, dict(feed))),
                strict=True,
            )
        )
        for name, quantized_name in pairs.items():
            x, y = expected.get(name), actual.get(quantized_name)
            if x is None or y is None or x.dtype.kind != "f" or y.dtype.kind != "f" or x.shape != y.shape:
                continue
            x64 = x.astype(np.float64)
            signal[name] = signal.get(name, 0.0) + float(np.sum(x64 * x64))
            noise[name] = noise.get(name, 0.0) + float(np.sum((x64 - y.astype(np.float64)) ** 2))
    return {
        name: CLEAN_SQNR_DB
        if noise[name] == 0
        else min(CLEAN_SQNR_DB, 10 * math.log10(max(signal[name], 1e-30) / noise[name]))
        for name in signal
    }


def rank_nodes(
    float_model: Path, quantized_model: Path, variant: VariantBase, feeds: Sequence[Mapping[str, np.ndarray]]
) -> list[NodeError]:
    """The variant's quantizable nodes, the one adding the most quantization noise first.

    A tensor's error is charged to the node that computes it in the quantized model when that is
    another FP32 node (a Conv that absorbed the Relu after it), else to its FP32 producer.
    """
    sqnr = tensor_sqnr(float_model, quantized_model, feeds)
    graph = onnx.load(str(float_model), load_external_data=False).graph
    float_nodes = {node.name for node in graph.node if node.name}
    quantized_graph = onnx.load(str(quantized_model), load_external_data=False).graph
    computed_by = {name: node.name for node in quantized_graph.node for name in node.output}
    charged: dict[str, list[float]] = {}
    for node in graph.node:
        for name in node.output:
            if name in sqnr:
                owner = computed_by.get(name, node.name)
                charged.setdefault(owner if owner in float_nodes else node.name, []).append(sqnr[name])
    errors = []
    for node in quantizable_nodes(graph, variant):
        outputs = charged.get(node.name)
        if not outputs:
            continue  # its output was fused away or is not float: nothing to judge it by
        inputs = [sqnr.get(name, CLEAN_SQNR_DB) for name in node.input if name]
        errors.append(NodeError(node.name, node.op_type, min(inputs, default=CLEAN_SQNR_DB), min(outputs)))
    # Ties (nodes past a collapse add nothing measurable) go to the node nearer the clean input.
    return sorted(errors, key=lambda error: (-error.added_noise, -error.input_sqnr_db))


def next_count(tried: Mapping[int, bool], candidates: int, bisect: bool) -> int | None:
    """How many of the worst nodes to keep in float next; None when done.

    `tried` maps a count to whether it met the constraint (0 = the variant as given, which failed).
    Doubling finds a passing count quickly; bisecting then looks for fewer float nodes that still pass.
    """
    passing = [count for count, passed in tried.items() if passed]
    if not passing:
        largest = max(tried, default=0)
        if largest >= candidates:
            return None
        return min(candidates, max(1, 2 * largest))
    if not bisect:
        return None
    best = min(passing)
    below = max((count for count, passed in tried.items() if not passed and count < best), default=0)
    return (below + best) // 2 if best - below > 1 else None


@dataclass(frozen=True)
class FallbackStep:
    name: str
    variant: VariantBase
    kept_in_float: tuple[str, ...]
    quantized: QuantizedModel | None = None
    evaluation: Scores | None = None
    drop: float | None = None
    passed: bool = False
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class FallbackResult:
    ranking: tuple[NodeError, ...]
    steps: tuple[FallbackStep, ...]
    stopped: str
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> FallbackStep | None:
        """The passing step with the fewest float nodes, else the most accurate step."""
        passing = [step for step in self.steps if step.passed]
        if passing:
            return min(passing, key=lambda step: len(step.kept_in_float))
        scored = [step for step in self.steps if step.drop is not None]
        return min(scored, key=lambda step: step.drop or 0.0) if scored else None


def error_feeds(dataset: Dataset, samples: int) -> list[dict[str, np.ndarray]]:
    """The first `samples` samples, one per feed (batches may have different shapes)."""
    feeds: list[dict[str, np.ndarray]] = []
    for batch in dataset.batches:
        for index in range(batch.size):
            if len(feeds) == samples:
                return feeds
            feeds.append(batch.take(slice(index, index + 1)))
    return feeds


def accuracy_fallback(
    variant: VariantBase,
    float_model: Path,
    quantized_model: Path,
    error_data: Dataset,
    quantize_step: Callable[[VariantBase, Path], QuantizedModel],
    evaluate_step: Callable[[Path], Scores],
    check: Callable[[Scores], AccuracyCheck],
    budget: AccuracyFallback,
    bisect: bool,
    work: Path,
) -> FallbackResult:
    """Re-quantize `variant` with its worst nodes kept in float until `check(scores)` passes.

    `quantize_step(variant, out)` and `evaluate_step(path)` are the pipeline's own quantize and
    evaluate stages, so every step is made and judged exactly like any other variant.
    """
    started = time.perf_counter()
    ranking = tuple(rank_nodes(float_model, quantized_model, variant, error_feeds(error_data, budget.samples)))
    if len(ranking) < 2:
        return FallbackResult(
            ranking,
            (),
            "fewer than two quantized nodes could be compared with FP32: nothing to keep in float and still call it INT8",
        )
    tried: dict[int, bool] = {0: False}
    steps: list[FallbackStep] = []
    stopped = "all but one quantized node tried in float"
    while True:
        # With every ranked node in float the variant would be FP32 with extra steps: one stays quantized.
        count = next_count(tried, len(ranking) - 1, bisect)
        if count is None:
            if any(tried.values()):
                stopped = "constraint met" + (" with the fewest float nodes found" if bisect else "")
            break
        if len(steps) >= budget.max_steps:
            stopped = f"step budget ({budget.max_steps}) used"
            break
        if time.perf_counter() - started > budget.max_seconds:
            stopped = f"time budget ({budget.max_seconds:g} s) used"
            break
        steps.append(_step(variant, ranking[:count], quantize_step, evaluate_step, check, work))
        tried[count] = steps[-1].passed
    return FallbackResult(ranking, tuple(steps), stopped)


def _step(
    variant: VariantBase,
    worst: Sequence[NodeError],
    quantize_step: Callable[[VariantBase, Path], QuantizedModel],
    evaluate_step: Callable[[Path], Scores],
    check: Callable[[Scores], AccuracyCheck],
    work: Path,
) -> FallbackStep:
    started = time.perf_counter()
    kept = tuple(error.node for error in worst)
    name = f"{variant.label}-float{len(kept)}"
    step_variant = variant.with_excluded(kept, name)
    try:
        quantized = quantize_step(step_variant, work / name / "model.onnx")
        evaluation = evaluate_step(quantized.path)
    except Exception as error:  # noqa: BLE001 - a failed step is recorded, the search goes on
        return FallbackStep(
            name, step_variant, kept, error=f"{type(error).__name__}: {error}", seconds=time.perf_counter() - started
        )
    accuracy = check(evaluation)
    return FallbackStep(
        name,
        step_variant,
        kept,
        quantized,
        evaluation,
        accuracy.drop,
        accuracy.passed,
        seconds=time.perf_counter() - started,
    )
