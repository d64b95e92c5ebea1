"""What every variant kind is: spec options, facts the pipeline plans with, and the function that makes it.

A kind is one pydantic class (its options are its fields, discriminated on `kind:`) that also carries
- `facts`: which graph it starts from, whether it needs calibration ranges, trains, can run integer
  kernels, may keep nodes in float (accuracy fallback);
- how a hardware preset fills the options it leaves open (`with_preset`), the opset it needs
  (`min_opset`), and its calibration key;
- `make(model, job)`: write the variant of `model` to `job.out`.
The spec's discriminated union is built from a `KindRegistry` of these classes (`tasks.kinds.KINDS`),
so a kind is declared once.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union, get_args

from pydantic import Field, model_validator

from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges
from int8flow.tasks.hardware import HardwarePreset
from int8flow.tasks.model import Graph
from int8flow.tasks.options import StrictModel

if TYPE_CHECKING:
    from typing import Self

    from int8flow.tasks.preprocess import TransformerFusion

# A grid that expands beyond this is refused at validation (6 keys x 10 values is a million variants).
MAX_GRID_VARIANTS = 64
# ORT's quantizers themselves need opset 11 (they upgrade silently, with a warning, below it).
QUANTIZATION_OPSET = 11
# DequantizeLinear/QuantizeLinear gained `axis` (per-channel) in opset 13.
PER_CHANNEL_QDQ_OPSET = 13
SHORT_TYPES = {"QInt8": "s8", "QUInt8": "u8"}


class KindError(RuntimeError):
    """Making a variant failed; the message carries the quantizer's own words."""


@dataclass(frozen=True)
class KindFacts:
    """What the pipeline needs to know about a kind to plan for it."""

    summary: str
    starts_from: Graph  # the FP32 graph it starts from when not `fused`
    needs_calibration: bool = False  # needs the spec's `calibration:` section
    integer_kernels: bool = False  # meant to run ORT integer kernels: "likely slower" warnings apply
    fallback: bool = False  # the accuracy fallback may keep its worst nodes in float
    trains: bool = False  # made by training the source model (a torch source), not by an ORT quantizer
    fusable: bool = True  # may start from the transformer-fused graph


@dataclass(frozen=True)
class SpecFacts:
    """The parts of a spec a kind's cross-field rules look at."""

    model_source: str  # onnx | pytorch | huggingface
    has_calibration: bool
    has_transformer_fusion: bool


@dataclass(frozen=True)
class MakeJob:
    """What making a variant may use besides the FP32 graph it starts from."""

    out: Path
    ranges: Mapping[CalibrationKey, CalibrationRanges]
    fusion: TransformerFusion | None = None


