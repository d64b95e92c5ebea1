"""Prepare the FP32 model for quantization with ONNX Runtime's `quant_pre_process`."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import Field

from int8flow.tasks.model import model_files, uses_external_data
from int8flow.tasks.options import StrictModel


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
        Literal[
            "attention",
            "skip_layer_norm",
            "embed_layer_norm",
            "bias_gelu",
            "gelu",
            "layer_norm",
            "bias_skip_layer_norm",
        ]
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


# quant_pre_process writes scratch files into the current directory, so it runs from a temp dir;
# the working directory is process-wide, hence the lock.
_CWD_LOCK = threading.Lock()


@dataclass(frozen=True)
class PreprocessedModel:
    path: Path
    symbolic_shape_inference: bool
    notes: list[str] = field(default_factory=list)


def preprocess(model: Path, options: Preprocess, out: Path) -> PreprocessedModel:
    """Write the pre-processed model to `out`; fall back to no symbolic shape inference if it fails."""
    model, out = model.resolve(), out.resolve()  # it runs from a temp working directory
    out.parent.mkdir(parents=True, exist_ok=True)
    if not options.quant_pre_process:
        _copy_model(model, out)
        return PreprocessedModel(out, symbolic_shape_inference=False, notes=["pre-processing disabled in the spec"])
    try:
        _run(model, out, options, skip_symbolic_shape=False)
        return PreprocessedModel(out, symbolic_shape_inference=True)
    except Exception as error:  # noqa: BLE001 - ORT raises bare Exceptions here ("Incomplete symbolic shape inference")
        first_error = f"{type(error).__name__}: {error}"
    _run(model, out, options, skip_symbolic_shape=True)
    note = f"symbolic shape inference failed ({first_error.splitlines()[0]}); pre-processed without it"
    return PreprocessedModel(out, symbolic_shape_inference=False, notes=[note])


def _run(model: Path, out: Path, options: Preprocess, *, skip_symbolic_shape: bool) -> None:
    with _CWD_LOCK, tempfile.TemporaryDirectory(prefix="int8flow-pre-") as scratch, contextlib.chdir(scratch):
        quant_pre_process(
            str(model),
            str(out),
            skip_optimization=options.skip_optimization,
            skip_symbolic_shape=skip_symbolic_shape,
            auto_merge=True,
            save_as_external_data=uses_external_data(model),
            all_tensors_to_one_file=True,
            external_data_location=f"{out.name}.data",
        )


def _copy_model(model: Path, out: Path) -> None:
    for file in model_files(model):
        target = out if file == model else out.parent / file.name
        shutil.copyfile(file, target)


@dataclass(frozen=True)
class FusedModel:
    path: Path
    fused_ops: dict[str, int]  # the optimizer's own statistics, e.g. {"Attention": 6, "SkipLayerNormalization": 12}
    notes: list[str] = field(default_factory=list)


_FUSION_FLAGS = {
    "attention": "enable_attention",
    "skip_layer_norm": "enable_skip_layer_norm",
    "embed_layer_norm": "enable_embed_layer_norm",
    "bias_gelu": "enable_bias_gelu",
    "gelu": "enable_gelu",
    "layer_norm": "enable_layer_norm",
    "bias_skip_layer_norm": "enable_bias_skip_layer_norm",
}


def fuse_transformer(model: Path, options: TransformerFusion, out: Path) -> FusedModel:
    """Apply ORT's transformer fusions (Attention, SkipLayerNorm, BiasGelu, ...) and save to `out`."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusion_options = FusionOptions(options.model_type)
    for name in options.disable:
        setattr(fusion_options, _FUSION_FLAGS[name], False)
    if options.attention_mask == "raw":
        fusion_options.attention_mask_format = AttentionMaskFormat.AttentionMask
    optimized = optimize_model(
        str(model),
        model_type=options.model_type,
        num_heads=options.num_heads,
        hidden_size=options.hidden_size,
        optimization_options=fusion_options,
        opt_level=options.opt_level,
        use_gpu=False,
        provider="CPUExecutionProvider",
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    statistics = {op: count for op, count in optimized.get_fused_operator_statistics().items() if count}
    finish_transformer_graph(optimized.model, options)
    optimized.save_model_to_file(str(out), use_external_data_format=uses_external_data(model))
    notes = []
    if (
        not statistics.get("Attention")
        and not statistics.get("MultiHeadAttention")
        and "attention" not in options.disable
    ):
        notes.append("no Attention was fused: the attention subgraph did not match ORT's patterns")
    return FusedModel(out, statistics, notes)


def finish_transformer_graph(model: onnx.ModelProto, options: TransformerFusion) -> list[str]:
    """The graph edits `options` ask for, in place: mask filter value on (Q)Attention, no value_info.

    Applied to the fused graph and again to each fused variant, since quantizers add value_info back.
    """
    notes = []
    if options.mask_filter_value is not None:
        attention = [node for node in model.graph.node if node.op_type in ("Attention", "QAttention")]
        for node in attention:
            kept = [a for a in node.attribute if a.name != "mask_filter_value"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("mask_filter_value", options.mask_filter_value)])
        if attention:
            notes.append(f"mask_filter_value {options.mask_filter_value:g} on {len(attention)} attention nodes")
    if options.strip_value_info and len(model.graph.value_info):
        del model.graph.value_info[:]
        notes.append("value_info dropped (ORT cannot re-create fusions left out at load)")
    return notes
