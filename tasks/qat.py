"""Quantization-aware training: fake-quantize a PyTorch model, fine-tune it, export QDQ ONNX.

Built on PyTorch's core fake-quantize ops (`torch.fake_quantize_per_tensor_affine`,
`fake_quantize_per_channel_affine` and the LSQ op `_fake_quantize_learnable_per_tensor_affine`): the
forward pass rounds like INT8, the backward pass goes straight through, weights stay FP32, and the
frozen ops export to ONNX QuantizeLinear/DequantizeLinear. Why not a QAT library: torch.ao's eager QAT
is deprecated and its default qconfig does not export; torchao has no per-tensor activation scheme
that exports to ONNX; brevitas and nvidia-modelopt are heavy and their QDQ graphs are not laid out
for ORT's CPU fusions. See the README.

The fake quantization copies where ORT's static QDQ quantizer puts Q/DQ, so ORT fuses the exported
graph into the same integer kernels a post-training variant gets:
- a layer's input: per-tensor, asymmetric (or symmetric) with a learned scale;
- its weight: symmetric int8, per output channel or per tensor, 7-bit values with `reduce_range`;
- its output (`quantize_outputs`): a MatMul's before its bias is added (QLinearMatMul), a Conv's or a
  2-D Linear's (Gemm) after it, with a ReLU that directly follows in an `nn.Sequential` fused in.
After export, weights become int8 initializers and Conv/Gemm biases int32 ones, as ORT writes them.

No Prefect, no MLflow: progress goes to an `on_step` callback.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from int8flow.tasks.data import Batch
from int8flow.tasks.kinds.qat import QatVariant
from int8flow.tasks.sources import HuggingFaceModelSource, TorchSource

ACTIVATION_RANGES = {"QUInt8": (0, 255), "QInt8": (-128, 127)}


class QatError(RuntimeError):
    pass


@dataclass(frozen=True)
class StepLog:
    step: int
    loss: float
    seconds: float  # since training started


@dataclass
class QatResult:
    variant: str
    path: Path  # the trained QDQ model
    untrained_path: Path | None  # the calibrated, untrained QDQ model (`compare_untrained`)
    checkpoint: Path  # the fine-tuned state dict, fake-quant scales included
    size_bytes: int
    untrained_size_bytes: int | None
    seconds: float  # whole stage
    train_seconds: float
    steps: list[StepLog] = field(default_factory=list)
    planned_steps: int = 0
    stopped: str = ""
    quantized_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _torch():
    from int8flow.tasks.export import import_torch

    return import_torch(QatError, "a qat variant")


# -- fake quantization -------------------------------------------------------------------------------


def _modules():
    _torch()  # the [torch] extra, or QatError saying so
    from int8flow.tasks import qat_layers

    return qat_layers.ActivationQuantizer, qat_layers.QuantizedLayer


def prepare(module, variant: QatVariant, percentile: float = 99.999) -> list[str]:
    """Swap the chosen layers of `module` for fake-quantized ones, in place; return their names."""
    torch = _torch()
    nn = torch.nn
    ActivationQuantizer, QuantizedLayer = _modules()
    types = tuple(getattr(nn, name) for name in variant.layers)
    qmin, qmax = ACTIVATION_RANGES[variant.activation_type or "QUInt8"]
    weight_max = 63 if variant.reduce_range else 127
    excluded = set(variant.modules_to_exclude)
    unknown = excluded - {name for name, _ in module.named_modules()}
    if unknown:
        raise QatError(f"modules_to_exclude names no module of the model: {', '.join(sorted(unknown))}")

    def make_quantizer():
        return ActivationQuantizer(qmin, qmax, variant.activation_symmetric, variant.calibration_method, percentile)

    swapped = []
    for parent_name, parent in list(module.named_modules()):
        children = list(parent.named_children())
        for index, (child_name, child) in enumerate(children):
            full_name = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, types) or full_name in excluded or isinstance(parent, QuantizedLayer):
                continue
            # a ReLU right after the layer in a Sequential: quantize after it, as ORT fuses Conv+Relu
            following = children[index + 1][1] if index + 1 < len(children) else None
            fused_relu = (
                isinstance(parent, nn.Sequential) and isinstance(following, nn.ReLU) and variant.quantize_outputs
            )
            setattr(
                parent,
                child_name,
                QuantizedLayer(
                    child, make_quantizer, variant.per_channel, weight_max, variant.quantize_outputs, fused_relu
                ),
            )
            if fused_relu:
                setattr(parent, children[index + 1][0], nn.Identity())
            swapped.append(full_name)
    if not swapped:
        raise QatError(f"the model has no {', '.join(variant.layers)} layer to quantize")
    return swapped


def _quantizers(module):
    ActivationQuantizer, _ = _modules()
    return [m for m in module.modules() if type(m).__name__ == ActivationQuantizer.__name__]


def _layers(module):
    return [m for m in module.modules() if type(m).__name__ == "QuantizedLayer"]


def calibrate(module, batches: Sequence[dict], input_names: Sequence[str]) -> None:
    """Record activation ranges over `batches`, then switch every quantizer to training mode."""
    torch = _torch()
    quantizers = _quantizers(module)
    for quantizer in quantizers:
        quantizer.mode = "observe"
    with torch.no_grad():
        for inputs in batches:
            module(*_tensors(inputs, input_names))
    for quantizer in quantizers:
        quantizer.start()
    _share_identical(quantizers)


def _share_identical(quantizers) -> None:
    """Quantizers that saw exactly the same range over all calibration data sit on either side of a
    range-preserving op (MaxPool, Flatten, Reshape after a ReLU'd layer): they share one learned scale,
    so the export keeps equal scales and ORT runs that op in uint8 between them."""
    groups: dict[tuple, list] = {}
    for quantizer in quantizers:
        key = (float(quantizer.low), float(quantizer.high), float(quantizer.zero_point))
        groups.setdefault(key, []).append(quantizer)
    for members in groups.values():
        for quantizer in members[1:]:
            quantizer.scale_factor = members[0].scale_factor
            quantizer.base_scale = members[0].base_scale.clone()


def freeze(module) -> None:
    """Fixed scales for export: weights' from their current values, activations' as numbers."""
    for layer in _layers(module):
        layer.frozen_weight_scale = layer.weight_scale()
    for quantizer in _quantizers(module):
        quantizer.mode = "export"


def _tensors(inputs: dict, input_names: Sequence[str]):
    torch = _torch()
    return tuple(torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in input_names)


# -- training ----------------------------------------------------------------------------------------


def _trim_padding(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut columns that are padding in every sample: a mask-pooled model gives the same outputs, faster."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return inputs
    length = max(int(mask.sum(axis=1).max()), 1)
    return {
        name: array[:, :length] if array.ndim == 2 and array.shape[1] == mask.shape[1] else array
        for name, array in inputs.items()
    }


def _token_splice(inputs: dict[str, np.ndarray], share: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Replace a share of the batch by sequences made of a span of one text and a span of another,
    keeping the first and last real tokens (a tokenizer's [CLS] and [SEP])."""
    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    if ids is None or mask is None:
        return inputs
    ids, mask = ids.copy(), mask.copy()
    count, width = ids.shape
    lengths = mask.sum(axis=1).astype(int)
    for row in rng.choice(count, size=round(share * count), replace=False):
        first, second = rng.choice(count, size=2, replace=True)
        body_a = ids[first, 1 : lengths[first] - 1]
        body_b = ids[second, 1 : lengths[second] - 1]
        cut_a = rng.integers(0, len(body_a) + 1) if len(body_a) else 0
        cut_b = rng.integers(0, len(body_b) + 1) if len(body_b) else 0
        body = np.concatenate([body_a[:cut_a], body_b[cut_b:]])[: width - 2]
        sequence = np.concatenate([ids[first, :1], body, ids[first, lengths[first] - 1 : lengths[first]]])
        ids[row] = 0
        ids[row, : len(sequence)] = sequence
        mask[row] = 0
        mask[row, : len(sequence)] = 1
    spliced = dict(inputs, input_ids=ids, attention_mask=mask)
    if "token_type_ids" in inputs:
        spliced["token_type_ids"] = np.zeros_like(ids)
    return spliced


def _hidden_hook(module):
    """Capture a transformers model's last hidden state on every forward (None for other models)."""
    inner = getattr(module, "model", None)
    if inner is None or not hasattr(inner, "config"):
        return None
    captured = {}

    def hook(_module, _args, output):
        captured["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    inner.register_forward_hook(hook)
    return captured


def train(
    student,
    teacher,
    batches: Sequence[Batch],
    input_names: Sequence[str],
    variant: QatVariant,
    on_step: Callable[[StepLog, int], None] | None = None,
) -> tuple[list[StepLog], int, str]:
    """Fine-tune `student` against `teacher` (distillation) or the labels; return the step log, the
    planned step count and why training stopped."""
    torch = _torch()
    settings = variant.training
    planned = settings.epochs * len(batches) if settings.epochs else settings.steps
    if planned == 0:
        return [], 0, "no training asked for (0 steps)"
    if settings.loss == "task" and any(batch.labels is None for batch in batches):
        raise QatError("training.loss `task` needs labels in the training data")
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    optimizer, schedule = _optimizer(torch, student, settings, planned)
    hidden = (_hidden_hook(student), _hidden_hook(teacher)) if settings.hidden_weight else None
    # dropout off: the student is compared with a deterministic teacher, step for step
    student.eval()
    teacher.eval()
    log: list[StepLog] = []
    started = time.perf_counter()
    order: list[int] = []
    stopped = f"{planned} steps done"
    for step in range(planned):
        if not order:
            order = list(rng.permutation(len(batches)))
        loss = _step_loss(torch, student, teacher, batches[order.pop()], input_names, settings, rng, hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        entry = StepLog(step, float(loss.detach()), time.perf_counter() - started)
        log.append(entry)
        if on_step is not None:
            on_step(entry, planned)
        if entry.seconds > settings.max_seconds and step + 1 < planned:
            stopped = f"time budget: {step + 1} of {planned} steps in {entry.seconds:.0f} s (max_seconds {settings.max_seconds:g})"
            break
    return log, planned, stopped


def _optimizer(torch, student, settings, planned: int):
    """AdamW over the weights (and the activation scales, at their own rate) with cosine decay."""
    scales = list({id(q.scale_factor): q.scale_factor for q in _quantizers(student)}.values())
    scale_ids = {id(p) for p in scales}
    weights = [p for p in student.parameters() if p.requires_grad and id(p) not in scale_ids]
    groups = [{"params": weights, "lr": settings.learning_rate}]
    if settings.scale_learning_rate > 0:
        groups.append({"params": scales, "lr": settings.scale_learning_rate})
    else:
        for scale in scales:
            scale.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step / planned, 1.0)))
    )
    return optimizer, schedule


