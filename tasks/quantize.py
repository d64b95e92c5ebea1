"""Quantize a pre-processed FP32 model into one variant. One function per kind, one registry.

Each function writes the variant to `out` and raises QuantizationError carrying ORT's own message
when the quantizer fails, so the flow can record it on the variant's run and go on with the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

from flows.spec import DynamicVariant, Fp16Variant, StaticVariant, TransformerFusion, VariantBase, WeightOnlyInt4Variant
from tasks.calibrate import ALL_QUANTIZABLE_OPS, ORT_METHODS, CalibrationRanges, calibration_key
import tempfile

from tasks.model import model_size_bytes, private_link, uses_external_data


class QuantizationError(RuntimeError):
    pass


@dataclass(frozen=True)
class QuantizedModel:
    variant: str
    path: Path
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def quantize(
    model: Path,
    variant: VariantBase,
    ranges: Mapping[str, CalibrationRanges],
    out: Path,
    fusion: TransformerFusion | None = None,
) -> QuantizedModel:
    """Write `variant` of `model` to `out`, using precomputed calibration `ranges` (by method).

    `fusion`: for a `fused` variant, the transformer-graph edits to apply again to the result.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="int8flow-quant-") as scratch:
            source = private_link(model, Path(scratch))
            notes = QUANTIZERS[variant.kind].function(source, variant, ranges, out)  # type: ignore[attr-defined]
        if variant.fused and fusion is not None:
            notes = [*(notes or []), *_finish(out, fusion)]
    except QuantizationError:
        raise
    except Exception as error:
        raise QuantizationError(f"{type(error).__name__}: {error}") from error
    return QuantizedModel(
        variant=str(variant.name),
        path=out,
        size_bytes=model_size_bytes(out),
        seconds=time.perf_counter() - started,
        notes=notes or [],
    )


def _finish(out: Path, fusion: TransformerFusion) -> list[str]:
    from tasks.preprocess import finish_transformer_graph

    model = onnx.load(str(out))
    notes = finish_transformer_graph(model, fusion)
    _save(model, out, uses_external_data(out))
    return notes


def _extra_options(model: Path, extra_options: dict) -> tuple[dict, list[str]]:
    """ORT's quantizers type every tensor with ONNX shape inference, which cannot type contrib ops
    (Attention, BiasGelu, ...): "Unable to find data type for weight_name". Fused graphs hold float
    tensors, so float is the right default there."""
    options = dict(extra_options)
    graph = onnx.load(str(model), load_external_data=False).graph
    if "DefaultTensorType" not in options and any(node.domain == "com.microsoft" for node in graph.node):
        options["DefaultTensorType"] = onnx.TensorProto.FLOAT
        return options, ["contrib ops in the graph: DefaultTensorType=FLOAT for tensors shape inference cannot type"]
    return options, []


def _dynamic(model: Path, variant: DynamicVariant, ranges, out: Path) -> list[str]:
    extra_options, notes = _extra_options(model, variant.extra_options)
    quantize_dynamic(
        model,
        out,
        op_types_to_quantize=variant.op_types,
        per_channel=variant.per_channel,
        reduce_range=bool(variant.reduce_range),
        weight_type=QuantType[variant.weight_type or "QInt8"],
        nodes_to_exclude=variant.nodes_to_exclude,
        use_external_data_format=uses_external_data(model),
        extra_options=extra_options,
    )
    return notes


def _static(model: Path, variant: StaticVariant, ranges: Mapping[str, CalibrationRanges], out: Path) -> list[str]:
    method = variant.calibration_method
    key = calibration_key(variant)
    if key not in ranges:
        raise QuantizationError(f"no {method} calibration ranges were computed for this variant")
    op_types = [op for op in (variant.op_types or ALL_QUANTIZABLE_OPS) if op not in variant.op_types_to_exclude]
    extra_options, notes = _extra_options(model, variant.extra_options)
    quantize_static(
        model,
        out,
        calibration_data_reader=None,
        calibration_cache_path=ranges[key].path,
        quant_format=QuantFormat[variant.format],
        op_types_to_quantize=op_types,
        per_channel=variant.per_channel,
        reduce_range=bool(variant.reduce_range),
        activation_type=QuantType[variant.activation_type or "QUInt8"],
        weight_type=QuantType[variant.weight_type or "QInt8"],
        nodes_to_exclude=list(variant.nodes_to_exclude),
        calibrate_method=ORT_METHODS[method],
        use_external_data_format=uses_external_data(model),
        extra_options=extra_options,
    )
    return [*notes, f"ranges from the shared {key} calibration ({ranges[key].samples} samples)"]


def _weight_only_int4(model: Path, variant: WeightOnlyInt4Variant, ranges, out: Path) -> list[str]:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        onnx.load(str(model)),
        bits=4,
        block_size=variant.block_size,
        is_symmetric=variant.symmetric,
        accuracy_level=variant.accuracy_level,
        nodes_to_exclude=list(variant.nodes_to_exclude),
        op_types_to_quantize=tuple(variant.op_types),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=uses_external_data(model))
    converted = sum(node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in quantizer.model.model.graph.node)
    if converted == 0:
        raise QuantizationError(
            f"no {'/'.join(variant.op_types)} weight could be quantized to int4 "
            f"(needs constant weights whose rows are a multiple of the block size {variant.block_size})"
        )
    return []


def _fp16(model: Path, variant: Fp16Variant, ranges, out: Path) -> list[str]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(
        onnx.load(str(model)), keep_io_types=variant.keep_io_types, op_block_list=variant.op_block_list
    )
    _save(converted, out, uses_external_data(model))
    return []


@dataclass(frozen=True)
class Quantizer:
    function: Callable[..., list[str]]
    # quant_pre_process fuses MatMul+Add into Gemm, which the int4 quantizer does not handle and
    # fp16 does not need: those kinds start from the FP32 model as given.
    wants_preprocessed: bool


def _save(model: onnx.ModelProto, out: Path, external: bool) -> None:
    if external:
        onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{out.name}.data")
    else:
        onnx.save(model, str(out))


def _fp32(model: Path, variant, ranges, out: Path) -> list[str]:
    _save(onnx.load(str(model)), out, uses_external_data(model))
    return ["unquantized: the FP32 graph after pre-processing"]


QUANTIZERS: dict[str, Quantizer] = {
    "dynamic": Quantizer(_dynamic, wants_preprocessed=True),
    "static": Quantizer(_static, wants_preprocessed=True),
    "weight_only_int4": Quantizer(_weight_only_int4, wants_preprocessed=False),
    "fp16": Quantizer(_fp16, wants_preprocessed=False),
    "fp32": Quantizer(_fp32, wants_preprocessed=True),
}
