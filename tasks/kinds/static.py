"""`kind: static` — ORT `quantize_static` with activation ranges from the pipeline's shared calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from pydantic import Field

from int8flow.tasks.calibrate import ALL_QUANTIZABLE_OPS, ORT_METHODS, CalibrationKey, CalibrationMethodName
from int8flow.tasks.hardware import HardwarePreset, ReduceRange, saturates
from int8flow.tasks.kinds._ort import extra_options, read_float_inputs, weight_ranges
from int8flow.tasks.kinds.base import (
    PER_CHANNEL_QDQ_OPSET,
    QUANTIZATION_OPSET,
    KindError,
    KindFacts,
    MakeJob,
    VariantBase,
)
from int8flow.tasks.kinds.dynamic import Int8Type
from int8flow.tasks.model import Graph, uses_external_data


class StaticVariant(VariantBase):
    """ORT `quantize_static` with ranges from the pipeline's calibration."""

    facts = KindFacts(
        summary="int8 weights and activations, activation ranges calibrated ahead of time",
        starts_from=Graph.PREPROCESSED,
        needs_calibration=True,
        integer_kernels=True,
        fallback=True,
    )

    kind: Literal["static"] = Field(description="Static quantization (activation ranges calibrated).")
    format: Literal["QDQ", "QOperator"] = Field(default="QDQ", description="ONNX quantization format.")
    activation_type: Int8Type | None = Field(
        default=None, description="Activation integer type; default: the target's."
    )
    weight_type: Int8Type | None = Field(default=None, description="Weight integer type; default: the target's.")
    per_channel: bool = Field(default=False, description="One scale per output channel of a weight.")
    reduce_range: ReduceRange | None = Field(
        default=None,
        description="7-bit weights, avoids u8s8 saturation on CPUs without VNNI; `where_needed`: only for the "
        "weights whose pairs can saturate ORT's AVX2 kernels; default: the target's.",
    )
    calibration_method: CalibrationMethodName | None = Field(
        default=None, description="Range method; default: `calibration.method`."
    )
    op_types: list[str] | None = Field(
        default=None, description="Op types to quantize; default: every type ORT can quantize."
    )
    op_types_to_exclude: list[str] = Field(
        default_factory=list, description="Op types left in float (removed from `op_types`)."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in float.")
    extra_options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to ORT as `extra_options` (e.g. ActivationSymmetric)."
    )

    def default_name(self) -> str:
        # short: MLflow's runs table cuts run names at ~25 characters; the options are the run's params
        method = self.calibration_method or "calib"
        extras = "".join(
            suffix
            for suffix, applies in (
                ("-s8", self.activation_type == "QInt8"),
                ("-u8w", self.weight_type == "QUInt8"),
                ("-qop", self.format == "QOperator"),
            )
            if applies
        )
        return self.named(f"static-{'pc' if self.per_channel else 'pt'}-{method}{extras}")

    def calibration_key(self) -> CalibrationKey | None:
        return CalibrationKey(self.calibration_method or "minmax", self.graph)

    def min_opset(self) -> int:
        return PER_CHANNEL_QDQ_OPSET if self.per_channel else QUANTIZATION_OPSET

    def quantized_op_types(self) -> list[str]:
        return [op for op in (self.op_types or ALL_QUANTIZABLE_OPS) if op not in self.op_types_to_exclude]

    def fallback_op_types(self) -> frozenset[str]:
        return frozenset(self.quantized_op_types())

    def calibrated_op_types(self) -> frozenset[str]:
        return frozenset(self.quantized_op_types())

    def with_preset(self, preset: HardwarePreset) -> StaticVariant:
        defaults = {
            "activation_type": preset.activation_type,
            "weight_type": preset.weight_type,
            "reduce_range": preset.reduce_range,
        }
        return self.model_copy(update={key: value for key, value in defaults.items() if getattr(self, key) is None})

    def saturates(self, preset: str) -> bool:
        return saturates(preset, self.activation_type, self.weight_type, self.reduce_range)

    def make(self, model: Path, job: MakeJob) -> list[str]:
        key = self.calibration_key()
        if key is None or key not in job.ranges:
            raise KindError(f"no {key} calibration ranges were computed for this variant")
        ranges = job.ranges[key]
        options, notes = extra_options(model, self.extra_options)
        reduce_range, options, range_notes = weight_ranges(
            model,
            self.reduce_range,
            "static",
            self.per_channel,
            options,
            self.nodes_to_exclude,
            self.activation_type,
            self.weight_type,
        )
        notes += range_notes
        quantize_static(
            model,
            job.out,
            calibration_data_reader=None,
            calibration_cache_path=ranges.path,
            quant_format=QuantFormat[self.format],
            op_types_to_quantize=self.quantized_op_types(),
            per_channel=self.per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType[self.activation_type or "QUInt8"],
            weight_type=QuantType[self.weight_type or "QInt8"],
            nodes_to_exclude=list(self.nodes_to_exclude),
            calibrate_method=ORT_METHODS[key.method],
            use_external_data_format=uses_external_data(model),
            extra_options=options,
        )
        notes.append(f"ranges from the shared {key} calibration ({ranges.samples} samples)")
        if self.format == "QDQ" and (rewired := read_float_inputs(job.out, self.nodes_to_exclude, model)):
            notes.append(
                f"{rewired} input(s) of the {len(self.nodes_to_exclude)} node(s) kept in float read the float tensor, "
                "not its Q/DQ copy (else ORT's WeightBiasQuantization re-quantizes those nodes per tensor at load)"
            )
        return notes