def _step_loss(torch, student, teacher, batch: Batch, input_names, settings, rng, hidden):
    """One batch's loss: the student against the teacher (or the labels), plus hidden-state distillation."""
    inputs = batch.inputs
    if settings.augment == "token_splice":
        inputs = _token_splice(inputs, settings.augment_share, rng)
    inputs = _trim_padding(inputs)
    tensors = _tensors(inputs, input_names)
    with torch.no_grad():
        target = _first(teacher(*tensors))
    output = _first(student(*tensors))
    loss = _loss(settings.loss, output, target, batch.labels)
    if hidden is not None:
        student_hidden, teacher_hidden = hidden[0]["hidden"], hidden[1]["hidden"]
        mask = torch.from_numpy(inputs["attention_mask"]).unsqueeze(-1).to(output.dtype)
        error = ((student_hidden - teacher_hidden) ** 2 * mask).sum()
        loss = loss + settings.hidden_weight * error / ((teacher_hidden**2) * mask).sum().clamp(min=1e-12)
    return loss


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _loss(kind: str, output, target, labels):
    torch = _torch()
    functional = torch.nn.functional
    if kind == "task":
        return functional.cross_entropy(output.reshape(len(labels), -1), torch.from_numpy(np.asarray(labels)).long())
    if kind == "distill_cosine":
        return (
            1.0
            - functional.cosine_similarity(
                output.reshape(len(output), -1), target.reshape(len(target), -1), dim=1
            ).mean()
        )
    return functional.mse_loss(output, target)


