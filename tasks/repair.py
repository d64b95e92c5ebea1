"""Automatic repairs of an FP32 graph before quantization, each one said out loud.

Real exported models trip ORT's quantizers in ways that have nothing to do with the model's maths:
- weights held in `Constant` nodes (Paddle and some TF exports) are invisible to the quantizers, which
  only quantize initializers: `quantize_dynamic` leaves such a MatMul in float or fails outright;
- per-channel QDQ writes `DequantizeLinear(axis=...)`, an attribute that exists only from opset 13, so a
  model exported at opset 11-12 comes out unloadable ("Unrecognized attribute: axis");
- a Gemm bias of shape [1, N] (what `quant_pre_process` writes when it fuses MatMul + Add) breaks ORT
  1.32's per-channel bias handling: `_adjust_weight_scale_for_int32_bias` raises "truth value of an
  array ... is ambiguous", and with that step disabled the written model fails at inference;
- models stored with external data need the quantizers' external-data mode;
- weights inside the branches of an `If` are invisible to the quantizers, which quantize the main graph
  only (silero-vad's stateful graph holds its whole model in `If(sr == 16000)`): when the condition
  depends only on inputs the spec feeds one fixed value (`inputs: {sr: {value: 16000}}`), the `If` is
  replaced by the branch it takes for that value.
Each repair leaves the graph's function unchanged; the FP32 baseline stays the model as given.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter
from onnx.reference import ReferenceEvaluator

from int8flow.tasks.kinds import VariantBase
from int8flow.tasks.kinds.base import PER_CHANNEL_QDQ_OPSET, QUANTIZATION_OPSET
from int8flow.tasks.model import uses_external_data

# Protobuf cannot serialise a single message over 2 GiB.
PROTOBUF_LIMIT_BYTES = 2**31 - 1


@dataclass(frozen=True)
class RepairedModel:
    path: Path
    repairs: tuple[str, ...] = field(default_factory=tuple)


def required_opset(variants: Iterable[VariantBase]) -> int:
    """The lowest default-domain opset every variant in the list can be written in."""
    return max((variant.min_opset() for variant in variants), default=0)


def default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Move tensor-valued `Constant` nodes of the main graph into initializers; returns how many.

    The output name is kept, so every consumer reads the same value; only the node goes away.
    """
    kept, moved = [], 0
    for node in graph.node:
        value = next((attribute for attribute in node.attribute if attribute.name == "value"), None)
        if (
            node.op_type == "Constant"
            and node.domain in ("", "ai.onnx")
            and value is not None
            and len(node.attribute) == 1
        ):
            tensor = numpy_helper.from_array(numpy_helper.to_array(value.t), name=node.output[0])
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(kept)
    return moved


def _condition_value(
    graph: onnx.GraphProto,
    condition: str,
    fixed: Mapping[str, np.ndarray],
    opsets: Iterable[onnx.OperatorSetIdProto],
) -> bool | None:
    """The value of `condition` when it depends only on `fixed` inputs, initializers and Constants; else None."""
    producers = {name: node for node in graph.node for name in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    needed: list[onnx.NodeProto] = []
    stack, seen = [condition], set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers or name in fixed:
            continue
        seen.add(name)
        node = producers.get(name)
        if node is None or any(attribute.type == onnx.AttributeProto.GRAPH for attribute in node.attribute):
            return None  # a graph input fed per batch, or control flow: not decidable here
        needed.append(node)
        stack.extend(input_name for input_name in node.input if input_name)
    used = {name for node in needed for name in node.input}
    inputs = [name for name in fixed if name in used]
    try:
        evaluator = ReferenceEvaluator(
            helper.make_model(
                helper.make_graph(
                    list(reversed(needed)),
                    "condition",
                    [
                        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(fixed[name].dtype), None)
                        for name in inputs
                    ],
                    [helper.make_tensor_value_info(condition, onnx.TensorProto.BOOL, None)],
                    [initializers[name] for name in used if name in initializers],
                ),
                opset_imports=list(opsets),
            )
        )
        results = evaluator.run(None, {name: fixed[name] for name in inputs})
    except Exception:  # noqa: BLE001 - anything the reference evaluator cannot do leaves the If alone
        return None
    value = np.asarray(results[0]) if isinstance(results, list) and results else np.asarray([])
    return bool(value.reshape(-1)[0]) if value.size == 1 else None


