"""The export stage: PyTorch and Hugging Face models to FP32 ONNX, with a parity check.

torch and transformers are imported inside the functions that need them: the ONNX-only path of the
pipeline never imports them (they are an optional extra, `pip install int8flow[torch]`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from int8flow.tasks.data import Batch, Tokenizer
from int8flow.tasks.errors import InputError
from int8flow.tasks.sources import HuggingFaceModelSource, PyTorchModelSource, TorchSource
from int8flow.tasks.usercode import UserCodeError, call_user

HF_OUTPUT_NAMES = {
    "sentence-embedding": "sentence_embedding",
    "feature-extraction": "last_hidden_state",
    "sequence-classification": "logits",
}
PARITY_BATCHES = 4  # enough to catch a traced-away branch without doubling evaluation time


class ExportError(InputError):
    """The source model cannot be exported as the spec says (factory, checkpoint, torch export, parity)."""


class ParityError(ExportError):
    pass


@dataclass(frozen=True)
class ExportedModel:
    path: Path
    parity_max_abs_diff: float | None  # None when the source already was ONNX
    seconds: float
    notes: list[str] = field(default_factory=list)


def import_torch(error: type[Exception] = ExportError, needed_by: str = "this model source"):
    """torch, or `error` saying what needs it and which extra installs it."""
    try:
        import torch
    except ImportError as missing:
        raise error(f"{needed_by} needs PyTorch: pip install 'int8flow[torch]'") from missing
    return torch


_torch = import_torch


# -- PyTorch ------------------------------------------------------------------------------------------


def load_pytorch_module(source: PyTorchModelSource):
    torch = _torch()
    try:
        module = call_user(source.factory, source.load(source.factory))
    except UserCodeError as error:
        raise ExportError(str(error)) from error
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{source.factory} returned {type(module).__name__}, not a torch.nn.Module")
    if source.checkpoint is not None:
        _load_checkpoint(torch, module, source)
    return module.eval()


def _load_checkpoint(torch, module, source: PyTorchModelSource) -> None:
    try:
        state = torch.load(source.checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and torch's own errors: all mean "not a state dict file"
        raise ExportError(
            f"checkpoint {source.checkpoint}: cannot be read as a state dict ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    if not isinstance(state, dict):
        raise ExportError(f"checkpoint {source.checkpoint}: holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise ExportError(
            f"checkpoint {source.checkpoint} does not fit {source.factory}'s model: {str(error).splitlines()[0]}"
        ) from error


def export_pytorch(source: PyTorchModelSource, batches: Sequence[Batch], out: Path) -> ExportedModel:
    """Export the factory's module to `out` (example: the first batch), then check parity on `batches`."""
    started = time.perf_counter()
    module = load_pytorch_module(source)
    export_module(source, module, batches, out)
    difference = parity(module, out, batches[:PARITY_BATCHES], module_input_names(source))
    _check_tolerance(difference, source.export.parity_tolerance)
    return ExportedModel(out, difference, time.perf_counter() - started)


def _pytorch_axes(source: PyTorchModelSource) -> dict[str, dict[int, str]]:
    dynamic_axes = {
        tensor.name: {axis: dim for axis, dim in enumerate(tensor.shape) if isinstance(dim, str)}
        for tensor in source.inputs
    }
    first_dynamic = next((axes for axes in dynamic_axes.values() if 0 in axes), None)
    for output in source.outputs:
        if first_dynamic is not None:
            dynamic_axes[output] = {0: first_dynamic[0]}
    return dynamic_axes


# -- Hugging Face -------------------------------------------------------------------------------------


def _offline() -> None:
    # Nothing may be fetched at run time: make transformers fail loudly instead of trying the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def hf_tokenizer(source: HuggingFaceModelSource) -> Tokenizer:
    """Tokenize texts to fixed-length numpy inputs (padded to `max_length`, so every batch has one shape)."""
    _offline()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.path))

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=source.max_length, return_tensors="np"
        )
        return {
            name: np.asarray(encoded[name], dtype=np.int64) for name in tokenizer.model_input_names if name in encoded
        }

    return tokenize


def hf_input_names(source: HuggingFaceModelSource) -> list[str]:
    _offline()
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(source.path)).model_input_names)


def load_hf_module(source: HuggingFaceModelSource):
    """The transformers model wrapped so its forward takes the tokenizer's inputs and returns one tensor."""
    torch = _torch()
    _offline()
    import transformers

    # Eager attention traces into the MatMul/Softmax pattern ORT's transformer optimizer fuses.
    loader = (
        transformers.AutoModelForSequenceClassification
        if source.task == "sequence-classification"
        else transformers.AutoModel
    )
    model = loader.from_pretrained(str(source.path), attn_implementation="eager").eval()
    names = hf_input_names(source)

    class Wrapped(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *tensors):
            inputs = dict(zip(names, tensors, strict=True))
            result = self.model(**inputs)
            if source.task == "sequence-classification":
                return result.logits
            hidden = result.last_hidden_state
            if source.task == "feature-extraction":
                return hidden
            # sentence-transformers' mean pooling: average of token vectors where the mask is 1
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1) if source.normalize else pooled

    return Wrapped().eval()


