"""Which ops of a variant's graph are quantized, counted by type."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

# Ops that compute in integer (or int4 weights) by themselves.
INTEGER_OPS = {
    "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "QGemm", "QAttention", "QLinearAdd", "QLinearMul", "QLinearConcat",
    "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearLeakyRelu", "QLinearSigmoid",
    "QLinearSoftmax", "QLinearWhere", "MatMulNBits", "GatherBlockQuantized", "QEmbedLayerNormalization",
}


def quantized_op_counts(model: Path) -> dict[str, int]:
    """Integer ops by type, plus `qdq.<Op>` for float ops fed by DequantizeLinear (QDQ format)."""
    graph = onnx.load(str(model), load_external_data=False).graph
    producers = {output: node for node in graph.node for output in node.output}
    counts: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            counts[node.op_type] += 1
        elif node.op_type not in {"QuantizeLinear", "DequantizeLinear"} and node.input:
            first = producers.get(node.input[0])
            if first is not None and first.op_type == "DequantizeLinear":
                counts[f"qdq.{node.op_type}"] += 1
    counts["total"] = sum(counts.values())
    return dict(sorted(counts.items()))
