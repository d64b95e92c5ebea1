"""What ORT's dynamic and static quantizers both need from us."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx


def extra_options(model: Path, options: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """ORT's quantizers type every tensor with ONNX shape inference, which cannot type contrib ops
    (Attention, BiasGelu, ...): "Unable to find data type for weight_name". Fused graphs hold float
    tensors, so float is the right default there."""
    chosen = dict(options)
    graph = onnx.load(str(model), load_external_data=False).graph
    if "DefaultTensorType" not in chosen and any(node.domain == "com.microsoft" for node in graph.node):
        chosen["DefaultTensorType"] = onnx.TensorProto.FLOAT
        return chosen, ["contrib ops in the graph: DefaultTensorType=FLOAT for tensors shape inference cannot type"]
    return chosen, []
