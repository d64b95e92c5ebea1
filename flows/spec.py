"""The pipeline spec: strict pydantic models, one registry of variant kinds.

A YAML file in `pipelines/` validates into `PipelineSpec`. Unknown keys are errors, every field says
what it means (the JSON Schema in `pipelines/schema.json` is generated from these models), relative
paths are resolved against the spec file's folder, and `resolved_variants()` gives the variants with
grids expanded and defaults filled in: those resolved values are what gets run and logged.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

CalibrationMethod = Literal["minmax", "entropy", "percentile", "distribution"]
Int8Type = Literal["QInt8", "QUInt8"]
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def resolve_path(value: Path, info: ValidationInfo, *, must_exist: bool = True) -> Path:
    """Resolve `value` against the spec file's folder and check it exists (when validating a file)."""
    path = value if value.is_absolute() else _base_dir(info) / value
    path = path.resolve()
    if must_exist and (info.context or {}).get("check_paths", True) and not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    return path


def resolve_callable(reference: str, base_dir: Path | None = None):
    """Import `module:function`; the spec's folder is searched first, like a project root."""
    module_name, _, attribute = reference.partition(":")
    if base_dir is not None and str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import module {module_name!r}: {error}") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ValueError(f"module {module_name!r} has no callable {attribute!r}")
    return function


def check_callable(reference: str, info: ValidationInfo) -> str:
    if (info.context or {}).get("check_imports", True):
        resolve_callable(reference, _base_dir(info))
    return reference


# ---------------------------------------------------------------------------------------------------
# Model, data and metrics


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


