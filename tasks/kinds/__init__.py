"""The variant kinds, one registry. Adding a kind: a module with its class, and one line below."""

from __future__ import annotations

from int8flow.tasks.kinds.base import KindFacts, KindRegistry, MakeJob, SpecFacts, VariantBase
from int8flow.tasks.kinds.dynamic import DynamicVariant
from int8flow.tasks.kinds.floats import Fp16Variant, Fp32Variant
from int8flow.tasks.kinds.int4 import WeightOnlyInt4Variant
from int8flow.tasks.kinds.qat import QatTraining, QatVariant
from int8flow.tasks.kinds.static import StaticVariant

KINDS = KindRegistry((DynamicVariant, StaticVariant, WeightOnlyInt4Variant, Fp16Variant, Fp32Variant, QatVariant))

__all__ = [
    "KINDS",
    "DynamicVariant",
    "Fp16Variant",
    "Fp32Variant",
    "KindFacts",
    "KindRegistry",
    "MakeJob",
    "QatTraining",
    "QatVariant",
    "SpecFacts",
    "StaticVariant",
    "VariantBase",
    "WeightOnlyInt4Variant",
]
