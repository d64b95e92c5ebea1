"""Which ops really run in integer, measured on the graph ONNX Runtime executes.

The saved graph of a variant says what the quantizer asked for; what runs is what is left after ORT's
own optimizations (QDQ groups fused into QLinear* kernels, NCHWc/NHWC layout changes, ...). A QDQ
group ORT cannot fuse runs in float *plus* the cost of quantizing around it, and ConvInteger is a slow
im2col path, so a variant can be slower than FP32 even though its saved graph looks fully int8. This
module reads ORT's optimized graph and a node-level profile of the same session so that such a
variant is flagged, with the reason, before any latency is benchmarked.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from int8flow.tasks.evaluate import feed_for

OpClass = Literal["integer", "float_compute", "qdq", "other"]
CLASSES: tuple[OpClass, ...] = ("integer", "float_compute", "qdq", "other")
_LABELS: dict[OpClass, str] = {
    "integer": "integer",
    "float_compute": "float compute",
    "qdq": "Q/DQ",
    "other": "other",
}

# Op types only: ORT's profile names a node by its op type without the domain, so NCHWc's Conv
# (domain com.microsoft.nchwc) is "Conv" in both the graph and the trace.
INTEGER_OPS = {
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
    "QLinearAdd",
    "QLinearMul",
    "QLinearConcat",
    "QLinearAveragePool",
    "QLinearGlobalAveragePool",
    "QLinearLeakyRelu",
    "QLinearSigmoid",
    "QLinearSoftmax",
    "QLinearWhere",
    "MatMulNBits",
    "GatherBlockQuantized",
    "QEmbedLayerNormalization",
    "DynamicQuantizeLSTM",
    "QLinearReduceMean",
    "NhwcMaxPool",  # ORT's CPU kernel is int8/uint8 only
}
FLOAT_COMPUTE_OPS = {
    "Conv",
    "FusedConv",
    "NhwcConv",
    "NhwcFusedConv",
    "ConvTranspose",
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "FusedGemm",
    "Einsum",
    "LSTM",
    "GRU",
    "RNN",
    "Attention",
    "MultiHeadAttention",
    "GroupQueryAttention",
}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}

# Their kernel time is that of their bodies' nodes, which the profile lists too.
_CONTROL_FLOW_OPS = {"If", "Loop", "Scan"}
_WARMUP_RUNS = 2
_QDQ_TIME_LIMIT = 0.25


class CoverageError(RuntimeError):
    pass


def op_class(op_type: str) -> OpClass:
    if op_type in INTEGER_OPS:
        return "integer"
    if op_type in FLOAT_COMPUTE_OPS:
        return "float_compute"
    if op_type in QDQ_OPS:
        return "qdq"
    return "other"


@dataclass(frozen=True)
class OpCoverage:
    """Op counts of ORT's optimized graph and the share of node time each kind of op takes."""

    counts: Mapping[OpClass, Mapping[str, int]]  # class -> op type -> nodes
    float_between_qdq: Mapping[str, int]  # float compute ops fed by a DequantizeLinear or feeding a QuantizeLinear
    time_share: Mapping[OpClass, float]  # class -> share of node time, summing to 1
    op_time_share: Mapping[str, float]  # op type -> share of node time
    node_ms_per_run: float  # summed kernel time of one run (excludes ORT's between-node overhead)
    runs: int

    def total(self, op_class: OpClass) -> int:
        return sum(self.counts[op_class].values())

    def summary(self) -> str:
        """E.g. "integer 12 ops (71% of time), float compute 3 (20%), Q/DQ 25 (6%), other 40 (3%)"."""
        first, *rest = CLASSES
        parts = [f"{_LABELS[first]} {self.total(first)} ops ({self.time_share[first]:.0%} of time)"]
        parts += [f"{_LABELS[name]} {self.total(name)} ({self.time_share[name]:.0%})" for name in rest]
        return ", ".join(parts)

    def as_metrics(self, prefix: str = "ops.") -> dict[str, float]:
        metrics: dict[str, float] = {}
        for name in CLASSES:
            metrics[f"{prefix}count.{name}"] = float(self.total(name))
            metrics[f"{prefix}time_share.{name}"] = self.time_share[name]
            metrics.update({f"{prefix}{name}.{op}": float(count) for op, count in self.counts[name].items()})
        metrics.update(
            {f"{prefix}float_between_qdq.{op}": float(count) for op, count in self.float_between_qdq.items()}
        )
        metrics.update({f"{prefix}time_share.op.{op}": share for op, share in self.op_time_share.items()})
        metrics[f"{prefix}node_ms_per_run"] = self.node_ms_per_run
        return metrics