# -- export --------------------------------------------------------------------------------------------


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant tensor by name: initializers, Constant outputs and Identity chains over them
    (the exporter shares one scale between nodes through Constant/Identity)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                values[node.output[0]] = numpy_helper.to_array(value.t)
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.op_type == "Identity" and node.input[0] in values and node.output[0] not in values:
                values[node.output[0]] = values[node.input[0]]
                changed = True
    return values


def fold_weights(model: onnx.ModelProto) -> list[str]:
    """Store fake-quantized weights as ORT's quantizer would: W -> Q -> DQ becomes an int8 initializer
    -> DQ (dropping a Transpose behind it), and a Conv/Gemm's float bias an int32 initializer behind a
    DQ with scale input scale x weight scale (ORT's QGemm fusion wants that)."""
    graph = model.graph
    constants = _constants(graph)
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    removed: set[int] = set()
    new_initializers: list[onnx.TensorProto] = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers:
            continue
        quantized, axis, many_scales = _quantized_weight(node, constants)
        for dq in consumers.get(node.output[0], []):
            if dq.op_type == "DequantizeLinear":
                name = f"{node.input[0]}_quantized_{len(new_initializers)}"
                values = _read_from_initializer(dq, quantized, axis, many_scales, name, consumers, removed)
                new_initializers.append(numpy_helper.from_array(values, name))
        removed.add(id(node))
    kept = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(new_initializers)
    biases = _int32_biases(graph, _constants(graph), {output: n for n in graph.node for output in n.output})
    _drop_unused_initializers(graph)
    return [
        f"{len(new_initializers)} fake-quantized weights stored as int8 initializers",
        *([f"{biases} Conv/Gemm biases stored as int32"] if biases else []),
    ]


