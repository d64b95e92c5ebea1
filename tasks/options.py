"""What every spec section model shares: strictness, paths relative to the spec, user-code references.

The section models live beside the stage that reads them (`tasks.calibrate.Calibration`,
`tasks.select.Selection`, ...); `flows.spec` composes them into the whole spec.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationInfo, model_validator

from int8flow.tasks.usercode import UserCodeError, check_reference, load_callable

# `module:function`, where module may be dotted (`mnist.model:build_model`)
CALLABLE_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
# Counts a spec may ask for: large enough for any real use, small enough that no value can hang a run.
MAX_COUNT = 1_000_000


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo never passes silently) and a validated spec cannot change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context or {}


def base_dir(info: ValidationInfo) -> Path:
    """The spec file's folder, which relative paths in it are relative to."""
    return Path(_context(info).get("base_dir", "."))


def resolve_path(value: Path, info: ValidationInfo, *, must_exist: bool = True) -> Path:
    """Resolve `value` against the spec file's folder and check it exists (when validating a file)."""
    path = value if value.is_absolute() else base_dir(info) / value
    path = path.resolve()
    if must_exist and _context(info).get("check_paths", True) and not path.exists():
        raise ValueError(f"no such file or folder: {path}")
    return path


def check_callable(reference: str, info: ValidationInfo) -> str:
    """A `module:function` reference whose module can be found from the spec's folder.

    Nothing is imported unless the context says `import_code` (`int8flow validate --import`): a spec is
    trusted like code, but checking it must not run any.
    """
    context = _context(info)
    if context.get("check_imports", True):
        try:
            check_reference(reference, base_dir(info), import_module=bool(context.get("import_code", False)))
        except UserCodeError as error:
            raise ValueError(str(error)) from None
    return reference


class WithUserCode(StrictModel):
    """A section holding `module:function` references: it remembers the spec's folder they resolve from."""

    _base_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _remember_base_dir(self, info: ValidationInfo) -> WithUserCode:
        if info.context and "base_dir" in info.context:
            self._base_dir = Path(info.context["base_dir"])
        return self

    @property
    def spec_folder(self) -> Path | None:
        return self._base_dir

    def load(self, reference: str) -> Callable[..., Any]:
        """Import the user's `module:function` (the spec's folder searched first)."""
        return load_callable(reference, self._base_dir)
