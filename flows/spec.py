"""The pipeline spec: the stages' own option models, composed into one strict document.

Each section is defined beside the stage that reads it (`tasks.calibrate.Calibration`,
`tasks.select.Selection`, ...); the variant kinds come from one registry (`tasks.kinds.KINDS`), whose
discriminated union types `variants`. Unknown keys are errors, every field says what it means (the
JSON Schema in `pipelines/schema.json` is generated from these models), relative paths are resolved
against the spec file's folder, and `resolved_variants()` gives the variants with grids expanded and
defaults filled in: those resolved values are what gets run and logged.

Rules that span fields are `problems()`: each one names the dotted path it is about, so the spec file
loader can point at its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationInfo, create_model, field_validator, model_validator

from int8flow.tasks.calibrate import Calibration
from int8flow.tasks.data import DataSource
from int8flow.tasks.evaluate import Evaluation, Metric
from int8flow.tasks.fallback import AccuracyFallback
from int8flow.tasks.hardware import HardwarePreset, PresetName, Target
from int8flow.tasks.kinds import KINDS, KindRegistry, SpecFacts, VariantBase
from int8flow.tasks.options import StrictModel
from int8flow.tasks.preprocess import Preprocess
from int8flow.tasks.profile import Profiling
from int8flow.tasks.select import Selection
from int8flow.tasks.sources import ModelSource, OnnxModelSource

if TYPE_CHECKING:
    Variant = VariantBase
else:
    Variant = KINDS.union()

# More variants than this in one run is a mistake, not a plan: each is quantized, evaluated and timed.
MAX_VARIANTS = 128
# MLflow reads `latest` as "the newest version" and `v<N>` as version N: neither can be an alias.
RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


class Registry(StrictModel):
    model_name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Registered model name in the MLflow registry (letters, digits, `_`, `.`, `-`).",
    )
    alias: str = Field(
        default="champion",
        max_length=100,
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description="Alias moved to the new version only if it beats the current holder "
        "(not `latest` or `v<N>`, which MLflow reserves).",
    )
    promote: bool = Field(default=True, description="Register the selected variant at all.")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if RESERVED_ALIAS.match(value):
            raise ValueError(f"{value!r} is reserved by MLflow (`latest` is the newest version, `vN` version N)")
        return value


@dataclass(frozen=True)
class SpecRule:
    """A rule that spans fields, broken: where (a pydantic-style location) and why."""

    location: tuple[str | int, ...]
    message: str


class PipelineSpec(StrictModel):
    """One quantization pipeline: a model, its data, the variants to try and what `best` means."""

    name: str = Field(
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Pipeline name (MLflow experiment name).",
    )
    description: str = Field(default="", max_length=5000, description="Free text, shown on the run.")
    model: ModelSource = Field(description="The FP32 source model: an ONNX file, PyTorch or Hugging Face.")
    preprocess: Preprocess = Field(default_factory=Preprocess, description="Before quantization.")
    calibration: Calibration | None = Field(
        default=None, description="Calibration data and method; required by static variants."
    )
    evaluation: Evaluation = Field(description="Evaluation data and metrics.")
    variants: list[Variant] = Field(min_length=1, max_length=MAX_VARIANTS, description="The variants to try.")
    target: Target = Field(default_factory=Target, description="The CPU family the variants are made for.")
    fallback: AccuracyFallback = Field(
        default_factory=AccuracyFallback, description="Accuracy-aware retries of variants that miss the constraint."
    )
    profiling: Profiling = Field(default_factory=Profiling, description="Latency measurement.")
    selection: Selection = Field(default_factory=Selection, description="Constraints and objective.")
    registry: Registry | None = Field(
        default=None, description="Where the selected variant is registered; none: no registration."
    )

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> PipelineSpec:
        # The spec file loader reports these itself, each at its own line (flows.specfile).
        if (info.context or {}).get("defer_cross_field"):
            return self
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{dotted(p.location)}: {p.message}" for p in problems))
        return self

    # -- rules that span fields -------------------------------------------------------------------

    def problems(self) -> list[SpecRule]:
        """Every cross-field rule this spec breaks, each with the location it is about."""
        return [*self._selection_problems(), *self._data_problems(), *self._variant_problems()]

    def _selection_problems(self) -> list[SpecRule]:
        problems = []
        metric_names = [metric.name for metric in self.evaluation.metrics]
        if self.selection.metric is not None and self.selection.metric not in metric_names:
            message = f"{self.selection.metric!r} is not an evaluation metric ({', '.join(metric_names)})"
            problems.append(SpecRule(("selection", "metric"), message))
        if self.selection.batch_size is not None and self.selection.batch_size not in self.profiling.batch_sizes:
            problems.append(
                SpecRule(("selection", "batch_size"), f"{self.selection.batch_size} is not in profiling.batch_sizes")
            )
        if self.selection.threads is not None and self.selection.threads not in self.profiling.threads:
            problems.append(SpecRule(("selection", "threads"), f"{self.selection.threads} is not in profiling.threads"))
        return problems

    def _data_problems(self) -> list[SpecRule]:
        sections = {
            "evaluation": self.evaluation.data,
            "calibration": self.calibration.data if self.calibration else None,
        }
        return [
            SpecRule((section, "data", "texts"), "texts need a `source: huggingface` model (its tokenizer)")
            for section, data in sections.items()
            if data is not None and data.texts is not None and self.model.source != "huggingface"
        ]

    def _variant_problems(self) -> list[SpecRule]:
        facts = SpecFacts(
            self.model.source, self.calibration is not None, self.preprocess.transformer_fusion is not None
        )
        problems = []
        seen: dict[str, int] = {}
        resolved = 0
        for index, entry in enumerate(self.variants):
            expanded = entry.expand()
            resolved += len(expanded)
            for variant in expanded:
                problems += [
                    SpecRule(("variants", index, field), message) for field, message in variant.spec_problems(facts)
                ]
                if self.target.preset != "auto" and variant.with_preset(self._preset()).saturates(self.target.preset):
                    message = (
                        f"{variant.label}: 8-bit u8s8 weights saturate on {self.target.preset} CPUs (no VNNI); "
                        "remove `reduce_range: false` or set target.preset to a VNNI preset"
                    )
                    problems.append(SpecRule(("variants", index, "reduce_range"), message))
                for name in [variant.label, *(twin.label for twin in variant.twins())]:
                    if name in seen:
                        message = f"variant name {name!r} is also variants[{seen[name]}]'s; give the variants a distinct `name:`"
                        problems.append(SpecRule(("variants", index, "name"), message))
                    seen.setdefault(name, index)
        if resolved > MAX_VARIANTS:
            problems.append(
                SpecRule(("variants",), f"the grids make {resolved} variants; at most {MAX_VARIANTS} per run")
            )
        return problems

    # -- resolved values ---------------------------------------------------------------------------

    def _preset(self, detected: PresetName | None = None) -> HardwarePreset:
        return self.target.preset_in_force(detected)

    def resolved_variants(self, detected_preset: PresetName | None = None) -> list[VariantBase]:
        """Grids expanded, names given, static calibration methods filled in from `calibration`, integer
        types and `reduce_range` from the target preset where the variant leaves them open."""
        preset = self._preset(detected_preset)
        resolved = []
        for entry in self.variants:
            variant: VariantBase = entry
            method = getattr(variant, "calibration_method", "unset")
            if method is None and self.calibration is not None:
                variant = variant.model_copy(update={"calibration_method": self.calibration.method})
            resolved += [expanded.with_preset(preset) for expanded in variant.expand()]
        return resolved

    def with_model_file(self, path: Path) -> PipelineSpec:
        """This spec with its model replaced by the ONNX file at `path` (absolute)."""
        if not path.is_file() or path.suffix != ".onnx":
            raise ValueError(f"expected an existing .onnx file, got {path}")
        return self.model_copy(update={"model": OnnxModelSource(source="onnx", path=path)})

    def data_sources(self) -> dict[tuple[str | int, ...], DataSource]:
        """Every data source that feeds the model, by its place in the spec."""
        sources: dict[tuple[str | int, ...], DataSource] = {("evaluation", "data"): self.evaluation.data}
        if self.calibration is not None:
            sources[("calibration", "data")] = self.calibration.data
        if self.evaluation.test is not None:
            sources[("evaluation", "test")] = self.evaluation.test
        return sources

    def fixed_inputs(self) -> dict[str, Any]:
        """Inputs every data source feeds one and the same `value`: constants of this pipeline's model."""
        declared = [source.inputs for source in self.data_sources().values()]
        values = {name: how.value for name, how in declared[0].items() if how.value is not None}
        return {
            name: value
            for name, value in values.items()
            if all(name in inputs and inputs[name].value == value for inputs in declared[1:])
        }

    @property
    def selection_metric(self) -> Metric:
        wanted = self.selection.metric or self.evaluation.metrics[0].name
        return next(metric for metric in self.evaluation.metrics if metric.name == wanted)

    @property
    def selection_batch_size(self) -> int:
        return self.selection.batch_size or self.profiling.batch_sizes[0]

    @property
    def selection_threads(self) -> int:
        return self.selection.threads or self.profiling.threads[0]


def spec_model(kinds: KindRegistry) -> type[PipelineSpec]:
    """The spec model whose `variants` are the kinds of `kinds` (`PipelineSpec` is this for `KINDS`)."""
    field: Any = (list[kinds.union()], Field(min_length=1, max_length=MAX_VARIANTS, description="The variants to try."))  # type: ignore[misc]
    return create_model("PipelineSpec", __base__=PipelineSpec, __module__=__name__, variants=field)


def dotted(location: tuple[Any, ...]) -> str:
    """A pydantic location as the user writes it: `variants[2].calibration.method`."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
