"""`kind: weight_only_int4` — ORT's MatMulNBits quantizer: 4-bit block-wise weights, float activations."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import onnx
from pydantic import Field

from int8flow.tasks.kinds.base import KindError, KindFacts, MakeJob, VariantBase
from int8flow.tasks.model import Graph, uses_external_data

_MATMUL: list[Literal["MatMul", "Gather"]] = ["MatMul"]


class WeightOnlyInt4Variant(VariantBase):
    """ORT `MatMulNBitsQuantizer`: 4-bit block-wise weights, float activations."""

    # quant_pre_process fuses MatMul+Add into Gemm, which the int4 quantizer skips: start from the
    # model as given.
    facts = KindFacts(summary="4-bit block-wise MatMul weights, float activations", starts_from=Graph.GIVEN)

    kind: Literal["weight_only_int4"] = Field(description="Weight-only int4 (MatMulNBits).")
    block_size: Literal[16, 32, 64, 128, 256] = Field(default=32, description="Weights per scale.")
    symmetric: bool = Field(default=True, description="Symmetric blocks (no zero point).")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        default=None,
        description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.",
    )
    op_types: list[Literal["MatMul", "Gather"]] = Field(
        default_factory=lambda: list(_MATMUL), description="Op types whose weights become int4."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in float.")

    def default_name(self) -> str:
        return self.named(f"int4-b{self.block_size}{'' if self.symmetric else '-asym'}")

    def make(self, model: Path, job: MakeJob) -> list[str]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(model)),
            bits=4,
            block_size=self.block_size,
            is_symmetric=self.symmetric,
            accuracy_level=self.accuracy_level,
            nodes_to_exclude=list(self.nodes_to_exclude),
            op_types_to_quantize=tuple(self.op_types),
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(job.out), use_external_data_format=uses_external_data(model))
        converted = sum(
            node.op_type in ("MatMulNBits", "GatherBlockQuantized") for node in quantizer.model.model.graph.node
        )
        if converted == 0:
            raise KindError(
                f"no {'/'.join(self.op_types)} weight could be quantized to int4 "
                f"(needs constant weights whose rows are a multiple of the block size {self.block_size})"
            )
        return []
