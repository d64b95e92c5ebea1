"""Where the FP32 model comes from (spec section `model`): an ONNX file, a PyTorch factory, a local
Hugging Face folder. The export stage (`tasks.export`) turns the last two into ONNX."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from int8flow.tasks.options import CALLABLE_PATTERN, StrictModel, WithUserCode, check_callable, resolve_path


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
    def _resolve_in_package(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("package") and data.get("path") is not None:
            try:
                root = package_dir(str(data["package"]))
            except (ValueError, ImportError):
                return data  # reported by the field validator below
            return {**data, "path": root / str(data["path"])}
        return data

    @field_validator("package")
    @classmethod
    def _installed(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                package_dir(value)
            except ImportError as error:
                raise ValueError(f"package {value!r} cannot be found: {error}") from None
        return value


class OnnxModelSource(_PathInPackage):
    source: Literal["onnx"] = Field(description="Where the FP32 model comes from; `onnx`: an ONNX file.")
    path: Path = Field(description="The FP32 `.onnx` file (external-data files beside it are found from the model).")

    @field_validator("path")
    @classmethod
    def _exists(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        if path.exists() and path.suffix != ".onnx":
            raise ValueError(f"expected an .onnx file, got {path.name}")
        if path.exists() and not path.is_file():
            raise ValueError(f"{path} is a folder, not an .onnx file")
        return path


TensorDtype = Literal["float32", "float16", "int64", "int32", "uint8", "int8", "bool"]


class InputSpec(StrictModel):
    name: str = Field(description="ONNX input name (and the key of this input in data files).")
    shape: list[int | str] = Field(
        min_length=1, max_length=8, description="Dimensions; a name instead of a number makes that axis dynamic."
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


class PyTorchModelSource(WithUserCode):
    source: Literal["pytorch"] = Field(description="`pytorch`: an nn.Module from a factory function.")
    factory: str = Field(pattern=CALLABLE_PATTERN, description="`module:function` returning the `torch.nn.Module`.")
    checkpoint: Path | None = Field(
        default=None,
        description="State dict loaded with `torch.load(..., weights_only=True)`; relative to the spec.",
    )
    inputs: list[InputSpec] = Field(min_length=1, max_length=64, description="Model inputs, in forward() order.")
    outputs: list[str] = Field(min_length=1, max_length=64, description="Names given to the model outputs.")
    export: ExportOptions = Field(default_factory=ExportOptions, description="ONNX export settings.")

    @field_validator("checkpoint")
    @classmethod
    def _checkpoint_exists(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else resolve_path(value, info)

    @field_validator("factory")
    @classmethod
    def _findable(cls, value: str, info: ValidationInfo) -> str:
        return check_callable(value, info)


class HuggingFaceModelSource(_PathInPackage):
    source: Literal["huggingface"] = Field(description="`huggingface`: a local transformers model folder.")
    path: Path = Field(description="Folder with config, weights and tokenizer (relative to the spec, or to `package`).")
    task: Literal["sentence-embedding", "feature-extraction", "sequence-classification"] = Field(
        default="sentence-embedding",
        description="`sentence-embedding`: mean pooling over the attention mask is part of the exported "
        "graph (output `sentence_embedding`); `feature-extraction`: `last_hidden_state`; "
        "`sequence-classification`: `logits`.",
    )
    normalize: bool = Field(default=False, description="L2-normalise sentence embeddings inside the graph.")
    max_length: int = Field(default=128, ge=2, le=8192, description="Texts are padded/truncated to this many tokens.")
    export: ExportOptions = Field(default_factory=ExportOptions, description="ONNX export settings.")

    @field_validator("path")
    @classmethod
    def _is_model_folder(cls, value: Path, info: ValidationInfo) -> Path:
        path = resolve_path(value, info)
        if path.exists() and not (path / "config.json").exists():
            raise ValueError(f"{path} has no config.json: not a transformers model folder")
        return path


TorchSource = PyTorchModelSource | HuggingFaceModelSource
MODEL_SOURCES: dict[str, type[StrictModel]] = {
    "onnx": OnnxModelSource,
    "pytorch": PyTorchModelSource,
    "huggingface": HuggingFaceModelSource,
}
ModelSource = Annotated[OnnxModelSource | PyTorchModelSource | HuggingFaceModelSource, Field(discriminator="source")]