class VariantBase(StrictModel):
    facts: ClassVar[KindFacts]

    name: str | None = Field(
        default=None,
        max_length=200,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$",
        description="Run name of the variant; default: made from its kind and options.",
    )
    grid: dict[str, list[Any]] | None = Field(
        default=None,
        description="Expand into one variant per combination of these option values, "
        f"e.g. `{{per_channel: [true, false]}}` (at most {MAX_GRID_VARIANTS} combinations).",
    )
    fused: bool = Field(
        default=False,
        description="Start from the transformer-fused graph (needs `preprocess.transformer_fusion`).",
    )

    @classmethod
    def kind_name(cls) -> str:
        return str(get_args(cls.model_fields["kind"].annotation)[0])

    @property
    def label(self) -> str:
        """The resolved name (every variant has one after `expand`)."""
        return self.name or self.default_name()

    # -- facts that depend on the options --------------------------------------------------------

    @property
    def graph(self) -> Graph:
        return Graph.FUSED if self.fused else self.facts.starts_from

    def default_name(self) -> str:
        return self.named(self.kind_name())

    def named(self, base: str) -> str:
        return f"fused-{base}" if self.fused else base

    def calibration_key(self) -> CalibrationKey | None:
        """The shared calibration this variant reads ranges from, if any."""
        return None

    def calibrated_op_types(self) -> frozenset[str]:
        """Op types whose input and output tensors this variant reads ranges of (from its calibration)."""
        return frozenset()

    def min_opset(self) -> int:
        """The lowest default-domain opset this variant can be written in (0: any)."""
        return 0

    def fallback_op_types(self) -> frozenset[str]:
        """Op types the accuracy fallback may keep in float (empty: no fallback for this kind)."""
        return frozenset()

    def excluded_nodes(self) -> tuple[str, ...]:
        return tuple(getattr(self, "nodes_to_exclude", ()))

    def with_excluded(self, nodes: tuple[str, ...], name: str) -> Self:
        """This variant with `nodes` also kept in float (a fallback step)."""
        return self.model_copy(update={"name": name, "nodes_to_exclude": [*self.excluded_nodes(), *nodes]})

    def with_preset(self, preset: HardwarePreset) -> Self:
        """This variant with the integer options it leaves open taken from `preset`."""
        return self

    def saturates(self, preset: str) -> bool:
        """Whether this variant's integer types can saturate on CPUs of `preset`."""
        return False

    def spec_problems(self, spec: SpecFacts) -> list[tuple[str, str]]:
        """(field, message) for each rule this variant breaks in this spec."""
        problems = []
        if self.facts.needs_calibration and not spec.has_calibration:
            problems.append(("kind", f"{self.kind_name()} variants need a `calibration:` section"))
        if self.fused and not self.facts.fusable:
            problems.append(("fused", f"`fused` does not apply to {self.kind_name()} variants"))
        elif self.fused and not spec.has_transformer_fusion:
            problems.append(("fused", "variants with `fused: true` need `preprocess.transformer_fusion`"))
        if self.facts.trains and spec.model_source == "onnx":
            problems.append(
                (
                    "kind",
                    f"{self.kind_name()} variants train the PyTorch model: they need a `source: pytorch` or `source: huggingface` model",
                )
            )
        return problems

    def twins(self) -> list[VariantBase]:
        """Variants this one brings along (qat's untrained twin), for unique-name checks."""
        return []

    # -- making it -------------------------------------------------------------------------------

    def make(self, model: Path, job: MakeJob) -> list[str]:
        """Write this variant of `model` to `job.out`; return notes worth telling the user."""
        raise KindError(f"{self.kind_name()} variants are not made by a quantizer")

    # -- grids -----------------------------------------------------------------------------------

    @model_validator(mode="after")
    def _grid_keys(self) -> VariantBase:
        if not self.grid:
            return self
        options = set(type(self).model_fields) - {"kind", "name", "grid"}
        for key, values in self.grid.items():
            if key not in options:
                raise ValueError(
                    f"grid key {key!r} is not an option of kind {self.kind_name()!r}; options: {', '.join(sorted(options))}"
                )
            if not values:
                raise ValueError(f"grid key {key!r} needs at least one value")
        size = math.prod(len(values) for values in self.grid.values())
        if size > MAX_GRID_VARIANTS:
            raise ValueError(f"this grid makes {size} variants; at most {MAX_GRID_VARIANTS} are allowed per entry")
        for combination in self._grid_combinations():
            type(self).model_validate({**self._options(), **combination})
        return self

    def _options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"grid", "name"}, exclude_defaults=True) | {"kind": self.kind_name()}

    def _grid_combinations(self) -> Iterator[dict[str, Any]]:
        keys = list(self.grid or {})
        for values in itertools.product(*(self.grid or {}).values()):
            yield dict(zip(keys, values, strict=True))

    def expand(self) -> list[VariantBase]:
        """This variant, or one variant per grid combination, each with a name."""
        if not self.grid:
            return [self if self.name else self.model_copy(update={"name": self.default_name()})]
        expanded = []
        for combination in self._grid_combinations():
            variant = type(self).model_validate({**self._options(), **combination})
            suffix = "-".join(f"{key}={_short(value)}" for key, value in combination.items())
            name = f"{self.name}-{suffix}" if self.name else variant.default_name()
            expanded.append(variant.model_copy(update={"name": name}))
        return expanded


def _short(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class KindRegistry:
    """The variant kinds a spec may name, by their `kind:` value. The spec's union is built from it."""

    def __init__(self, kinds: tuple[type[VariantBase], ...] = ()):
        self._kinds: dict[str, type[VariantBase]] = {}
        for kind in kinds:
            self.register(kind)

    def register(self, kind: type[VariantBase]) -> type[VariantBase]:
        name = kind.kind_name()
        if name in self._kinds:
            raise ValueError(f"variant kind {name!r} is registered twice")
        self._kinds[name] = kind
        return kind

    def with_kind(self, kind: type[VariantBase]) -> KindRegistry:
        """A new registry: these kinds and one more."""
        return KindRegistry((*self._kinds.values(), kind))

    def __getitem__(self, name: str) -> type[VariantBase]:
        return self._kinds[name]

    def __contains__(self, name: object) -> bool:
        return name in self._kinds

    def names(self) -> list[str]:
        return list(self._kinds)

    def union(self) -> Any:
        """`Annotated[Union[...], Field(discriminator="kind")]` over the registered kinds."""
        return Annotated[Union[tuple(self._kinds.values())], Field(discriminator="kind")]  # noqa: UP007
