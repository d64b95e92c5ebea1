"""`kind: dynamic` — ORT `quantize_dynamic`: int8 weights ahead of time, activations quantized at run time."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.registry import IntegerOpsRegistry
from pydantic import Field

from int8flow.tasks.hardware import HardwarePreset, ReduceRange, saturates
from int8flow.tasks.kinds._ort import extra_options, weight_ranges
from int8flow.tasks.kinds.base import QUANTIZATION_OPSET, KindFacts, MakeJob, VariantBase
from int8flow.tasks.model import Graph, uses_external_data

Int8Type = Literal["QInt8", "QUInt8"]


class DynamicVariant(VariantBase):
    """ORT `quantize_dynamic`: int8 weights, activations quantized at run time."""

    facts = KindFacts(
        summary="int8 weights, activations quantized at run time (no calibration)",
        starts_from=Graph.PREPROCESSED,
        integer_kernels=True,
        fallback=True,
    )

    kind: Literal["dynamic"] = Field(description="Dynamic quantization (weights int8 ahead of time).")
    weight_type: Int8Type | None = Field(default=None, description="Weight integer type; default: the target's.")
    per_channel: bool = Field(default=False, description="One scale per output channel of a weight.")
    reduce_range: ReduceRange | None = Field(
        default=None,
        description="7-bit weights, avoids u8s8 saturation on CPUs without VNNI; `where_needed`: only for the "
        "weights whose pairs can saturate ORT's AVX2 kernels; default: the target's.",
    )
    op_types: list[str] | None = Field(
        default=None, description="Op types to quantize (e.g. [MatMul, Attention]); default: ORT's."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in float.")
    extra_options: dict[str, Any] = Field(default_factory=dict, description="Passed to ORT as `extra_options`.")

    def default_name(self) -> str:
        # short: MLflow's runs table cuts run names at ~25 characters; the options are the run's params
        weights = "-u8w" if self.weight_type == "QUInt8" else ""
        return self.named(f"dynamic-{'pc' if self.per_channel else 'pt'}{weights}")

    def min_opset(self) -> int:
        return QUANTIZATION_OPSET

    def fallback_op_types(self) -> frozenset[str]:
        return frozenset(self.op_types or IntegerOpsRegistry)

    def with_preset(self, preset: HardwarePreset) -> DynamicVariant:
        defaults = {"weight_type": preset.weight_type, "reduce_range": preset.reduce_range}
        return self.model_copy(update={key: value for key, value in defaults.items() if getattr(self, key) is None})

    def saturates(self, preset: str) -> bool:
        return saturates(preset, None, self.weight_type, self.reduce_range)

    @classmethod
    def ort_default(cls) -> DynamicVariant:
        """What `quantize_dynamic(model, out)` does with ORT's defaults: per tensor, 8-bit s8 weights, every
        op type it knows; the first thing a user tries, and the reference a dynamic variant must match."""
        return cls(kind="dynamic", name="ort-default", reduce_range=False, weight_type="QInt8")

    def differences_from_ort_default(self, notes: Sequence[str], repairs: Sequence[str]) -> list[str]:
        """How this variant, as made (its `notes`), differs from `ort_default()` of the model as given."""
        differences = []
        if self.graph == Graph.FUSED:
            differences.append("it starts from the transformer-fused graph (ORT's transformer optimizer)")
        elif self.graph == Graph.PREPROCESSED:
            differences.append(
                "it starts from the pre-processed graph (ORT's quant_pre_process: constant folding, "
                "BatchNormalization folded into Conv, which widens per-tensor weight ranges)"
            )
        if repairs:
            differences.append("int8flow's repairs of the graph: " + "; ".join(repairs))
        if self.reduce_range is True:
            differences.append("7-bit weights everywhere (reduce_range: true)")
        differences += [note for note in notes if note.startswith("reduce_range where_needed: 7-bit weights for")]
        if self.per_channel:
            differences.append("per-channel weight scales")
        if self.weight_type == "QUInt8":
            differences.append("u8 weights")
        if self.op_types is not None:
            differences.append(f"only op types {', '.join(self.op_types)}")
        if self.nodes_to_exclude:
            differences.append(f"{len(self.nodes_to_exclude)} node(s) kept in float")
        if self.extra_options:
            differences.append(f"extra_options {sorted(self.extra_options)}")
        return differences

    def make(self, model: Path, job: MakeJob) -> list[str]:
        options, notes = extra_options(model, self.extra_options)
        reduce_range, options, range_notes = weight_ranges(
            model,
            self.reduce_range,
            "dynamic",
            self.per_channel,
            options,
            self.nodes_to_exclude,
            None,
            self.weight_type,
        )
        quantize_dynamic(
            model,
            job.out,
            op_types_to_quantize=self.op_types,
            per_channel=self.per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType[self.weight_type or "QInt8"],
            nodes_to_exclude=self.nodes_to_exclude,
            use_external_data_format=uses_external_data(model),
            extra_options=options,
        )
        return notes + range_notes
