"""Accuracy-aware fallback: keep the nodes that quantize worst in float until the variant is accurate enough.

Ranking, in two passes. First, cheap: in the spirit of ORT's `qdq_loss_debug`, every tensor of the FP32
graph is compared with the same tensor in the quantized model on a few calibration samples
(signal-to-quantization-noise ratio, dB); a node's error is how much SQNR its own step loses (the worst
SQNR among its inputs minus its output's). In a QDQ model a tensor's name holds the value *before* its
QuantizeLinear, so the rounding of a tensor is charged to the nodes that read it. Second, measured (QDQ
variants): the worst nodes by that ranking are each put back in float *in the quantized model itself*
(their inputs read the float tensors, their weights the FP32 ones: no re-quantization), and the gain in
the model outputs' SQNR is measured on the same samples. Nodes that measurably help come first, in the
order of their gain; nodes whose float copy does not help come last.

The search is monotone: starting from the variant as made, add the next 1, 2, 4, ... nodes of that order
to the float set; a step is kept only if the selection metric's drop gets smaller, else it is discarded
and its nodes are not tried again. It stops when `selection.max_drop` holds, when the candidates run
out, or at `max_steps` / `max_seconds`, and ends with the best step found. When the objective is latency
or size, a passing set is then trimmed: bisection towards the fewest of its nodes that still pass.

Why keeping a node in float could make a model *worse*, and no longer does: ORT's `WeightBiasQuantization`
transformer re-quantizes, per tensor and at load time, a float Conv/MatMul/Gemm between a DequantizeLinear
and a QuantizeLinear; `kinds/_ort.read_float_inputs` makes kept nodes read float tensors, which it skips.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from pydantic import Field

from int8flow.tasks.data import Dataset
from int8flow.tasks.evaluate import Scores, feed_for
from int8flow.tasks.kinds import VariantBase
from int8flow.tasks.kinds._ort import float_inputs
from int8flow.tasks.model import tracing_session, uses_external_data
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
# Tensors traced per pass of the two models: every traced tensor of a feed is alive at once, and the OCR
# recognizer's 385 of its widest line (579 px) came to 1.1 GB with both models (a fallback per variant,
# two at a time: 2.7 GB in all). A pass recomputes the graph up to its last tensor; passes of 96 took one
# variant from 1,215 MB in 2.5 s to 552 MB in 5.0 s (docs/benchmarks.md, Run cost 2026-12-03).
TENSORS_PER_PASS = 96


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
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    names = list(pairs)  # in the FP32 graph's (topological) order
    for start in range(0, len(names), TENSORS_PER_PASS):
        traced = {name: pairs[name] for name in names[start : start + TENSORS_PER_PASS]}
        reference = tracing_session(float_model, list(traced))
        candidate = tracing_session(quantized_model, list(traced.values()))
        for feed in feeds:
            _add_noise(reference, candidate, traced, feed, signal, noise)
    return {
        name: CLEAN_SQNR_DB
        if noise[name] == 0
        else min(CLEAN_SQNR_DB, 10 * math.log10(max(signal[name], 1e-30) / noise[name]))
        for name in signal
    }


def _add_noise(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    traced: Mapping[str, str],
    feed: Mapping[str, np.ndarray],
    signal: dict[str, float],
    noise: dict[str, float],
) -> None:
    """Add one feed's signal and noise energy of each `traced` tensor (FP32 name -> quantized name). The
    feed's tensors are freed on return, before the next feed runs."""
    expected, actual = _traced(reference, feed), _traced(candidate, feed)
    for name, quantized_name in traced.items():
        x, y = expected.get(name), actual.get(quantized_name)
        if x is None or y is None or x.dtype.kind != "f" or y.dtype.kind != "f" or x.shape != y.shape:
            continue
        x64 = x.astype(np.float64)
        signal[name] = signal.get(name, 0.0) + float(np.sum(x64 * x64))
        noise[name] = noise.get(name, 0.0) + float(np.sum((x64 - y.astype(np.float64)) ** 2))


def _traced(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feed_for(session, dict(feed))), strict=True)
    )


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


def _surgery_target(graph: onnx.GraphProto, name: str) -> onnx.NodeProto | None:
    return next((node for node in graph.node if node.name == name), None)


