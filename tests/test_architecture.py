"""The house plan, checked: stages below the flow, no import circles, a flow that reads on one screen,
and variant kinds declared once (a new kind is one class in one registry, and runs end to end)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Literal

import onnx
import pytest
from pydantic import Field

from int8flow.flows.run import run_pipeline
from int8flow.flows.runner import InlineRunner
from int8flow.flows.spec import PipelineSpec, spec_model
from int8flow.flows.specfile import SpecError, load_spec
from int8flow.flows.tracking import NullPipelineRun
from int8flow.tasks.kinds import KINDS, KindFacts, MakeJob, VariantBase
from int8flow.tasks.model import Graph, save_model

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ("tasks", "flows")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("int8flow", *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))


def _imports(path: Path) -> set[str]:
    """Every int8flow module `path` imports, at module level or inside functions (not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("int8flow"):
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("int8flow")}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for floor in FLOORS for path in (ROOT / floor).rglob("*.py")}
    return {
        name: {imported for imported in _imports(path) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def test_stages_import_nothing_from_the_flow_layer():
    offenders = {
        name: sorted(i for i in imports if i.startswith("int8flow.flows"))
        for name, imports in _graph().items()
        if name.startswith("int8flow.tasks")
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_there_are_no_import_circles():
    graph = _graph()
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                circles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles


def test_the_flow_reads_on_one_screen_and_no_function_is_long():
    assert len((ROOT / "flows" / "pipeline.py").read_text().splitlines()) <= 350
    long = []
    for floor in FLOORS:
        for path in (ROOT / floor).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not long


class CopyVariant(VariantBase):
    """A toy kind defined here, in a test: the FP32 graph written out unchanged."""

    facts = KindFacts(summary="test kind: the FP32 graph, copied", starts_from=Graph.GIVEN)
    kind: Literal["copy"] = Field(description="A toy kind defined in a test.")
    tag: int = Field(default=1, ge=1, description="A toy option, to show grids work.")

    def default_name(self) -> str:
        return self.named(f"copy-{self.tag}")

    def make(self, model: Path, job: MakeJob) -> list[str]:
        save_model(onnx.load(str(model)), job.out, external=False)
        return [f"copied (tag {self.tag})"]


def test_a_new_kind_is_one_class_in_one_registry_and_runs_end_to_end(tmp_path, digits_model):
    # given a registry with one more kind, and a spec that uses it next to a built-in one
    kinds = KINDS.with_kind(CopyVariant)
    schema = spec_model(kinds).model_json_schema()
    assert "CopyVariant" in schema["$defs"] and "CopyVariant" not in json.dumps(PipelineSpec.model_json_schema())
    spec_file = tmp_path / "toy.yaml"
    spec_file.write_text(
        f"name: toy\nmodel: {{source: onnx, path: {digits_model.model}}}\n"
        f"evaluation: {{data: {{path: {digits_model.evaluation}}}, metrics: [top1]}}\n"
        "variants:\n  - {kind: copy, grid: {tag: [1, 2]}}\n  - {kind: fp16}\n"
        "selection: {min_speedup: 0.0}\nprofiling: {warmup: 1, runs: 3}\n"
    )
    spec = load_spec(spec_file, kinds=kinds)
    assert [variant.label for variant in spec.resolved_variants()] == ["copy-1", "copy-2", "fp16"]
    # when the pipeline runs it, with nothing but the registry knowing the new kind
    runner = InlineRunner()
    try:
        outcome = run_pipeline(spec, spec_file, runner, NullPipelineRun(), register=False)
    finally:
        runner.close()
    # then it is made, evaluated, timed and judged like any other variant
    assert outcome.variants == {"copy-1": "ok", "copy-2": "ok", "fp16": "ok"}
    assert outcome.selected in outcome.variants
    # and a spec checked against the built-in kinds refuses the kind it does not know
    with pytest.raises(SpecError, match="unknown kind 'copy'"):
        load_spec(spec_file)
