"""Finding models to quantize: which files in a folder are complete ONNX models, what a model's content
fingerprint is, and which file of a downloaded MLflow model is the ONNX graph. No Prefect, no MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from int8flow.tasks.model import file_sha256, model_files

# A writer that pauses longer than this mid-file is taken for finished: copying with a temporary
# (hidden) name and renaming at the end is the only safe way, this is the backstop for plain copies.
SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class Fingerprint:
    path: Path
    sha256: str  # of the .onnx file and its external data, as `inspect_model` computes it
    files: tuple[Path, ...]


class NotReady(Exception):
    """The model is still being written (or unreadable so far): look again on the next watch."""


def candidate_files(folder: Path) -> list[Path]:
    """The `*.onnx` files directly in `folder`, by name.

    Hidden names are left out: rsync, `cp --backup` and most downloaders write `.name.XXXX` and rename
    when done, so a hidden file is by convention unfinished. Subfolders are not searched: a model's
    external data and other tools' scratch copies live in them.
    """
    return sorted(path for path in folder.glob("*.onnx") if not path.name.startswith(".") and path.is_file())


def settled(modified: Iterable[float], now: float, quiet_seconds: float = SETTLE_SECONDS) -> bool:
    """Whether every file was last modified at least `quiet_seconds` before `now`.

    A model copied into the folder grows for a while; hashing it half-written would claim a
    fingerprint that no complete model has, and the finished file would then look new again.
    """
    return all(now - mtime >= quiet_seconds for mtime in modified)


def fingerprint(path: Path, now: float | None = None, quiet_seconds: float = SETTLE_SECONDS) -> Fingerprint:
    """The content hash of a complete model (its .onnx file and external data), or NotReady."""
    try:
        files = model_files(path)
        modified = [file.stat().st_mtime for file in files]
    except Exception as error:  # truncated protobuf, external data not there yet
        raise NotReady(f"{path.name}: not readable yet ({type(error).__name__}: {error})") from error
    if not settled(modified, time.time() if now is None else now, quiet_seconds):
        raise NotReady(f"{path.name}: modified less than {quiet_seconds:g} s ago")
    return Fingerprint(path, file_sha256(files), tuple(files))


def onnx_file_in(model_dir: Path) -> Path:
    """The ONNX graph of a downloaded MLflow model: the onnx flavour's `data` in `MLmodel`, else the
    only `.onnx` file (a plain artifact folder)."""
    mlmodel = model_dir / "MLmodel"
    if mlmodel.is_file():
        flavour = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("onnx", {})
        if flavour.get("data") and (model_dir / flavour["data"]).is_file():
            return model_dir / flavour["data"]
    found = sorted(model_dir.rglob("*.onnx"))
    if len(found) != 1:
        raise ValueError(f"{model_dir}: expected one .onnx file (or an onnx-flavour MLmodel), found {len(found)}")
    return found[0]


def parse_tag(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value); the value may contain `=`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected a tag as key=value, got {text!r}")
    return key.strip(), value.strip()


def version_filter(model_name: str | None, tag: tuple[str, str] | None) -> str:
    """An MLflow `search_model_versions` filter: versions of `model_name` and/or carrying `tag`."""
    clauses = []
    if model_name is not None:
        clauses.append(f"name = {_quoted(model_name)}")
    if tag is not None:
        clauses.append(f"tags.`{tag[0]}` = {_quoted(tag[1])}")
    if not clauses:
        raise ValueError("a registry model name or a tag is needed")
    return " AND ".join(clauses)


def _quoted(value: str) -> str:
    # MLflow's filter grammar has no escape for a quote inside a string literal
    if "'" in value:
        raise ValueError(f"a single quote cannot be matched in an MLflow filter: {value!r}")
    return f"'{value}'"