def specialize_ifs(model: onnx.ModelProto, fixed: Mapping[str, np.ndarray]) -> int:
    """Replace each main-graph `If` whose condition `fixed` inputs decide by the branch it takes; returns how many."""
    graph = model.graph
    taken = 0
    for node in list(graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        value = _condition_value(graph, node.input[0], fixed, model.opset_import)
        if value is None:
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if value else "else_branch"))
        existing = {name for other in graph.node for name in other.output} | {t.name for t in graph.initializer}
        inner = {name for inner_node in branch.node for name in inner_node.output} | {
            t.name for t in branch.initializer
        }
        if inner & existing:
            continue  # a branch-local name would clash with the main graph's
        position = list(graph.node).index(node)
        replacement = list(branch.node) + [
            helper.make_node("Identity", [result.name], [output], name=f"{node.name or 'if'}_taken_{index}")
            for index, (result, output) in enumerate(zip(branch.output, node.output, strict=True))
        ]
        graph.initializer.extend(branch.initializer)
        nodes = list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes[:position] + replacement + nodes[position + 1 :])
        taken += 1
    if taken:
        _drop_dead_nodes(graph)
    return taken


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Nodes whose outputs nothing reads (the condition of an If that is gone)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
        read |= {name for node in graph.node for name in _subgraph_reads(node)}
        alive = [node for node in graph.node if any(name in read for name in node.output)]
        if len(alive) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(alive)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (subgraphs may use outer names)."""
    names: set[str] = set()
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            for inner in attribute.g.node:
                names.update(inner.input)
                names |= _subgraph_reads(inner)
    return names


def flatten_gemm_biases(graph: onnx.GraphProto) -> int:
    """Give Gemm biases of shape [1, N] the shape [N] (the same broadcast); returns how many."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    flattened = 0
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        bias = initializers[node.input[2]]
        if len(bias.dims) != 2 or bias.dims[0] != 1:
            continue
        values = numpy_helper.to_array(bias).reshape(-1)
        if readers[node.input[2]] == 1:
            bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        else:  # shared with another node: that one keeps the 2-D tensor
            name = f"{bias.name}_1d"
            graph.initializer.append(numpy_helper.from_array(values, name))
            node.input[2] = name
        flattened += 1
    return flattened


def repair_model(
    model: Path, out: Path, min_opset: int, fixed_inputs: Mapping[str, np.ndarray] | None = None
) -> RepairedModel:
    """Write a repaired copy of `model` to `out` if it needs one; otherwise return `model` untouched.
    `fixed_inputs`: inputs the spec feeds one value for every batch (they may decide an `If`)."""
    proto = onnx.load(str(model))
    repairs = []
    external = uses_external_data(model)
    if external:
        repairs.append(
            "external data: the model's tensors live in a separate file; every stage reads and writes it that way"
        )
    specialized = specialize_ifs(proto, fixed_inputs or {})
    if specialized:
        names = ", ".join(f"{name}={np.asarray(value).tolist()}" for name, value in (fixed_inputs or {}).items())
        repairs.append(
            f"{specialized} If node(s) replaced by the branch they take for {names} (the spec feeds that value to "
            "every batch), so the quantizers see the weights inside"
        )
    moved = constants_to_initializers(proto.graph)
    if moved:
        repairs.append(f"{moved} Constant node(s) turned into initializers, so the quantizers see those weights")
    flattened = flatten_gemm_biases(proto.graph)
    if flattened:
        repairs.append(
            f"{flattened} Gemm bias(es) of shape [1, N] reshaped to [N], which ORT's per-channel quantizer handles"
        )
    opset = default_opset(proto)
    if opset and opset < min_opset:
        try:
            proto = version_converter.convert_version(proto, min_opset)
        except Exception as error:  # noqa: BLE001 - the converter raises bare RuntimeErrors naming the op it cannot adapt
            repairs.append(
                f"opset {opset} -> {min_opset} conversion failed ({type(error).__name__}: {str(error).splitlines()[0]}); variants that need it will fail"
            )
        else:
            repairs.append(
                f"opset {opset} -> {min_opset} (per-channel QDQ needs DequantizeLinear's `axis`, opset {PER_CHANNEL_QDQ_OPSET})"
                if min_opset >= PER_CHANNEL_QDQ_OPSET
                else f"opset {opset} -> {min_opset} (ORT's quantizers need opset {QUANTIZATION_OPSET})"
            )
    changed = bool(specialized or moved or flattened) or default_opset(proto) != opset
    if not changed:
        return RepairedModel(model, tuple(repairs))
    out.parent.mkdir(parents=True, exist_ok=True)
    if external or proto.ByteSize() > PROTOBUF_LIMIT_BYTES:
        onnx.save(
            proto, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{out.name}.data"
        )
    else:
        onnx.save(proto, str(out))
    return RepairedModel(out, tuple(repairs))
