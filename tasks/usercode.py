"""The user's own code a spec names (`callable:`, `factory:`, `function:`), found and run with care.

A spec is trusted like code: its data callables, model factories and metrics run inside the pipeline.
What this module guarantees around that:
- *finding* a module never imports it (validation runs no user code): its file is located with the
  import system's path finder, from the spec's folder first, then the normal import path;
- *loading* imports it with the spec's folder put on `sys.path` only for the duration of the import,
  so a `matplotlib.py` next to a spec cannot shadow the real one for the rest of the process;
- *calling* it turns anything it raises, `SystemExit` included, into a `UserCodeError` that names the
  reference: a user function that calls `sys.exit()` fails the run instead of ending the process.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from int8flow.tasks.errors import InputError

# sys.path is process-wide and the pipeline's stages run in threads: one import at a time.
_IMPORT_LOCK = threading.RLock()


class UserCodeError(InputError):
    """A user-code reference that cannot be found or loaded, or user code that failed."""


def _split(reference: str) -> tuple[str, str]:
    module, sep, attribute = reference.partition(":")
    if not sep or not module or not attribute:
        raise UserCodeError(f"expected `module:function`, got {reference!r}")
    return module, attribute


def find_module(module: str, base_dir: Path | None) -> str:
    """The file (or 'built-in') that `import module` would load, found without importing anything."""
    parts = module.split(".")
    top = parts[0]
    if top in sys.builtin_module_names:
        return "built-in"
    search = [str(base_dir)] if base_dir is not None else []
    spec = importlib.machinery.PathFinder.find_spec(top, [*search, *sys.path])
    for depth in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            break
        spec = importlib.machinery.PathFinder.find_spec(
            ".".join(parts[: depth + 1]), list(spec.submodule_search_locations)
        )
    if spec is None:
        where = f"{base_dir} or the Python path" if base_dir is not None else "the Python path"
        raise UserCodeError(f"cannot find module {module!r} in {where}")
    return str(spec.origin or module)


@contextmanager
def _spec_folder_importable(base_dir: Path | None) -> Iterator[None]:
    with _IMPORT_LOCK:
        added = base_dir is not None and str(base_dir) not in sys.path
        if added:
            sys.path.insert(0, str(base_dir))
        try:
            yield
        finally:
            if added:
                sys.path.remove(str(base_dir))


def load_callable(reference: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """Import `module:function` (the spec's folder searched first) and return the function."""
    module_name, attribute = _split(reference)
    find_module(module_name, base_dir)
    try:
        with _spec_folder_importable(base_dir):
            module = importlib.import_module(module_name)
    except BaseException as error:
        raise UserCodeError(f"importing {module_name!r} failed: {type(error).__name__}: {error}") from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise UserCodeError(f"module {module_name!r} has no callable {attribute!r}")
    return function


def check_reference(reference: str, base_dir: Path | None, *, import_module: bool = False) -> None:
    """Raise UserCodeError unless `reference`'s module can be found (and, with `import_module`, loaded
    and holding the function)."""
    module_name, _ = _split(reference)
    find_module(module_name, base_dir)
    if import_module:
        load_callable(reference, base_dir)


def call_user(reference: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`, with any failure (even `sys.exit()`) raised as UserCodeError."""
    try:
        return function(*args, **kwargs)
    except (KeyboardInterrupt, MemoryError):
        raise
    except BaseException as error:
        raise UserCodeError(f"{reference} raised {type(error).__name__}: {error}") from error
