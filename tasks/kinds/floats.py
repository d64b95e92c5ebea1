"""`kind: fp16` (ORT's float16 converter) and `kind: fp32` (the pre-processed graph, unquantized)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from int8flow.tasks.kinds.base import KindFacts, MakeJob, VariantBase
from int8flow.tasks.model import Graph, save_model, uses_external_data


class Fp16Variant(VariantBase):
    """Float16 weights and compute, via ORT's `float16` converter."""

    facts = KindFacts(summary="float16 weights and compute", starts_from=Graph.GIVEN)

    kind: Literal["fp16"] = Field(description="Float16 conversion.")
    keep_io_types: bool = Field(default=True, description="Keep float32 model inputs and outputs.")
    op_block_list: list[str] | None = Field(default=None, description="Op types kept in float32; default: ORT's list.")

    def make(self, model: Path, job: MakeJob) -> list[str]:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(
            onnx.load(str(model)), keep_io_types=self.keep_io_types, op_block_list=self.op_block_list
        )
        save_model(converted, job.out, uses_external_data(model))
        return []


class Fp32Variant(VariantBase):
    """The FP32 graph after pre-processing, unquantized: shows what fusion alone buys."""

    facts = KindFacts(
        summary="no quantization: what pre-processing or fusion alone buys", starts_from=Graph.PREPROCESSED
    )

    kind: Literal["fp32"] = Field(description="No quantization (pre-processed or fused FP32 graph).")

    def make(self, model: Path, job: MakeJob) -> list[str]:
        save_model(onnx.load(str(model)), job.out, uses_external_data(model))
        return ["unquantized: the FP32 graph after pre-processing"]