class _PathInPackage(StrictModel):
    """A `path` relative to the spec file, or to the folder of an installed `package`."""

    package: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z_][\w.]*$",
        description="Installed Python package whose folder `path` is relative to (models shipped in "
        "pip packages); default: `path` is relative to the spec file.",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_in_package(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and data.get("package") and data.get("path") is not None:
            try:
                root = package_dir(str(data["package"]))
            except ValueError:
                return data  # reported by the field validator below
            return {**data, "path": root / str(data["path"])}
        return data

    @field_validator("package")
    @classmethod
    def _installed(cls, value: str | None) -> str | None:
        if value is not None:
            package_dir(value)
        return value


class OnnxModelSource(_PathInPackage):
    source: Literal["onnx"] = Field(description="Where the FP32 model comes from; `onnx`: an ONNX file.")
    path: Path = Field(
        description="The FP32 `.onnx` file (external-data files beside it are found from the model)."
    )

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        if path.exists() and path.suffix != ".onnx":
            raise ValueError(f"expected an .onnx file, got {path.name}")
        return path


TensorDtype = Literal["float32", "float16", "int64", "int32", "uint8", "int8", "bool"]


class InputSpec(StrictModel):
    name: str = Field(description="ONNX input name (and the key of this input in data files).")
    shape: list[int | str] = Field(
        min_length=1, description="Dimensions; a name instead of a number makes that axis dynamic."
    )
    dtype: TensorDtype = Field(default="float32", description="Element type.")


class ExportOptions(StrictModel):
    opset: int = Field(default=17, ge=11, le=23, description="ONNX opset of the exported model.")
    exporter: Literal["torchscript", "dynamo"] = Field(
        default="torchscript",
        description="`torch.onnx.export` flavour: `torchscript` (dynamo=False, fast) or `dynamo`.",
    )
    parity_tolerance: float = Field(
        default=1e-3,
        gt=0,
        description="Largest accepted max-abs difference between the exported FP32 ONNX model and the "
        "source model on evaluation inputs; above it the pipeline stops with a clear error.",
    )


class PyTorchModelSource(StrictModel):
    source: Literal["pytorch"] = Field(description="`pytorch`: an nn.Module from a factory function.")
    factory: str = Field(
        pattern=CALLABLE_PATTERN, description="`module:function` returning the `torch.nn.Module`."
    )
    checkpoint: Path | None = Field(
        default=None,
        description="State dict loaded with `torch.load(..., weights_only=True)`; relative to the spec.",
    )
    inputs: list[InputSpec] = Field(min_length=1, description="Model inputs, in forward() order.")
    outputs: list[str] = Field(min_length=1, description="Names given to the model outputs.")
    export: ExportOptions = Field(default_factory=ExportOptions, description="ONNX export settings.")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("factory")
    @classmethod
    def _importable(cls, value: str, info: ValidationInfo) -> str:
        return check_callable(value, info)


class HuggingFaceModelSource(_PathInPackage):
    source: Literal["huggingface"] = Field(description="`huggingface`: a local transformers model folder.")
    path: Path = Field(
        description="Folder with config, weights and tokenizer (relative to the spec, or to `package`)."
    )
    task: Literal["sentence-embedding", "feature-extraction", "sequence-classification"] = Field(
        default="sentence-embedding",
        description="`sentence-embedding`: mean pooling over the attention mask is part of the exported "
        "graph (output `sentence_embedding`); `feature-extraction`: `last_hidden_state`; "
        "`sequence-classification`: `logits`.",
    )
    normalize: bool = Field(
        default=False, description="L2-normalise sentence embeddings inside the graph."
    )
    max_length: int = Field(
        default=128, ge=2, description="Texts are padded/truncated to this many tokens."
    )
    export: ExportOptions = Field(default_factory=ExportOptions, description="ONNX export settings.")

    @field_validator("path")
    @classmethod
    def _is_model_folder(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        if path.exists() and not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json: not a transformers model folder")
        return path


MODEL_SOURCES: dict[str, type[StrictModel]] = {
    "onnx": OnnxModelSource,
    "pytorch": PyTorchModelSource,
    "huggingface": HuggingFaceModelSource,
}
ModelSource = Annotated[
    Union[OnnxModelSource, PyTorchModelSource, HuggingFaceModelSource], Field(discriminator="source")
]


class DataSource(StrictModel):
    """Inputs (and optional labels), from exactly one of `path` or `callable`."""

    path: Path | None = Field(
        default=None,
        description="An `.npz` file (arrays keyed by model input name, optional `labels`; first axis = "
        "samples) or a folder of `.npz`/`.npy` files (a `.npy` feeds a single-input model).",
    )
    callable: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="`module:function` returning an iterable of input dicts, or of (input dict, labels) "
        "pairs; each dict maps input names to arrays with a batch axis. The spec's folder is importable.",
    )
    texts: Path | None = Field(
        default=None,
        description="A `.txt` file, one text per line, tokenized with the `huggingface` model's tokenizer.",
    )
    batch_size: int = Field(default=16, ge=1, description="Samples per inference call.")
    limit: int | None = Field(default=None, ge=1, description="Use at most this many samples.")

    @field_validator("path", "texts")
    @classmethod
    def _path_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("callable")
    @classmethod
    def _importable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_callable(value, info)

    @model_validator(mode="after")
    def _exactly_one(self) -> DataSource:
        if sum(value is not None for value in (self.path, self.callable, self.texts)) != 1:
            raise ValueError("give exactly one of `path`, `callable` or `texts`")
        return self


BUILTIN_METRICS: dict[str, str] = {
    "top1": "top-1 accuracy of argmax(output) against the labels (needs labels)",
    "cosine": "mean cosine similarity of each sample's output vs the FP32 model's",
    "mae": "mean absolute error vs the FP32 model's output",
    "mre": "relative error vs FP32: sum |output - fp32| / sum |fp32|",
    "nn_agreement": "share of samples whose nearest other sample (cosine of outputs) is the same as "
    "under FP32: retrieval agreement for embedding models",
}
LOWER_IS_BETTER = {"mae", "mre"}


class Metric(StrictModel):
    """A built-in metric by name (`top1`, `cosine`, `mae`, `mre`) or a user metric `module:function`."""

    name: str = Field(description="Built-in metric name, or the name a user metric is logged under.")
    function: str | None = Field(
        default=None,
        pattern=CALLABLE_PATTERN,
        description="User metric `module:function(outputs, reference_outputs, labels) -> float`; "
        "outputs are lists of arrays per batch, labels None when the data has none.",
    )
    higher_is_better: bool | None = Field(
        default=None, description="Direction of a user metric; built-ins know their own."
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str | None, info: ValidationInfo) -> str | None:
        return None if value is None else check_callable(value, info)

    @model_validator(mode="after")
    def _known(self) -> Metric:
        if self.function is None and self.name not in BUILTIN_METRICS:
            raise ValueError(
                f"unknown metric {self.name!r}: expected one of {', '.join(BUILTIN_METRICS)} "
                "or a user metric with `function: module:function`"
            )
        if self.function is not None and self.name in BUILTIN_METRICS:
            raise ValueError(f"{self.name!r} is a built-in metric; give the user metric another name")
        return self

    @property
    def higher_better(self) -> bool:
        if self.function is None:
            return self.name not in LOWER_IS_BETTER
        return True if self.higher_is_better is None else self.higher_is_better


class Evaluation(StrictModel):
    data: DataSource = Field(description="Evaluation inputs, with labels for `top1`.")
    metrics: list[Metric] = Field(
        default_factory=lambda: [Metric(name="cosine")],
        min_length=1,
        description="Metrics computed for FP32 and every variant; the first one drives selection "
        "unless `selection.metric` says otherwise.",
    )
    output: str | None = Field(
        default=None, description="Model output the metrics read; default: the first output."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Evaluation:
        names = [metric.name for metric in self.metrics]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"metric names must be unique: {', '.join(duplicates)}")
        return self


class Calibration(StrictModel):
    data: DataSource = Field(description="Representative inputs for static quantization ranges.")
    method: CalibrationMethod = Field(
        default="minmax", description="Default range method for static variants that don't set one."
    )
    samples: int = Field(default=128, ge=1, description="At most this many calibration samples.")
    percentile: float = Field(
        default=99.999, gt=50, le=100, description="Percentile kept by the `percentile` method."
    )
    symmetric: bool = Field(
        default=False, description="Make activation ranges symmetric around zero while calibrating."
    )


class TransformerFusion(StrictModel):
    """ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer.optimize_model`)."""

    model_type: Literal["bert", "bart", "gpt2", "t5", "vit", "clip", "unet", "vae"] = Field(
        default="bert", description="Architecture family whose fusion patterns to apply."
    )
    num_heads: int = Field(default=0, ge=0, description="Attention heads; 0: detect from the graph.")
    hidden_size: int = Field(default=0, ge=0, description="Hidden size; 0: detect from the graph.")
    opt_level: Literal[0, 1, 2, 99] = Field(
        default=0,
        description="0: the optimizer's own fusions only (ORT sessions apply their graph optimisations at "
        "load anyway); 1/2/99: also run ORT's offline graph optimisation at that level.",
    )
    disable: list[
        Literal["attention", "skip_layer_norm", "embed_layer_norm", "bias_gelu", "gelu", "layer_norm", "bias_skip_layer_norm"]
    ] = Field(default_factory=list, description="Fusions to leave out (FusionOptions `enable_*` = False).")
    attention_mask: Literal["raw", "mask_index_end"] = Field(
        default="raw",
        description="Mask format of fused Attention: `raw` (the 0/1 mask, right for any padding side) or "
        "ORT's `mask_index_end` (silently wrong for left-padded inputs).",
    )
    mask_filter_value: float | None = Field(
        default=None,
        lt=0,
        description="Score given to masked positions in fused (Q)Attention; ORT's default -10000 makes "
        "softmax produce denormal floats, very slow on some x86 CPUs; -30 already gives weight ~1e-13.",
    )
    strip_value_info: bool = Field(
        default=False,
        description="Drop shape hints (value_info) from fused variants, so ORT cannot re-create a fusion "
        "left out in `disable` (e.g. SkipLayerNormalization, whose CPU kernel is slow) at load time.",
    )


class Preprocess(StrictModel):
    quant_pre_process: bool = Field(
        default=True,
        description="Run ONNX Runtime's `quant_pre_process` (shape inference, graph optimisation) "
        "first. If symbolic shape inference fails it is retried without it, and the run says so.",
    )
    skip_optimization: bool = Field(
        default=False, description="Skip the ORT graph optimisation step of `quant_pre_process`."
    )
    transformer_fusion: TransformerFusion | None = Field(
        default=None,
        description="Also build a transformer-fused FP32 graph (Attention, LayerNorm, GELU fusion); "
        "variants with `fused: true` start from it.",
    )


# ---------------------------------------------------------------------------------------------------
# Variants: one registry, discriminated on `kind`


class VariantBase(StrictModel):
    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$",
        description="Run name of the variant; default: made from its kind and options.",
    )
    grid: dict[str, list[Any]] | None = Field(
        default=None,
        description="Expand into one variant per combination of these option values, "
        "e.g. `{per_channel: [true, false]}`.",
    )
    fused: bool = Field(
        default=False,
        description="Start from the transformer-fused graph (needs `preprocess.transformer_fusion`).",
    )

    def default_name(self) -> str:
        raise NotImplementedError

    def named(self, base: str) -> str:
        return f"fused-{base}" if self.fused else base

    @model_validator(mode="after")
    def _grid_keys(self) -> VariantBase:
        if not self.grid:
            return self
        options = set(type(self).model_fields) - {"kind", "name", "grid"}
        for key, values in self.grid.items():
            if key not in options:
                raise ValueError(
                    f"grid key {key!r} is not an option of kind {self.kind!r}; "  # type: ignore[attr-defined]
                    f"options: {', '.join(sorted(options))}"
                )
            if not values:
                raise ValueError(f"grid key {key!r} needs at least one value")
        for combination in self._grid_combinations():
            type(self).model_validate({**self._options(), **combination})
        return self

    def _options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"grid", "name"}, exclude_defaults=True) | {"kind": self.kind}  # type: ignore[attr-defined]

    def _grid_combinations(self) -> list[dict[str, Any]]:
        keys = list(self.grid or {})
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid or {}).values())]

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


