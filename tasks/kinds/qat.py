"""`kind: qat` — quantization-aware training in PyTorch (fake quantization), exported as QDQ ONNX.

Made by the training stage (`tasks.qat.quantization_aware_training`, which imports torch), not by an
ORT quantizer; everything after it (evaluation, op coverage, timing, selection) is the same as for
any other variant.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from int8flow.tasks.data import DataSource
from int8flow.tasks.hardware import HardwarePreset, saturates
from int8flow.tasks.kinds.base import KindFacts, VariantBase
from int8flow.tasks.kinds.dynamic import Int8Type
from int8flow.tasks.model import Graph
from int8flow.tasks.options import MAX_COUNT, StrictModel

UNTRAINED_SUFFIX = "-untrained"


LayerType = Literal["Linear", "Conv1d", "Conv2d"]
_ALL_LAYERS: list[LayerType] = ["Linear", "Conv1d", "Conv2d"]


class QatTraining(StrictModel):
    """How a `qat` variant is fine-tuned: data, length, optimiser and loss."""

    data: DataSource | None = Field(
        default=None,
        description="Training inputs (with labels for `loss: task`); default: the calibration data.",
    )
    steps: int = Field(
        default=200,
        ge=0,
        le=MAX_COUNT,
        description="Optimiser steps (one batch each); 0 exports the calibrated model untrained.",
    )
    epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="Passes over the training data instead of `steps`."
    )
    max_seconds: float = Field(
        default=600.0,
        gt=0,
        le=86_400,
        description="Training stops after this long whatever `steps` says, and the run says so.",
    )
    learning_rate: float = Field(
        default=1e-4, gt=0, le=10, description="AdamW learning rate of the weights (cosine decay)."
    )
    scale_learning_rate: float = Field(
        default=1e-2,
        ge=0,
        le=10,
        description="Learning rate of the activation scales (LSQ); 0 keeps calibrated ranges fixed.",
    )
    loss: Literal["distill_mse", "distill_cosine", "task"] = Field(
        default="distill_mse",
        description="`distill_mse` / `distill_cosine`: match the FP32 model's outputs (no labels needed); "
        "`task`: cross-entropy against the data's labels.",
    )
    hidden_weight: float = Field(
        default=0.0,
        ge=0,
        description="Hugging Face models: also match the FP32 model's last hidden states (token level, relative "
        "MSE over real tokens) with this weight.",
    )
    augment: Literal["none", "token_splice"] = Field(
        default="none",
        description="`token_splice`: tokenized text only; a share of each batch is replaced by new sequences "
        "spliced from two training texts, so a few hundred sentences go further.",
    )
    augment_share: float = Field(default=0.75, ge=0, le=1, description="Share of each batch `augment` replaces.")
    seed: int = Field(default=0, description="Seed of torch and of batch order/augmentation: runs repeat exactly.")
    threads: int | None = Field(
        default=None, ge=1, le=256, description="torch threads while training; default: torch's."
    )


class QatVariant(VariantBase):
    """Quantization-aware training in PyTorch (fake quantization), exported as a QDQ ONNX model."""

    facts = KindFacts(
        summary="fine-tuned with fake quantization in PyTorch, exported as QDQ ONNX",
        starts_from=Graph.GIVEN,
        needs_calibration=True,
        integer_kernels=True,
        trains=True,
        fusable=False,
    )

    kind: Literal["qat"] = Field(description="Fine-tune with fake quantization, then export QDQ ONNX.")
    layers: list[LayerType] = Field(
        default_factory=lambda: list(_ALL_LAYERS),
        min_length=1,
        description="torch layer types whose inputs, weights and outputs are fake-quantized.",
    )
    modules_to_exclude: list[str] = Field(
        default_factory=list, description="Module names (as in `named_modules()`) kept in float."
    )
    activation_type: Int8Type | None = Field(
        default=None, description="Activation integer type; default: the target's."
    )
    weight_type: Literal["QInt8"] | None = Field(default=None, description="Weight integer type (symmetric int8).")
    per_channel: bool = Field(default=True, description="One weight scale per output channel.")
    reduce_range: bool | None = Field(
        default=None, description="7-bit weights (no u8s8 saturation without VNNI); default: the target's."
    )
    activation_symmetric: bool = Field(default=False, description="Activation ranges symmetric around zero.")
    quantize_outputs: bool = Field(
        default=True,
        description="Fake-quantize layer outputs where ORT's static QDQ does (MatMul before its bias, Conv/Gemm "
        "after it, with a following ReLU fused): integer kernels QLinearMatMul/QLinearConv/QGemm. false: "
        "inputs and weights only (MatMul runs as MatMulIntegerToFloat).",
    )
    calibration_method: Literal["minmax", "percentile"] = Field(
        default="minmax",
        description="Initial activation ranges from the calibration data (`percentile` uses "
        "`calibration.percentile`); training then moves them.",
    )
    compare_untrained: bool = Field(
        default=True,
        description="Also export the calibrated but untrained model as variant `<name>-untrained`: the same "
        "quantization as post-training, judged beside the trained one.",
    )
    training: QatTraining = Field(default_factory=QatTraining, description="Fine-tuning settings.")

    def default_name(self) -> str:
        return self.named(f"qat-{'pc' if self.per_channel else 'pt'}{'-s8' if self.activation_type == 'QInt8' else ''}")

    def with_preset(self, preset: HardwarePreset) -> QatVariant:
        defaults = {
            "activation_type": preset.activation_type,
            "weight_type": preset.weight_type,
            # QAT trains its weights' scales itself: where the preset wants 7 bits anywhere, all of them
            "reduce_range": preset.reduce_range is not False,
        }
        return self.model_copy(update={key: value for key, value in defaults.items() if getattr(self, key) is None})

    def saturates(self, preset: str) -> bool:
        return saturates(preset, self.activation_type, self.weight_type, self.reduce_range)

    def untrained_twin(self) -> QatVariant:
        """The same quantization with calibrated ranges and no training: PTQ of exactly these layers."""
        return self.model_copy(
            update={
                "name": f"{self.label}{UNTRAINED_SUFFIX}",
                "compare_untrained": False,
                "training": self.training.model_copy(update={"steps": 0, "epochs": None}),
            }
        )

    def twins(self) -> list[VariantBase]:
        return [self.untrained_twin()] if self.compare_untrained else []
