"""Read a spec file and report every problem at once, each with file:line, dotted path and a hint.

PyYAML's node tree keeps line numbers; pydantic's error locations (and those of the spec's cross-field
rules) are walked down that tree to find the line of the offending key (or its closest existing
parent). Reading is bounded: a spec over `MAX_SPEC_BYTES`, or whose anchors and aliases would expand
past `MAX_EXPANDED_NODES` ("billion laughs"), is refused before anything walks it.
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from int8flow.flows.spec import PipelineSpec, dotted, spec_model
from int8flow.tasks.kinds import KINDS, KindRegistry
from int8flow.tasks.preflight import Mismatch, check_against_model
from int8flow.tasks.sources import MODEL_SOURCES

MAX_SPEC_BYTES = 1_000_000
MAX_EXPANDED_NODES = 100_000


@dataclass(frozen=True)
class SpecProblem:
    file: Path
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else str(self.file)
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """The spec file cannot be used; `problems` lists every reason."""

    def __init__(self, problems: list[SpecProblem]):
        self.problems = problems
        super().__init__("\n".join(str(problem) for problem in problems))


def load_spec(
    file: Path, *, check_imports: bool = True, import_code: bool = False, kinds: KindRegistry | None = None
) -> PipelineSpec:
    """Parse and validate `file`; raise SpecError listing every problem.

    `check_imports`: check that `module:function` references resolve (without importing them unless
    `import_code`). `kinds`: another registry of variant kinds than the built-in one.
    """
    file = Path(file)
    text = _read(file)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        if _expanded_size(root, {}) > MAX_EXPANDED_NODES:
            raise SpecError(
                [
                    SpecProblem(
                        file,
                        None,
                        "",
                        f"anchors and aliases expand to more than {MAX_EXPANDED_NODES} YAML nodes; write the spec out",
                    )
                ]
            )
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(error, "problem", None) or str(error)
        raise SpecError([SpecProblem(file, line, "", f"invalid YAML: {reason}")]) from None

    problems = _duplicate_keys(file, root)
    if not isinstance(data, dict):
        problems.append(SpecProblem(file, 1, "", "expected a mapping of spec fields at the top level"))
        raise SpecError(problems)
    model = PipelineSpec if kinds is None or kinds is KINDS else spec_model(kinds)
    context = {
        "base_dir": file.resolve().parent,
        "check_imports": check_imports,
        "import_code": import_code,
        "defer_cross_field": True,
    }
    try:
        spec = model.model_validate(data, context=context)
    except ValidationError as error:
        problems.extend(_problem(file, root, detail, kinds or KINDS) for detail in error.errors())
        raise SpecError(problems) from None
    for rule in spec.problems():
        location = _data_location(root, rule.location)
        problems.append(SpecProblem(file, _line(root, location), dotted(location), rule.message))
    if not problems and check_imports:
        for mismatch in preflight(spec):
            location = _data_location(root, mismatch.location)
            problems.append(SpecProblem(file, _line(root, location), dotted(location), mismatch.message))
    if problems:
        raise SpecError(problems)
    return spec


def preflight(spec: PipelineSpec) -> list[Mismatch]:
    """The spec's ONNX model and data files checked against each other (`tasks.preflight`)."""
    if spec.model.source != "onnx":
        return []
    sources = spec.data_sources()
    names = [metric.name for metric in spec.evaluation.metrics]
    needs_labels = ("evaluation", "metrics", names.index("top1")) if "top1" in names else None
    return check_against_model(spec.model.path, sources, spec.evaluation.output, needs_labels)


def _read(file: Path) -> str:
    def refuse(message: str) -> SpecError:
        return SpecError([SpecProblem(file, None, "", message)])

    try:
        if file.is_dir():
            raise refuse("is a folder, not a spec file")
        size = file.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise refuse(f"{size:,} bytes; a spec is at most {MAX_SPEC_BYTES:,} (data goes in data files)")
        raw = file.read_bytes()
    except OSError as error:
        raise refuse(f"cannot read spec: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise SpecError(
            [SpecProblem(file, line, "", f"not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start})")]
        ) from None
    if not text.strip():
        raise refuse("the file is empty")
    return text


