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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort
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
# flags numpy cannot check, and the numpy-checked flag each of them implies
_IMPLIES = {"avx_vnni": "avx2", "amx_tile": "avx512f", "amx_int8": "avx512f"}


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
            flags[name] = flags[name] and flags[requires]
    return HardwareInfo(
        cpu_model=model_name or platform.processor() or platform.machine(),
        machine=platform.machine(),
        logical_cpus=os.cpu_count() or 1,
        flags=flags,
        execution_providers=tuple(ort.get_available_providers()),
    )


# -- target presets ---------------------------------------------------------------------------------

PresetName = Literal["avx2", "avx512_vnni", "arm64"]


@dataclass(frozen=True)
class HardwarePreset:
    """Integer types for a CPU family (Optimum's `AutoQuantizationConfig.avx2()` and friends)."""

    name: PresetName
    activation_type: str
    weight_type: str
    reduce_range: bool
    why: str


HARDWARE_PRESETS: dict[str, HardwarePreset] = {
    "avx2": HardwarePreset(
        "avx2",
        "QUInt8",
        "QInt8",
        True,
        "no VNNI: ORT's u8s8 kernels add pairs of u8*s8 products in int16 (vpmaddubsw), which saturates; "
        "7-bit weights (reduce_range) keep the sums in range",
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


def saturates(preset: str, activation_type: str | None, weight_type: str | None, reduce_range: bool | None) -> bool:
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