def floated_copy(quantized: onnx.ModelProto, float_graph: onnx.GraphProto, node_name: str) -> onnx.ModelProto | None:
    """The QDQ model with one node put back in float, without re-quantizing: its activations read the float
    tensor before their Q/DQ, its weights and bias the FP32 graph's. None when the node is not there as such
    (fused or renamed by the quantizer, or not a QDQ model)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(quantized)
    graph = copy.graph
    node = _surgery_target(graph, node_name)
    original = _surgery_target(float_graph, node_name)
    if node is None or original is None or len(node.input) != len(original.input):
        return None
    changed = float_inputs(graph, {node_name}, float_graph) > 0
    producer = {name: producer for producer in graph.node for name in producer.output}
    present = {tensor.name for tensor in graph.initializer}
    float_initializers = {tensor.name: tensor for tensor in float_graph.initializer}
    for index, name in enumerate(node.input):
        dequantize = producer.get(name)
        if (
            dequantize is None
            or dequantize.op_type != "DequantizeLinear"
            or original.input[index] not in float_initializers
        ):
            continue  # activations were handled above; this is a weight or bias stored as integers
        if original.input[index] not in present:
            graph.initializer.append(float_initializers[original.input[index]])
        node.input[index] = original.input[index]
        changed = True
    return copy if changed else None


def _output_sqnr(session: ort.InferenceSession, expected: Sequence[Sequence[np.ndarray]], feeds) -> float:
    signal = noise = 0.0
    for feed, want in zip(feeds, expected, strict=True):
        for got, reference in zip(session.run(None, feed_for(session, dict(feed))), want, strict=True):
            if reference.dtype.kind != "f" or got.shape != reference.shape:
                continue
            reference64 = reference.astype(np.float64)
            signal += float(np.sum(reference64 * reference64))
            noise += float(np.sum((got.astype(np.float64) - reference64) ** 2))
    return CLEAN_SQNR_DB if noise == 0 else min(CLEAN_SQNR_DB, 10 * math.log10(max(signal, 1e-30) / noise))


def measure_gains(
    float_model: Path,
    quantized_model: Path,
    candidates: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    seconds: float,
) -> dict[str, float]:
    """For each candidate node (in order, while `seconds` last): how many dB of output SQNR the quantized
    model gains with that node alone back in float. Empty for models the surgery does not apply to."""
    started = time.perf_counter()
    quantized = onnx.load(str(quantized_model), load_external_data=False)
    if uses_external_data(quantized_model) or not any(n.op_type == "DequantizeLinear" for n in quantized.graph.node):
        return {}
    float_graph = onnx.load(str(float_model)).graph
    reference = _plain_session(float_model.read_bytes())
    expected = [reference.run(None, feed_for(reference, dict(feed))) for feed in feeds]
    base = _output_sqnr(_plain_session(quantized.SerializeToString()), expected, feeds)
    gains: dict[str, float] = {}
    for name in candidates:
        if time.perf_counter() - started > seconds:
            break
        floated = floated_copy(quantized, float_graph, name)
        if floated is None:
            continue
        try:
            gains[name] = _output_sqnr(_plain_session(floated.SerializeToString()), expected, feeds) - base
        except Exception:  # noqa: BLE001 - a copy ORT will not load says nothing about the node
            continue
    return gains


def _plain_session(model: bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def search_order(ranking: Sequence[NodeError], gains: Mapping[str, float]) -> list[str]:
    """Nodes measured to help, most first; then those not measured, by noise; then those that did not help."""
    helped = sorted((name for name, gain in gains.items() if gain > MIN_GAIN_DB), key=lambda name: -gains[name])
    unmeasured = [error.node for error in ranking if error.node not in gains]
    useless = [error.node for error in ranking if error.node in gains and gains[error.node] <= MIN_GAIN_DB]
    return [*helped, *unmeasured, *useless]


MIN_GAIN_DB = 0.05  # below this a node's float copy does not measurably help
MEASURED = 32  # nodes whose gain is measured, at most (the worst by the cheap ranking)


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
    kept: bool = False  # part of the search's path: it made the variant more accurate (or, trimming, still passes)
    why: str = ""  # why it was kept or discarded


@dataclass(frozen=True)
class FallbackResult:
    ranking: tuple[NodeError, ...]
    steps: tuple[FallbackStep, ...]
    stopped: str
    notes: list[str] = field(default_factory=list)
    gains: Mapping[str, float] = field(default_factory=dict)  # node -> measured output SQNR gain in float (dB)

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
    base_drop: float | None = None,
) -> FallbackResult:
    """Re-quantize `variant` with more and more nodes kept in float, keeping only steps that improve,
    until `check(scores)` passes. `quantize_step(variant, out)` and `evaluate_step(path)` are the
    pipeline's own stages, so every step is made and judged exactly like any other variant.
    `base_drop`: the variant's own drop (measured again when not given)."""
    started = time.perf_counter()
    feeds = error_feeds(error_data, budget.samples)
    ranking = tuple(rank_nodes(float_model, quantized_model, variant, feeds))
    if len(ranking) < 2:
        return FallbackResult(
            ranking,
            (),
            "fewer than two quantized nodes could be compared with FP32: nothing to keep in float and still call it INT8",
        )
    candidates = [error.node for error in ranking[: len(ranking) - 1]]  # one node stays quantized
    gains = measure_gains(float_model, quantized_model, candidates[:MEASURED], feeds, budget.max_seconds / 4)
    order = [name for name in search_order(ranking, gains) if name in candidates]
    if base_drop is None:
        base_drop = check(evaluate_step(quantized_model)).drop
    search = _Search(variant, quantize_step, evaluate_step, check, work, budget, started)
    kept = search.grow(order, base_drop)
    if search.passed and bisect:
        search.trim(kept)
    return FallbackResult(ranking, tuple(search.steps), search.stopped, gains=gains)


