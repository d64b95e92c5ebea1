"""The CPU the numbers were measured on: model name and the instruction sets that matter for int8."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

# cpuinfo flag -> what it means for quantized kernels
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


def detect(cpuinfo: Path = Path("/proc/cpuinfo")) -> HardwareInfo:
    model_name, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and model_name in ("", platform.machine(), platform.processor()):
                model_name = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    return HardwareInfo(
        cpu_model=model_name,
        machine=platform.machine(),
        logical_cpus=os.cpu_count() or 1,
        flags={name: flag in flags for flag, name in INT8_FLAGS.items()},
        execution_providers=tuple(ort.get_available_providers()),
    )


def preset_for(hardware: HardwareInfo) -> str:
    """The `target.preset` this CPU matches: ARM, x86 with VNNI, or plain AVX2 (the safe default)."""
    if hardware.machine.lower() in ("aarch64", "arm64"):
        return "arm64"
    return "avx512_vnni" if hardware.has_vnni else "avx2"


def describe(hardware: HardwareInfo) -> str:
    present = [name for name, flag in hardware.flags.items() if flag]
    return f"{hardware.cpu_model} ({hardware.logical_cpus} CPUs; {', '.join(present) or 'no SIMD flags read'})"
