"""What ORT's dynamic and static quantizers both need from us."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx

from int8flow.tasks.hardware import CHANNEL_AXIS, WHERE_NEEDED, ReduceRange, channel_axis, saturating_weights


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


def weight_ranges(
    model: Path,
    reduce_range: ReduceRange | None,
    mode: Literal["dynamic", "static"],
    per_channel: bool,
    options: dict[str, Any],
    excluded: Sequence[str] = (),
    activation_type: str | None = None,
    weight_type: str | None = None,
) -> tuple[bool, dict[str, Any], list[str]]:
    """`reduce_range` for ORT's quantizer, and the `extra_options` that carry it: for `where_needed`,
    8-bit weights except those whose pairs can saturate the AVX2 u8s8 kernels, which get 7-bit through
    ORT's per-tensor `TensorQuantOverrides` (per channel: one override with ORT's channel axis)."""
    if reduce_range != WHERE_NEEDED:
        return bool(reduce_range), options, []
    if (activation_type or "QUInt8") != "QUInt8" or (weight_type or "QInt8") != "QInt8":
        return False, options, ["reduce_range where_needed: not u8 activations with s8 weights, nothing saturates"]
    graph = onnx.load(str(model), load_external_data=False).graph
    found = saturating_weights(graph, mode, per_channel, excluded, model.parent)
    overrides = {name: list(entries) for name, entries in options.get("TensorQuantOverrides", {}).items()}
    readers = {node.name: node for node in graph.node}
    ranks = {tensor.name: len(tensor.dims) for tensor in graph.initializer}
    for weight, node_name in found.items():
        if weight not in overrides:  # the spec's own override wins
            axis = channel_axis(readers[node_name], mode, per_channel, ranks[weight])
            overrides[weight] = [{"reduce_range": True} | ({} if axis is None else {"axis": axis})]
    weights = {node.input[1] for node in graph.node if len(node.input) > 1 and node.op_type in CHANNEL_AXIS}
    note = (
        f"reduce_range where_needed: 7-bit weights for {len(found)} weight(s) whose 8-bit pairs could saturate "
        f"ORT's AVX2 u8s8 kernels, 8-bit for the other {max(len(weights - set(found)), 0)}"
    )
    chosen = dict(options)
    if overrides:
        chosen["TensorQuantOverrides"] = overrides
    return False, chosen, [note]


FOLDED_ACTIVATIONS = ("Relu", "Clip")  # ORT's QDQ quantizer folds these into the clipping of a QuantizeLinear


def float_tensor(
    name: str, quantized: onnx.GraphProto, float_graph: onnx.GraphProto
) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The float value FP32 had for tensor `name` of the QDQ model: `name` itself, or, where the quantizer
    folded a Relu/Clip into the QuantizeLinear (the tensor is then the value *before* the activation),
    that activation applied again (returned as a node to add, with the initializers it reads)."""
    float_producer = next((node for node in float_graph.node if name in node.output), None)
    quantized_producer = next((node for node in quantized.node if name in node.output), None)
    if (
        float_producer is None
        or float_producer.op_type not in FOLDED_ACTIVATIONS
        or (quantized_producer is not None and quantized_producer.op_type == float_producer.op_type)
    ):
        return name, [], []
    activation = onnx.NodeProto()
    activation.CopyFrom(float_producer)
    activation.name = f"{float_producer.name or name}_kept_float"
    activation.input[0] = name
    del activation.output[:]
    activation.output.append(f"{name}_kept_float")
    initializers = {tensor.name: tensor for tensor in float_graph.initializer}
    present = {tensor.name for tensor in quantized.initializer}
    needed = [initializers[i] for i in activation.input[1:] if i in initializers and i not in present]
    return activation.output[0], [activation], needed


def read_float_inputs(model: Path, nodes: Sequence[str], float_model: Path) -> int:
    """Make the QDQ model's `nodes` (kept in float) read each quantized activation as the float tensor
    FP32 had, not its QuantizeLinear -> DequantizeLinear copy; returns how many inputs changed.

    Why: ORT's `WeightBiasQuantization` graph transformer (level 1, on by default) finds a float Conv,
    MatMul or Gemm whose input comes from a DequantizeLinear and whose output goes to a QuantizeLinear,
    and quantizes its weights per tensor at load time, so that it fuses. A node the quantizer was told to
    keep in float was then silently quantized again, coarser than any variant asked for: on PP-OCRv4,
    keeping its worst Conv "in float" took exact match from 0.75 to 0.31, and 0.73 with this rewrite.
    Reading the float tensor also keeps the rounding of the input out of a node meant to stay float."""
    if not nodes:
        return 0
    proto = onnx.load(str(model), load_external_data=False)
    changed = float_inputs(proto.graph, set(nodes), onnx.load(str(float_model), load_external_data=False).graph)
    if changed:
        onnx.save(proto, str(model))
    return changed


def float_inputs(graph: onnx.GraphProto, nodes: set[str], float_graph: onnx.GraphProto) -> int:
    """`read_float_inputs` on a graph in memory."""
    producer = {name: node for node in graph.node for name in node.output}
    changed = 0
    added: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.name not in nodes:
            continue
        for index, name in enumerate(node.input):
            dequantize = producer.get(name)
            if dequantize is None or dequantize.op_type != "DequantizeLinear":
                continue
            quantize = producer.get(dequantize.input[0])
            if quantize is None or quantize.op_type != "QuantizeLinear":
                continue  # a weight stored as integers: nothing float to read
            value, extra_nodes, extra_initializers = float_tensor(quantize.input[0], graph, float_graph)
            if extra_nodes and not any(value in existing.output for existing in added):
                added += extra_nodes
                initializers += extra_initializers
            node.input[index] = value
            changed += 1
    if changed:
        _insert_after_producers(graph, added)
        graph.initializer.extend(initializers)
        _drop_unread_qdq(graph)
    return changed


def _insert_after_producers(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Add `nodes`, each right after the node that computes its input (the graph stays sorted)."""
    for new in nodes:
        position = next((i for i, node in enumerate(graph.node) if new.input[0] in node.output), -1)
        graph.node.insert(position + 1, new)


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` reads, also from inside its If/Loop/Scan bodies, which may read
    the outer graph's tensors by name (silero-vad's inlined If branch reads outer initializers)."""
    read: set[str] = set()
    for node in graph.node:
        read.update(node.input)
        for attribute in node.attribute:
            for body in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                read |= _read_names(body)
    return read


def _drop_unread_qdq(graph: onnx.GraphProto) -> None:
    """Q/DQ nodes nothing reads any more, and the scales and zero points only they read."""
    while True:
        read = _read_names(graph) | {output.name for output in graph.output}
        dead = [
            node
            for node in graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in node.output)
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = _read_names(graph)
    unread = [tensor for tensor in graph.initializer if tensor.name not in read]
    for tensor in unread:
        graph.initializer.remove(tensor)
