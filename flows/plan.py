"""What a run will do, decided before any model is touched: one plan for the flow and the bare benchmark.

From the spec and the CPU: the preset in force, the resolved variants, which FP32 graphs and which
calibrations they need, the opset they need, and what to warn about (an integer type this CPU
saturates). Pure: no Prefect, no MLflow, no files.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from int8flow.flows.spec import PipelineSpec
from int8flow.tasks.calibrate import CalibrationKey
from int8flow.tasks.hardware import WHERE_NEEDED, HardwareInfo, HardwarePreset, PresetName, preset_for
from int8flow.tasks.kinds import VariantBase
from int8flow.tasks.model import Graph
from int8flow.tasks.repair import required_opset


@dataclass(frozen=True)
class Plan:
    hardware: HardwareInfo
    detected: PresetName  # what this CPU looks like
    preset: HardwarePreset  # what the variants were filled from (the spec's, or the detected one)
    variants: tuple[VariantBase, ...]
    graphs: frozenset[Graph]  # FP32 graphs some variant starts from
    calibrations: tuple[CalibrationKey, ...]  # shared calibrations, one per method and graph
    # per calibration, the op types whose tensors its variants read: only those are calibrated
    calibrated_op_types: Mapping[CalibrationKey, tuple[str, ...]]
    opset: int  # lowest opset every variant can be written in
    notes: tuple[str, ...]  # what the run tells the user about the target
    warnings: tuple[str, ...]  # what it warns about, loudly, and records on the run

    @property
    def preset_source(self) -> str:
        return (
            "detected" if self.preset.name == self.detected else f"set in the spec; this CPU looks like {self.detected}"
        )


def make_plan(spec: PipelineSpec, hardware: HardwareInfo) -> Plan:
    detected = preset_for(hardware)
    preset = spec.target.preset_in_force(detected)
    variants = tuple(spec.resolved_variants(detected))
    calibrations = sorted({key for variant in variants if (key := variant.calibration_key()) is not None})
    calibrated_op_types = {
        key: tuple(sorted(set().union(*(v.calibrated_op_types() for v in variants if v.calibration_key() == key))))
        for key in calibrations
    }
    notes, warnings = [], []
    reduced = [variant.label for variant in variants if getattr(variant, "reduce_range", None) is True]
    where_needed = [variant.label for variant in variants if getattr(variant, "reduce_range", None) == WHERE_NEEDED]
    if reduced and not hardware.has_vnni:
        notes.append(
            "no VNNI on this CPU: u8s8 products could saturate int16, so reduce_range (7-bit weights) is on for "
            + ", ".join(reduced)
        )
    if where_needed:
        notes.append(
            "no VNNI on this CPU: 7-bit weights only where a pair of 8-bit weights could saturate ORT's u8s8 "
            "kernels (reduce_range where_needed) for " + ", ".join(where_needed)
        )
    saturating = [variant.label for variant in variants if variant.saturates(detected)]
    if saturating:
        warnings.append(
            f"{', '.join(saturating)}: `reduce_range: false` with u8 activations and s8 weights on a CPU without VNNI; "
            "ORT's AVX2 kernels add pairs of products in int16 and saturate, so expect an accuracy loss the "
            "same model would not have on a VNNI CPU"
        )
    return Plan(
        hardware=hardware,
        detected=detected,
        preset=preset,
        variants=variants,
        graphs=frozenset(variant.graph for variant in variants),
        calibrations=tuple(calibrations),
        calibrated_op_types=calibrated_op_types,
        opset=required_opset(variants),
        notes=tuple(notes),
        warnings=tuple(warnings),
    )