def op_coverage(model: Path, feed: dict[str, np.ndarray], threads: int = 1, runs: int = 10) -> OpCoverage:
    """Classify the nodes of the graph ORT runs for `model` and profile `runs` runs of `feed`."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    with tempfile.TemporaryDirectory(prefix="int8flow-coverage-") as scratch:
        nodes = list(_nodes(_optimized_graph(model, threads, Path(scratch))))
        durations = _node_durations(model, feed, threads, runs, Path(scratch))
    counts: dict[OpClass, Counter[str]] = {name: Counter() for name in CLASSES}
    for node in nodes:
        counts[op_class(node.op_type)][node.op_type] += 1
    by_class: Counter[str] = Counter()
    for op_type, microseconds in durations.items():
        by_class[op_class(op_type)] += int(microseconds)
    total_us = sum(durations.values())
    return OpCoverage(
        counts={name: dict(sorted(counter.items())) for name, counter in counts.items()},
        float_between_qdq=_float_between_qdq(nodes),
        time_share={name: _share(by_class[name], total_us) for name in CLASSES},
        op_time_share={op: _share(us, total_us) for op, us in sorted(durations.items())},
        node_ms_per_run=total_us / 1000.0 / runs,
        runs=runs,
    )


def slow_int8_warnings(coverage: OpCoverage) -> list[str]:
    """Plain-language reasons why an int8 variant is likely slower than FP32 on ORT's CPU provider."""
    warnings = []
    conv_integer = coverage.counts["integer"].get("ConvInteger", 0)
    if conv_integer:
        warnings.append(
            f"{conv_integer} ConvInteger node(s): ORT runs ConvInteger as im2col + MatMulInteger, several times "
            "slower than its float Conv on x86; quantize convolutions statically (QDQ, fused to QLinearConv) "
            "or leave them out of dynamic quantization (op_types_to_quantize without Conv)."
        )
    if coverage.total("integer") == 0:
        warnings.append(
            "nothing runs in integer: ORT's optimized graph has no integer kernels, so this variant computes "
            "in float and only adds the cost of any Q/DQ around it."
        )
    if coverage.float_between_qdq:
        listed = ", ".join(f"{count} {op}" for op, count in coverage.float_between_qdq.items())
        warnings.append(
            f"ORT could not fuse {listed} between DequantizeLinear/QuantizeLinear: they run in float and also "
            "pay for the quantize/dequantize around them."
        )
    if coverage.time_share["qdq"] > _QDQ_TIME_LIMIT:
        warnings.append(
            f"quantize/dequantize nodes take {coverage.time_share['qdq']:.0%} of node time: converting between "
            "float and int8 eats much of what integer kernels save."
        )
    return warnings


def _options(threads: int) -> ort.SessionOptions:
    # Must match tasks.evaluate.session(), so the graph and profile are those of the timed session.
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _optimized_graph(model: Path, threads: int, scratch: Path) -> onnx.GraphProto:
    options = _options(threads)
    path = scratch / "optimized.onnx"
    options.optimized_model_filepath = str(path)
    # Weights go to a side file: a single protobuf cannot exceed 2 GB, and only the nodes are read.
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.onnx.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    try:
        ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise CoverageError(f"ONNX Runtime cannot load or optimize the model: {error}") from error
    return onnx.load(str(path), load_external_data=False).graph


def _node_durations(
    model: Path, feed: dict[str, np.ndarray], threads: int, runs: int, scratch: Path
) -> dict[str, float]:
    """Microseconds of kernel time per op type over the `runs` profiled runs (warm-up runs excluded)."""
    # Its own session, built exactly like evaluate.session() apart from profiling, so the shares are
    # those of the session that gets timed (not of one that also serializes its graph).
    options = _options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / "profile")
    runner = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    feed = feed_for(runner, feed)
    for _ in range(_WARMUP_RUNS + runs):
        runner.run(None, feed)
    events = json.loads(Path(runner.end_profiling()).read_text())  # the trace goes with `scratch`
    # The trace covers the whole session; profiled runs start at the first model_run after warm-up.
    run_starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    first_timed = run_starts[_WARMUP_RUNS]
    durations: Counter[str] = Counter()
    for event in events:
        is_kernel = event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
        if is_kernel and event["ts"] >= first_timed and event["args"]["op_name"] not in _CONTROL_FLOW_OPS:
            durations[event["args"]["op_name"]] += event["dur"]
    return dict(durations)


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, including those of If/Loop/Scan bodies, which the profile times too."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else attribute.graphs:
                yield from _nodes(body)


def _float_between_qdq(nodes: list[onnx.NodeProto]) -> dict[str, int]:
    producers = {output: node.op_type for node in nodes for output in node.output}
    consumers: dict[str, list[str]] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    found: Counter[str] = Counter()
    for node in nodes:
        if op_class(node.op_type) != "float_compute":
            continue
        from_dq = any(producers.get(name) == "DequantizeLinear" for name in node.input)
        to_q = any(op == "QuantizeLinear" for output in node.output for op in consumers.get(output, []))
        if from_dq or to_q:
            found[node.op_type] += 1
    return dict(sorted(found.items()))


def _share(part: float, total: float) -> float:
    return part / total if total > 0 else 0.0