def _quantized_weight(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> tuple[np.ndarray, int, bool]:
    """What a weight's QuantizeLinear computes: the integer values, the axis, whether scales are per channel."""
    weight = constants[node.input[0]].astype(np.float32)
    scale = constants[node.input[1]].astype(np.float32)
    zero = constants[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * weight.ndim
    if scale.ndim == 1 and scale.size > 1:
        shape[axis] = scale.size
    info = np.iinfo(zero.dtype)
    values = np.rint(weight / scale.reshape(shape)) + zero.astype(np.int32).reshape(shape)
    return np.clip(values, info.min, info.max).astype(zero.dtype), axis, scale.size > 1


def _read_from_initializer(
    dq: onnx.NodeProto,
    quantized: np.ndarray,
    axis: int,
    many_scales: bool,
    name: str,
    consumers: dict[str, list[onnx.NodeProto]],
    removed: set[int],
) -> np.ndarray:
    """Point `dq` at the integer initializer `name`; fold a 2-D Transpose behind it into the values."""
    after = consumers.get(dq.output[0], [])
    transpose = after[0] if len(after) == 1 and after[0].op_type == "Transpose" and quantized.ndim == 2 else None
    values, dq_axis = quantized, axis
    if transpose is not None and [a.ints for a in transpose.attribute if a.name == "perm"] in ([], [[1, 0]]):
        values, dq_axis = quantized.T.copy(), 1 - axis
        for consumer in consumers.get(transpose.output[0], []):
            for index, input_name in enumerate(consumer.input):
                if input_name == transpose.output[0]:
                    consumer.input[index] = dq.output[0]
        removed.add(id(transpose))
    dq.input[0] = name
    for attribute in dq.attribute:
        if attribute.name == "axis":
            attribute.i = dq_axis
    if many_scales and not any(a.name == "axis" for a in dq.attribute):
        dq.attribute.append(onnx.helper.make_attribute("axis", dq_axis))
    return values


def _int32_biases(
    graph: onnx.GraphProto, constants: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto]
) -> int:
    count = 0
    for node in list(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in constants:
            continue
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            continue
        input_source, weight_source = (producers.get(name) for name in node.input[:2])
        if (
            input_source is None
            or weight_source is None
            or {input_source.op_type, weight_source.op_type} != {"DequantizeLinear"}
        ):
            continue
        input_scale = constants.get(input_source.input[1])
        weight_scale = constants.get(weight_source.input[1])
        if input_scale is None or weight_scale is None or input_scale.size != 1:
            continue
        bias = constants[node.input[2]].astype(np.float32)
        scale = input_scale.astype(np.float32).reshape(()) * weight_scale.astype(np.float32).reshape(-1)
        scale = np.broadcast_to(scale, bias.shape).astype(np.float32) if scale.size > 1 else scale.reshape(())
        quantized = np.rint(bias / scale).astype(np.int32)
        prefix = f"{node.input[2]}_int32_{count}"
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, prefix),
                numpy_helper.from_array(np.asarray(scale, np.float32), f"{prefix}_scale"),
                numpy_helper.from_array(np.zeros(scale.shape, np.int32), f"{prefix}_zero_point"),
            ]
        )
        dq = onnx.helper.make_node(
            "DequantizeLinear",
            [prefix, f"{prefix}_scale", f"{prefix}_zero_point"],
            [f"{prefix}_dequantized"],
            name=f"{prefix}_DequantizeLinear",
        )
        if np.ndim(scale):
            dq.attribute.append(onnx.helper.make_attribute("axis", 0))
        graph.node.insert(list(graph.node).index(node), dq)
        node.input[2] = dq.output[0]
        count += 1
    return count


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def export_qdq(source: TorchSource, module, batches: Sequence[Batch], out: Path) -> list[str]:
    """Export the frozen fake-quantized `module` to a QDQ ONNX model at `out` with int8 weights."""
    torch = _torch()
    from int8flow.tasks.export import export_module

    frozen = copy.deepcopy(module)
    freeze(frozen)
    with torch.no_grad(), warnings.catch_warnings():
        # the frozen scales are Python numbers on purpose: the tracer's "converting a tensor to a
        # Python float" warnings say exactly that
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # DequantizeLinear's per-channel `axis` needs opset 13
        export_module(source, frozen, batches, out, opset=13)
    model = onnx.load(str(out))
    notes = fold_weights(model)
    onnx.save(model, str(out))
    for stale in out.parent.glob(f"{out.name}.data"):
        stale.unlink()
    return notes