class _Search:
    """The steps of one fallback: growing the float set (monotone), then trimming a passing one."""

    def __init__(
        self,
        variant: VariantBase,
        quantize_step: Callable[[VariantBase, Path], QuantizedModel],
        evaluate_step: Callable[[Path], Scores],
        check: Callable[[Scores], AccuracyCheck],
        work: Path,
        budget: AccuracyFallback,
        started: float,
    ) -> None:
        self.variant, self.quantize_step, self.evaluate_step, self.check = variant, quantize_step, evaluate_step, check
        self.work, self.budget, self.started = work, budget, started
        self.steps: list[FallbackStep] = []
        self.stopped = ""
        self.passed = False

    def _try(self, nodes: Sequence[str]) -> FallbackStep:
        """One step; named by its float-node count, made unique (a count can come back with other nodes)."""
        name = f"{self.variant.label}-float{len(nodes)}"
        if any(step.name == name for step in self.steps):
            name = f"{name}-{len(self.steps) + 1}"
        return _step(self.variant, nodes, self.quantize_step, self.evaluate_step, self.check, self.work, name)

    def _out_of_budget(self) -> bool:
        if len(self.steps) >= self.budget.max_steps:
            self.stopped = f"step budget ({self.budget.max_steps}) used"
            return True
        if time.perf_counter() - self.started > self.budget.max_seconds:
            self.stopped = f"time budget ({self.budget.max_seconds:g} s) used"
            return True
        return False

    def grow(self, order: Sequence[str], base_drop: float) -> list[str]:
        kept: list[str] = []
        drop, position, size = base_drop, 0, 1
        while position < len(order):
            if self._out_of_budget():
                return kept
            chunk = list(order[position : position + size])
            position, size = position + len(chunk), size * 2
            step = self._try([*kept, *chunk])
            better = step.drop is not None and (step.passed or step.drop < drop)
            why = (
                f"drop {step.drop:.4g} < {drop:.4g}: kept"
                if better and step.drop is not None
                else f"not better than {drop:.4g}: discarded, its {len(chunk)} node(s) not tried again"
            )
            self.steps.append(replace(step, kept=better, why=why))
            if better:
                kept, drop = [*kept, *chunk], step.drop or 0.0
                if step.passed:
                    self.passed, self.stopped = True, "constraint met"
                    return kept
        self.stopped = "every candidate node tried"
        return kept

    def trim(self, kept: Sequence[str]) -> None:
        """Fewer float nodes is faster and smaller: bisect on prefixes of the passing set."""
        previous = [len(step.kept_in_float) for step in self.steps if step.kept and not step.passed]
        low, high = max(previous, default=0), len(kept)
        while high - low > 1:
            if self._out_of_budget():
                self.stopped = f"constraint met; trimming stopped at the {self.stopped}"
                return
            middle = (low + high) // 2
            step = self._try(kept[:middle])
            why = "trimmed: still passes" if step.passed else "trimmed too far: fails"
            self.steps.append(replace(step, kept=step.passed, why=why))
            low, high = (low, middle) if step.passed else (middle, high)
        self.stopped = "constraint met with the fewest float nodes found"


def _step(
    variant: VariantBase,
    worst: Sequence[str],
    quantize_step: Callable[[VariantBase, Path], QuantizedModel],
    evaluate_step: Callable[[Path], Scores],
    check: Callable[[Scores], AccuracyCheck],
    work: Path,
    name: str | None = None,
) -> FallbackStep:
    started = time.perf_counter()
    kept = tuple(worst)
    name = name or f"{variant.label}-float{len(kept)}"
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