def _expanded_size(node: yaml.Node | None, sizes: dict[int, int]) -> int:
    """Nodes the tree holds once every alias is expanded (shared subtrees counted each time)."""
    if node is None:
        return 0
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, sizes) for item in node.value)
    else:
        size = 1
    sizes[id(node)] = min(size, MAX_EXPANDED_NODES + 1)
    return sizes[id(node)]


def _duplicate_keys(file: Path, node: yaml.Node | None, path: tuple = ()) -> list[SpecProblem]:
    """PyYAML silently keeps the last of two equal keys; a spec that repeats one is wrong."""
    problems: list[SpecProblem] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                problems.append(SpecProblem(file, key.start_mark.line + 1, dotted((*path, key.value)), "duplicate key"))
            seen.add(key.value)
            problems.extend(_duplicate_keys(file, value, (*path, key.value)))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems.extend(_duplicate_keys(file, item, (*path, index)))
    return problems


def _problem(file: Path, root: yaml.Node | None, detail: Any, kinds: KindRegistry) -> SpecProblem:
    location = _data_location(root, detail["loc"])
    message = detail["msg"].removeprefix("Value error, ")
    if detail["type"] == "extra_forbidden":
        message = "unknown key"
        owner = _model_at(detail["loc"][:-1], kinds)
        if owner is not None:
            known = [name for name in owner.model_fields if name != "model_config"]
            close = difflib.get_close_matches(str(detail["loc"][-1]), known, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]!r}?" if close else f"; expected one of: {', '.join(known)}"
    elif detail["type"] == "missing":
        message = "required field is missing"
    elif detail["type"] == "union_tag_invalid":
        context = detail.get("ctx", {})
        key, tag = context.get("discriminator", "").strip("'"), context.get("tag")
        expected = [option.strip().strip("'") for option in context.get("expected_tags", "").split(",")]
        message = f"unknown {key} {tag!r}; expected one of: {', '.join(expected)}"
        location = (*location, key)
        close = difflib.get_close_matches(str(tag), expected, n=1)
        if close:
            message += f"; did you mean {close[0]!r}?"
    elif detail["type"] not in {"value_error", "assertion_error"} and "input" in detail:
        shown = detail["input"]
        if not isinstance(shown, (dict, list)):
            message += f" (got {shown!r})"
    line = _line(root, location)
    return SpecProblem(file, line, dotted(location), message)


def _data_location(root: yaml.Node | None, loc: tuple) -> tuple:
    """Drop the parts of a pydantic location that are not in the data (discriminator tags)."""
    location: list = []
    node = root
    for part in loc:
        child = _child(node, part)
        if child is None and _is_union_tag(node, part):
            continue  # pydantic puts the discriminator's value (`static`, `onnx`) into the location
        location.append(part)
        node = child
    return tuple(location)


DISCRIMINATORS = ("kind", "source")


def _is_union_tag(node: yaml.Node | None, part: Any) -> bool:
    if not isinstance(node, yaml.MappingNode) or not isinstance(part, str):
        return False
    return any(key.value in DISCRIMINATORS and getattr(value, "value", None) == part for key, value in node.value)


def _child(node: yaml.Node | None, part: Any) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if key.value == str(part):
                return value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        return node.value[part]
    return None


def _line(root: yaml.Node | None, location: tuple) -> int | None:
    """Line of the deepest key found; a missing field points at the mapping that should hold it."""
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    for part in location:
        if isinstance(node, yaml.MappingNode):
            match = next(((key, value) for key, value in node.value if key.value == str(part)), None)
            if match is None:
                return line
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _model_at(loc: tuple, kinds: KindRegistry) -> type[BaseModel] | None:
    """The spec model class that owns the mapping at pydantic location `loc`."""
    owner: type[BaseModel] | None = PipelineSpec
    for part in loc:
        if isinstance(part, int):
            continue
        if part in kinds:
            owner = kinds[part]
        elif part in MODEL_SOURCES:
            owner = MODEL_SOURCES[part]
        elif owner is not None and part in owner.model_fields:
            owner = _inner_model(owner.model_fields[part].annotation)
        else:
            return None
    return owner


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _inner_model(typing.get_args(annotation)[0])
    if origin in (list, typing.Union, types.UnionType):
        models = [model for arg in typing.get_args(annotation) if (model := _inner_model(arg))]
        return models[0] if len(models) == 1 else None
    return None