# -- the stage -----------------------------------------------------------------------------------------


def load_source_module(source: TorchSource):
    from int8flow.tasks.export import load_hf_module, load_pytorch_module

    if isinstance(source, HuggingFaceModelSource):
        return load_hf_module(source)
    return load_pytorch_module(source)


def quantization_aware_training(
    source: TorchSource,
    variant: QatVariant,
    calibration: Sequence[Batch],
    training: Sequence[Batch],
    export_batches: Sequence[Batch],
    out: Path,
    *,
    percentile: float = 99.999,
    on_step: Callable[[StepLog, int], None] | None = None,
) -> QatResult:
    """Fake-quantize the source model, set its ranges on `calibration`, fine-tune on `training`, and
    export the result (and, with `compare_untrained`, the untrained one) as QDQ ONNX beside `out`."""
    torch = _torch()
    from int8flow.tasks.export import module_input_names
    from int8flow.tasks.model import model_size_bytes

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if variant.training.threads:
        torch.set_num_threads(variant.training.threads)
    try:
        names = module_input_names(source)
        teacher = load_source_module(source)
        student = copy.deepcopy(teacher)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        layers = prepare(student, variant, percentile)
        calibrate(student, [batch.inputs for batch in calibration], names)
        notes = [f"{len(layers)} layers fake-quantized"]
        untrained_path = None
        if variant.compare_untrained:
            untrained_path = out.parent / "untrained" / out.name
            untrained_path.parent.mkdir(parents=True, exist_ok=True)
            export_qdq(source, student, export_batches, untrained_path)
        train_started = time.perf_counter()
        log, planned, stopped = train(student, teacher, training, names, variant, on_step)
        train_seconds = time.perf_counter() - train_started
        checkpoint = out.parent / "qat_checkpoint.pt"
        torch.save(student.state_dict(), checkpoint)
        notes += export_qdq(source, student, export_batches, out)
    finally:
        torch.set_num_threads(previous_threads)
    return QatResult(
        variant=str(variant.name),
        path=out,
        untrained_path=untrained_path,
        checkpoint=checkpoint,
        size_bytes=model_size_bytes(out),
        untrained_size_bytes=model_size_bytes(untrained_path) if untrained_path else None,
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        steps=log,
        planned_steps=planned,
        stopped=stopped,
        quantized_layers=layers,
        notes=notes,
    )