class DynamicVariant(VariantBase):
    """ORT `quantize_dynamic`: int8 weights, activations quantized at run time."""

    kind: Literal["dynamic"] = Field(description="Dynamic quantization (weights int8 ahead of time).")
    weight_type: Int8Type | None = Field(default=None, description="Weight integer type; default: the target's.")
    per_channel: bool = Field(default=False, description="One scale per output channel of a weight.")
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights, avoids u8s8 saturation on CPUs without VNNI; default: the target's.",
    )
    op_types: list[str] | None = Field(
        default=None, description="Op types to quantize (e.g. [MatMul, Attention]); default: ORT's."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in float.")
    extra_options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to ORT as `extra_options`."
    )

    def default_name(self) -> str:
        granularity = "per-channel" if self.per_channel else "per-tensor"
        return self.named(f"dynamic-{(self.weight_type or 'QInt8').lower()}-{granularity}")


_SHORT_TYPES = {"QInt8": "s8", "QUInt8": "u8"}


class StaticVariant(VariantBase):
    """ORT `quantize_static` with ranges from the pipeline's calibration."""

    kind: Literal["static"] = Field(description="Static quantization (activation ranges calibrated).")
    format: Literal["QDQ", "QOperator"] = Field(default="QDQ", description="ONNX quantization format.")
    activation_type: Int8Type | None = Field(
        default=None, description="Activation integer type; default: the target's."
    )
    weight_type: Int8Type | None = Field(default=None, description="Weight integer type; default: the target's.")
    per_channel: bool = Field(default=False, description="One scale per output channel of a weight.")
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights, avoids u8s8 saturation on CPUs without VNNI; default: the target's.",
    )
    calibration_method: CalibrationMethod | None = Field(
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
        granularity = "per-channel" if self.per_channel else "per-tensor"
        method = self.calibration_method or "calib"
        types = _SHORT_TYPES[self.activation_type or "QUInt8"] + _SHORT_TYPES[self.weight_type or "QInt8"]
        return self.named(f"static-{self.format.lower()}-{types}-{granularity}-{method}")


class WeightOnlyInt4Variant(VariantBase):
    """ORT `MatMulNBitsQuantizer`: 4-bit block-wise weights, float activations."""

    kind: Literal["weight_only_int4"] = Field(description="Weight-only int4 (MatMulNBits).")
    block_size: Literal[16, 32, 64, 128, 256] = Field(default=32, description="Weights per scale.")
    symmetric: bool = Field(default=True, description="Symmetric blocks (no zero point).")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        default=None,
        description="MatMulNBits compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations.",
    )
    op_types: list[Literal["MatMul", "Gather"]] = Field(
        default_factory=lambda: ["MatMul"], description="Op types whose weights become int4."
    )
    nodes_to_exclude: list[str] = Field(default_factory=list, description="Node names kept in float.")

    def default_name(self) -> str:
        return self.named(f"int4-block{self.block_size}-{'sym' if self.symmetric else 'asym'}")


