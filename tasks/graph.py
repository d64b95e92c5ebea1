"""Which ops of a variant's graph are quantized, counted by type."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
from onnxruntime.quantization.registry import QDQRegistry

# Ops that take part in a QDQ group only to pass quantized data through (no compute of their own).
_DATA_MOVEMENT = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "Split", "Resize", "Concat", "Slice", "Expand", "Pad"}
# ORT's CPU provider also fuses these QDQ groups into QLinear* kernels (QLinearAdd, QLinearMul, ...).
_CPU_QDQ_FUSIONS = {"Add", "Mul", "GlobalAveragePool", "Softmax", "Sigmoid", "LeakyRelu"}
QDQ_FUSABLE_OPS = (set(QDQRegistry) | _CPU_QDQ_FUSIONS) - _DATA_MOVEMENT

# Ops that compute in integer (or int4 weights) by themselves.
INTEGER_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid",
    "QLinearSoftmax", "QLinearWhere", "MatMulNBits", "GatherBlockQuantized", "QEmbedLayerNormalization",
}


def quantized_op_counts(model: Path) -> dict[str, int]:
    """Integer ops by type, plus `qdq.<Op>` for QDQ node groups ORT can fuse into an integer kernel.

    A QDQ group counts when the op type has an ORT QDQ kernel, its first input comes from a
    DequantizeLinear and its output goes to a QuantizeLinear; ops merely wrapped in DQ/Q (such as
    HardSigmoid) still run in float and are not counted.
    """
    graph = onnx.load(str(model), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] += 1
        elif node.op_type in QDQ_FUSABLE_OPS and node.input and node.output:
            first = producers.get(node.input[0])
            outputs_to = consumers.get(node.output[0], [])
            if first is not None and first.op_type == "DequantizeLinear" and outputs_to and all(
                consumer.op_type == "QuantizeLinear" for consumer in outputs_to
            ):
                counts[f"qdq.{node.op_type}"] += 1
    counts["total"] = sum(counts.values())
    return dict(sorted(counts.items()))
