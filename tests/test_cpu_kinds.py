"""What depends on the CPU holds on every CPU kind these machines have.

The integer kernels ONNX Runtime picks depend on the CPU: an AVX2-only EPYC adds pairs of u8*s8
products in int16 (and saturates), an AVX-512 VNNI machine accumulates in int32. Tests that read the
kernels ask the CPU they run on (`tasks.hardware.detect`). To also hold them to the other kind, this
module runs them once more on an emulated AVX2-only CPU (`qemu-x86_64 -cpu Haswell`, Debian's
qemu-user, installed by scripts/setup.sh), which ORT's CPUID dispatch sees as a Haswell: its AVX2
kernels run, bit for bit, as the issue's AVX2 machine ran them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from int8flow.flows.plan import make_plan
from int8flow.flows.spec import PipelineSpec
from int8flow.tasks.hardware import HardwareInfo, detect, preset_for

ROOT = Path(__file__).resolve().parent.parent
# The tests whose assertions depend on the integer kernels, run again on the emulated CPU.
KERNEL_TESTS = [
    "tests/test_cpu_kinds.py::test_the_cpu_is_the_one_the_lane_asked_for",
    "tests/test_qat.py::test_exported_qdq_model_matches_the_fake_quantized_torch_model",
    "tests/test_stages.py",
    "tests/test_coverage.py",
    "tests/test_repair.py",
    "tests/test_fallback.py",
    "tests/test_saturation.py",
    "tests/test_pipeline_e2e.py::test_nothing_promoted_when_no_variant_meets_constraints",
]
AVX2_ONLY = HardwareInfo(
    "AMD EPYC (AVX2, no VNNI)",
    "x86_64",
    2,
    {"avx2": True, "avx512_vnni": False, "avx_vnni": False},
    ("CPUExecutionProvider",),
)


def test_flags_only_cpuinfo_lists_count_only_when_the_cpu_itself_has_what_they_imply(tmp_path):
    # an AVX-VNNI host running `qemu-x86_64 -cpu Haswell`: /proc/cpuinfo is the host's, CPUID the emulated one's
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Intel(R) Xeon(R)\nflags\t\t: fpu sse avx avx2 fma f16c avx_vnni amx_int8\n")
    emulated_haswell = {"AVX": True, "AVX2": True, "FMA3": True, "F16C": True}
    assert preset_for(detect(cpuinfo, emulated_haswell)) == "avx2"
    alder_lake = emulated_haswell | {"GFNI": True}
    assert detect(cpuinfo, alder_lake).flags["avx_vnni"] and preset_for(detect(cpuinfo, alder_lake)) == "avx512_vnni"
    assert not detect(cpuinfo, alder_lake).flags["amx_int8"]  # AMX needs AVX-512, which CPUID does not show


def test_the_cpu_is_the_one_the_lane_asked_for():
    expected = os.environ.get("INT8FLOW_EXPECT_PRESET")
    if expected is None:
        pytest.skip("run inside the emulated-CPU lane below")
    assert preset_for(detect()) == expected


def test_kernel_dependent_tests_hold_on_an_emulated_avx2_cpu():
    if preset_for(detect()) == "avx2":
        pytest.skip("this CPU is AVX2 without VNNI already: the whole suite ran on it")
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 (Debian's qemu-user) is not installed; scripts/setup.sh installs it")
    command = [qemu, "-cpu", "Haswell", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS]
    result = subprocess.run(
        command,
        cwd=ROOT,
        env=os.environ | {"INT8FLOW_EXPECT_PRESET": "avx2"},
        capture_output=True,
        text=True,
        timeout=2400,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, result.stdout[-6000:]
    assert " passed" in summary and "skipped" not in summary, summary


def test_a_spec_that_forces_saturating_weights_is_warned_about_on_an_avx2_cpu(digits_model):
    # given a spec that leaves the target to detection but forces 8-bit weights on one variant
    spec = PipelineSpec.model_validate(
        {
            "name": "forced",
            "model": {"source": "onnx", "path": str(digits_model.model)},
            "evaluation": {"data": {"path": str(digits_model.evaluation)}},
            "variants": [
                {"kind": "dynamic", "reduce_range": False, "name": "forced"},
                {"kind": "dynamic", "name": "open"},
            ],
        }
    )
    # when it is planned on an AVX2-only CPU, then the forced variant is named in a warning the run records
    plan = make_plan(spec, AVX2_ONLY)
    assert plan.preset.name == "avx2" and len(plan.warnings) == 1
    assert plan.warnings[0].startswith("forced:") and "saturate" in plan.warnings[0]
    assert [v.reduce_range for v in plan.variants] == [False, "where_needed"], "the open one: 7 bits where needed"
    assert any("reduce_range where_needed) for open" in note for note in plan.notes)
    # and on a VNNI CPU there is nothing to warn about
    vnni = HardwareInfo("Xeon", "x86_64", 2, {"avx2": True, "avx512_vnni": True}, ("CPUExecutionProvider",))
    assert make_plan(spec, vnni).warnings == ()