class Fp16Variant(VariantBase):
    """Float16 weights and compute, via ORT's `float16` converter."""

    kind: Literal["fp16"] = Field(description="Float16 conversion.")
    keep_io_types: bool = Field(default=True, description="Keep float32 model inputs and outputs.")
    op_block_list: list[str] | None = Field(
        default=None, description="Op types kept in float32; default: ORT's list."
    )

    def default_name(self) -> str:
        return self.named("fp16")


class Fp32Variant(VariantBase):
    """The FP32 graph after pre-processing, unquantized: shows what fusion alone buys."""

    kind: Literal["fp32"] = Field(description="No quantization (pre-processed or fused FP32 graph).")

    def default_name(self) -> str:
        return self.named("fp32")


class QatTraining(StrictModel):
    """How a `qat` variant is fine-tuned: data, length, optimiser and loss."""

    data: DataSource | None = Field(
        default=None,
        description="Training inputs (with labels for `loss: task`); default: the calibration data.",
    )
    steps: int = Field(
        default=200, ge=0, description="Optimiser steps (one batch each); 0 exports the calibrated model untrained."
    )
    epochs: int | None = Field(
        default=None, ge=1, description="Passes over the training data instead of `steps`."
    )
    max_seconds: float = Field(
        default=600.0, gt=0, description="Training stops after this long whatever `steps` says, and the run says so."
    )
    learning_rate: float = Field(default=1e-4, gt=0, description="AdamW learning rate of the weights (cosine decay).")
    scale_learning_rate: float = Field(
        default=1e-2, ge=0, description="Learning rate of the activation scales (LSQ); 0 keeps calibrated ranges fixed."
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
    threads: int | None = Field(default=None, ge=1, description="torch threads while training; default: torch's.")


class QatVariant(VariantBase):
    """Quantization-aware training in PyTorch (fake quantization), exported as a QDQ ONNX model."""

    kind: Literal["qat"] = Field(description="Fine-tune with fake quantization, then export QDQ ONNX.")
    layers: list[Literal["Linear", "Conv1d", "Conv2d"]] = Field(
        default_factory=lambda: ["Linear", "Conv1d", "Conv2d"],
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
        granularity = "per-channel" if self.per_channel else "per-tensor"
        types = _SHORT_TYPES[self.activation_type or "QUInt8"] + "s8"
        return self.named(f"qat-{types}-{granularity}")


VARIANT_KINDS: dict[str, type[VariantBase]] = {
    "dynamic": DynamicVariant,
    "static": StaticVariant,
    "weight_only_int4": WeightOnlyInt4Variant,
    "fp16": Fp16Variant,
    "fp32": Fp32Variant,
    "qat": QatVariant,
}
Variant = Annotated[
    Union[DynamicVariant, StaticVariant, WeightOnlyInt4Variant, Fp16Variant, Fp32Variant, QatVariant],
    Field(discriminator="kind"),
]


# ---------------------------------------------------------------------------------------------------
# Target hardware and the accuracy fallback


@dataclass(frozen=True)
class HardwarePreset:
    """Integer types for a CPU family (Optimum's `AutoQuantizationConfig.avx2()` and friends)."""

    activation_type: str
    weight_type: str
    reduce_range: bool
    why: str


HARDWARE_PRESETS: dict[str, HardwarePreset] = {
    "avx2": HardwarePreset(
        "QUInt8", "QInt8", True,
        "no VNNI: ORT's u8s8 kernels add pairs of u8*s8 products in int16 (vpmaddubsw), which saturates; "
        "7-bit weights (reduce_range) keep the sums in range",
    ),
    "avx512_vnni": HardwarePreset(
        "QUInt8", "QInt8", False, "VNNI accumulates u8*s8 products straight into int32: no saturation, full 8-bit weights"
    ),
    "arm64": HardwarePreset(
        "QUInt8", "QInt8", False, "ARM dot-product instructions accumulate in int32: no saturation, full 8-bit weights"
    ),
}


class Target(StrictModel):
    preset: Literal["auto", "avx2", "avx512_vnni", "arm64"] = Field(
        default="auto",
        description="Integer types and `reduce_range` for this CPU family, used by dynamic/static/qat variants "
        "that don't set them; `auto`: detected from the CPU this runs on (no VNNI and not ARM: `avx2`).",
    )


class AccuracyFallback(StrictModel):
    """What to do with a dynamic/static variant that misses `selection.max_drop`."""

    enabled: bool = Field(
        default=True,
        description="Keep the nodes with the largest quantization error in float, step by step, until the "
        "variant meets `selection.max_drop` or the budget runs out.",
    )
    max_steps: int = Field(default=6, ge=1, description="Most re-quantizations per variant.")
    max_seconds: float = Field(default=600.0, gt=0, description="Time budget per variant.")
    samples: int = Field(
        default=8, ge=1, description="Calibration samples used to measure each tensor's quantization error."
    )


# ---------------------------------------------------------------------------------------------------
# Profiling, selection, registry


class Profiling(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1], min_length=1, description="Batch sizes to time."
    )
    threads: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [1], min_length=1, description="ORT intra-op thread counts to time."
    )
    warmup: int = Field(default=5, ge=0, description="Untimed runs before timing, per model.")
    runs: int = Field(default=30, ge=3, description="Timed runs per model and configuration.")
    all_variants: bool = Field(
        default=False,
        description="Also time variants that miss `selection.max_drop` (they stay rejected), for side-by-side "
        "comparisons; by default they are not worth the time.",
    )