def export_huggingface(source: HuggingFaceModelSource, batches: Sequence[Batch], out: Path) -> ExportedModel:
    started = time.perf_counter()
    module = load_hf_module(source)
    export_module(source, module, batches, out)
    difference = parity(module, out, batches[:PARITY_BATCHES], module_input_names(source))
    _check_tolerance(difference, source.export.parity_tolerance)
    notes = [f"pooling: {'mean over attention mask, in the graph' if source.task == 'sentence-embedding' else 'none'}"]
    return ExportedModel(out, difference, time.perf_counter() - started, notes)


def _hf_axes(source: HuggingFaceModelSource) -> dict[str, dict[int, str]]:
    output = HF_OUTPUT_NAMES[source.task]
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in hf_input_names(source)}
    dynamic_axes[output] = {0: "batch", 1: "sequence"} if source.task == "feature-extraction" else {0: "batch"}
    return dynamic_axes


def _padded_example(batches: Sequence[Batch]) -> Batch:
    """A trace example that contains padding: traced without any, the mask logic is folded away."""
    for batch in batches:
        mask = batch.inputs.get("attention_mask")
        if mask is None or (mask == 0).any():
            return batch
    raise ExportError(
        "no evaluation batch contains padding, and tracing needs one that does: "
        "set the model's max_length above the token count of the shortest text"
    )


# -- shared ---------------------------------------------------------------------------------------------


def module_input_names(source: TorchSource) -> list[str]:
    """The module's forward() arguments, in order: the spec's inputs, or the tokenizer's."""
    if isinstance(source, HuggingFaceModelSource):
        return hf_input_names(source)
    return [tensor.name for tensor in source.inputs]


def module_output_names(source: TorchSource) -> list[str]:
    if isinstance(source, HuggingFaceModelSource):
        return [HF_OUTPUT_NAMES[source.task]]
    return list(source.outputs)


def export_module(source: TorchSource, module, batches: Sequence[Batch], out: Path, opset: int | None = None) -> None:
    """Export `module` (the source's model, or a changed copy of it) the way the spec says, to `out`."""
    if isinstance(source, HuggingFaceModelSource):
        axes, example = _hf_axes(source), _padded_example(batches)
    else:
        axes, example = _pytorch_axes(source), batches[0]
    options = (
        source.export if opset is None else source.export.model_copy(update={"opset": max(opset, source.export.opset)})
    )
    _export(module, example, module_input_names(source), module_output_names(source), axes, options, out)


def _export(module, example: Batch, input_names, output_names, dynamic_axes, options, out: Path) -> None:
    torch = _torch()
    out.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example.inputs[name])) for name in input_names)
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(out),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=options.opset,
                dynamo=options.exporter == "dynamo",
            )
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed: {type(error).__name__}: {error}") from error
    if options.exporter == "dynamo":
        # the dynamo exporter writes weights to a side `.data` file; one self-contained file is simpler
        # to hash, copy and register (models over 2 GB keep external data)
        model = onnx.load(str(out))
        if model.ByteSize() < 2**31 - 2**20:
            for stale in out.parent.glob(f"{out.name}.data"):
                stale.unlink()
            onnx.save(model, str(out))


def parity(module, onnx_path: Path, batches: Sequence[Batch], input_names: Sequence[str]) -> float:
    """Max abs difference between the module and the exported ONNX model on `batches`."""
    torch = _torch()
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_inputs = {value.name for value in session.get_inputs()}
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            expected = module(*(torch.from_numpy(np.ascontiguousarray(batch.inputs[n])) for n in input_names))
            expected = expected[0] if isinstance(expected, (tuple, list)) else expected
            got = session.run(None, {n: batch.inputs[n] for n in input_names if n in onnx_inputs})[0]
            worst = max(worst, float(np.max(np.abs(got - expected.numpy()))))
    return worst


def _check_tolerance(difference: float, tolerance: float) -> None:
    if not difference <= tolerance:
        raise ParityError(
            f"exported ONNX model differs from the source model by up to {difference:.3g} on evaluation "
            f"inputs (parity_tolerance {tolerance:g}): the export is wrong, not the quantization"
        )


def declared_input_dtypes(source: TorchSource) -> dict[str, np.dtype]:
    """Input dtypes known before export: from the spec (PyTorch) or the tokenizer (Hugging Face)."""
    if isinstance(source, HuggingFaceModelSource):
        return {name: np.dtype("int64") for name in hf_input_names(source)}
    return {tensor.name: np.dtype(tensor.dtype) for tensor in source.inputs}


def export_model(source: TorchSource, batches: Sequence[Batch], out: Path) -> ExportedModel:
    """The source model as FP32 ONNX at `out`, checked for parity on `batches`."""
    if isinstance(source, HuggingFaceModelSource):
        return export_huggingface(source, batches, out)
    return export_pytorch(source, batches, out)