class Selection(StrictModel):
    metric: str | None = Field(
        default=None, description="Accuracy metric the constraints use; default: the first metric."
    )
    max_drop: float | None = Field(
        default=None, ge=0, description="Largest accepted accuracy drop vs FP32 (see `drop`)."
    )
    drop: Literal["absolute", "relative"] = Field(
        default="absolute", description="`max_drop` in metric units, or as a fraction of FP32's value."
    )
    min_speedup: float = Field(
        default=1.0,
        ge=0,
        description="Smallest accepted FP32/variant p50 latency ratio; 1.0 rejects anything slower "
        "than FP32.",
    )
    max_size_mb: float | None = Field(default=None, gt=0, description="Largest accepted model size.")
    objective: Literal["latency", "size", "accuracy"] = Field(
        default="latency", description="What `best` means among the variants that meet the constraints."
    )
    latency_tolerance: float = Field(
        default=0.03,
        ge=0,
        lt=1,
        description="Latencies within this fraction of the fastest count as a tie (timing noise), broken "
        "by accuracy, then size; the alias also moves only for a speed-up above 1 + this.",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Profiled batch size that counts; default: the first."
    )
    threads: int | None = Field(
        default=None, ge=1, description="Profiled thread count that counts; default: the first."
    )


class Registry(StrictModel):
    model_name: str = Field(min_length=1, description="Registered model name in the MLflow registry.")
    alias: str = Field(
        default="champion",
        pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$",
        description="Alias moved to the new version only if it beats the current holder.",
    )
    promote: bool = Field(default=True, description="Register the selected variant at all.")


def _with_preset(variant: VariantBase, preset: HardwarePreset) -> VariantBase:
    defaults = {"weight_type": preset.weight_type, "reduce_range": preset.reduce_range}
    if isinstance(variant, (StaticVariant, QatVariant)):
        defaults["activation_type"] = preset.activation_type
    elif not isinstance(variant, DynamicVariant):
        return variant
    return variant.model_copy(update={key: value for key, value in defaults.items() if getattr(variant, key) is None})


class PipelineSpec(StrictModel):
    """One quantization pipeline: a model, its data, the variants to try and what `best` means."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Pipeline name (MLflow experiment name)."
    )
    description: str = Field(default="", description="Free text, logged with the run.")
    model: ModelSource = Field(description="The FP32 source model: an ONNX file, PyTorch or Hugging Face.")
    preprocess: Preprocess = Field(default_factory=Preprocess, description="Before quantization.")
    calibration: Calibration | None = Field(
        default=None, description="Calibration data and method; required by static variants."
    )
    evaluation: Evaluation = Field(description="Evaluation data and metrics.")
    variants: list[Variant] = Field(min_length=1, description="The variants to try.")
    target: Target = Field(default_factory=Target, description="The CPU family the variants are made for.")
    fallback: AccuracyFallback = Field(
        default_factory=AccuracyFallback, description="Accuracy-aware retries of variants that miss the constraint."
    )
    profiling: Profiling = Field(default_factory=Profiling, description="Latency measurement.")
    selection: Selection = Field(default_factory=Selection, description="Constraints and objective.")
    registry: Registry | None = Field(
        default=None, description="Where the selected variant is registered; none: no registration."
    )

    KINDS: ClassVar[dict[str, type[VariantBase]]] = VARIANT_KINDS

    @model_validator(mode="after")
    def _cross_field_rules(self) -> PipelineSpec:
        errors = []
        metric_names = [metric.name for metric in self.evaluation.metrics]
        if self.selection.metric is not None and self.selection.metric not in metric_names:
            errors.append(
                f"selection.metric {self.selection.metric!r} is not an evaluation metric "
                f"({', '.join(metric_names)})"
            )
        if self.selection.batch_size is not None and self.selection.batch_size not in self.profiling.batch_sizes:
            errors.append(
                f"selection.batch_size {self.selection.batch_size} is not in profiling.batch_sizes"
            )
        if self.selection.threads is not None and self.selection.threads not in self.profiling.threads:
            errors.append(f"selection.threads {self.selection.threads} is not in profiling.threads")
        text_sources = [
            section for section, data in (("evaluation", self.evaluation.data), ("calibration", self.calibration.data if self.calibration else None))
            if data is not None and data.texts is not None
        ]
        if text_sources and self.model.source != "huggingface":
            errors.append(f"{', '.join(text_sources)}.data.texts needs a `source: huggingface` model (its tokenizer)")
        if self.preprocess.transformer_fusion is None and any(
            variant.fused or True in (variant.grid or {}).get("fused", []) for variant in self.variants
        ):
            errors.append("variants with `fused: true` need `preprocess.transformer_fusion`")
        if self.calibration is None and any(
            variant.kind == "static" or "calibration_method" in (variant.grid or {})
            for variant in self.variants
        ):
            errors.append("static variants need a `calibration:` section")
        qat = [variant for variant in self.variants if variant.kind == "qat"]
        if qat and self.model.source == "onnx":
            errors.append("qat variants train the PyTorch model: they need a `source: pytorch` or `source: huggingface` model")
        if qat and self.calibration is None:
            errors.append("qat variants need a `calibration:` section (initial ranges, default training data)")
        for variant in qat:
            if variant.fused:
                errors.append(f"qat variant {variant.name or variant.default_name()!r}: `fused` does not apply to qat")
        names = [variant.name for variant in self.resolved_variants()]
        names += [f"{v.name}-untrained" for v in self.resolved_variants() if isinstance(v, QatVariant) and v.compare_untrained]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            errors.append(
                f"variant names must be unique, these repeat: {', '.join(map(str, duplicates))} "
                "(give the variants a distinct `name:`)"
            )
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def with_model_file(self, path: Path) -> PipelineSpec:
        """This spec with its model replaced by the ONNX file at `path` (absolute)."""
        if not path.is_file() or path.suffix != ".onnx":
            raise ValueError(f"expected an existing .onnx file, got {path}")
        return self.model_copy(update={"model": OnnxModelSource(source="onnx", path=path)})

    def target_preset(self, detected: str | None = None) -> str:
        """The preset in force: the spec's, or for `auto` the one detected on this CPU (`avx2` if unknown)."""
        return self.target.preset if self.target.preset != "auto" else (detected or "avx2")

    def resolved_variants(self, detected_preset: str | None = None) -> list[VariantBase]:
        """Grids expanded, names given, static calibration methods filled in from `calibration`, integer
        types and `reduce_range` from the target preset where the variant leaves them open."""
        preset = HARDWARE_PRESETS[self.target_preset(detected_preset)]
        resolved = []
        for variant in self.variants:
            if isinstance(variant, StaticVariant) and variant.calibration_method is None and self.calibration:
                variant = variant.model_copy(update={"calibration_method": self.calibration.method})
            for expanded in variant.expand():
                resolved.append(_with_preset(expanded, preset))
        return resolved

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
