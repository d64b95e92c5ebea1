"""The one MLflow adapter: parent run per pipeline run, nested run per variant, registry and alias.

Everything goes through `MlflowClient` with explicit run ids, so nothing depends on MLflow's
thread-local active run (invisible in Prefect's worker threads). Runs are always ended: FAILED with
the error when something raises, KILLED on Ctrl-C; nothing is left RUNNING.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlruns"
TAG_PREFIX = "int8flow."
MAX_PARAM_LENGTH = 6000


def embedded_tracking_uri(root: Path | None = None) -> str:
    """MLflow's own default (SQLite `mlflow.db` in the working directory), so plain `mlflow ui` sees it."""
    return f"sqlite:///{(root or Path.cwd()).resolve() / EMBEDDED_DB}"


def configure_environment() -> str:
    """Defaults for an offline machine; anything already set in the environment wins."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral server gets 20 s to start by default; on 2 busy cores it sometimes needs more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_TRACKING_URI", embedded_tracking_uri())
    return os.environ["MLFLOW_TRACKING_URI"]


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists as dotted MLflow params: `variants.0.per_channel` -> `true`."""
    flat: dict[str, str] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            flat.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and data and any(isinstance(item, (Mapping, list)) for item in data):
        for index, item in enumerate(data):
            flat.update(flatten(item, f"{prefix}{index}."))
    else:
        text = json.dumps(data) if not isinstance(data, str) else data
        flat[prefix.rstrip(".")] = text[:MAX_PARAM_LENGTH]
    return flat


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    reused: bool  # an identical version (same recipe) was already registered


class Tracker:
    def __init__(self, tracking_uri: str | None = None):
        self.tracking_uri = tracking_uri or configure_environment()
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)

    # -- runs --------------------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifact_location = None
        if self.tracking_uri == embedded_tracking_uri():
            artifact_location = (Path.cwd() / EMBEDDED_ARTIFACTS).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # another process created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    @contextlib.contextmanager
    def run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None, parent_id: str | None = None
    ) -> Iterator[str]:
        """A run that is ended whatever happens: FINISHED, FAILED (error recorded) or KILLED."""
        all_tags = dict(tags or {})
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        run_id = run.info.run_id
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end(run_id, "KILLED", "interrupted")
            raise
        except BaseException as error:
            self.end(run_id, "FAILED", f"{type(error).__name__}: {error}", traceback.format_exc())
            raise
        else:
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.end(run_id, "FINISHED")

    def end(self, run_id: str, status: str, error: str | None = None, details: str | None = None) -> None:
        if error is not None:
            self.client.set_tag(run_id, f"{TAG_PREFIX}error", error[:5000])
            self.client.log_text(run_id, details or error, "error.txt")
        self.client.set_terminated(run_id, status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for key, value in metrics.items() if value is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def log_history(self, run_id: str, key: str, values: list[tuple[int, float]]) -> None:
        """One metric over many steps (a training loss), in few writes."""
        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for step, value in values]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    # -- registry ----------------------------------------------------------------------------------

    def find_version(self, name: str, recipe: str) -> RegisteredVersion | None:
        """A registered version built from the same recipe (same model, variant, data), if any."""
        try:
            versions = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return None
        for version in versions:
            if version.tags.get(f"{TAG_PREFIX}recipe") == recipe:
                return RegisteredVersion(name, str(version.version), reused=True)
        return None

    def register(
        self, run_id: str, model_path: Path, name: str, signature, tags: Mapping[str, str]
    ) -> RegisteredVersion:
        """Log `model_path` as an ONNX-flavour MLflow model in `run_id` and register it as a new version."""
        import onnx
        import onnxruntime

        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(model_path)),
                name="model",
                signature=signature,
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                onnx_execution_providers=["CPUExecutionProvider"],
                save_as_external_data=model_path.stat().st_size > 1_800_000_000 or any(model_path.parent.glob("*.data")),
            )
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            with contextlib.suppress(MlflowException):  # created concurrently by another run
                self.client.create_registered_model(name)
        version = self.client.create_model_version(
            name, source=info.model_uri, run_id=run_id, tags=dict(tags), model_id=info.model_id
        )
        return RegisteredVersion(name, str(version.version), reused=False)

    def alias_holder(self, name: str, alias: str):
        """The model version holding `alias`, or None."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def download_version(self, name: str, version: str, directory: Path) -> Path:
        """The ONNX file of a registered version, downloaded into `directory`."""
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(directory), tracking_uri=self.tracking_uri
        )
        found = sorted(Path(local).rglob("*.onnx"))
        if not found:
            raise FileNotFoundError(f"no .onnx file in registered model {name} version {version}")
        return found[0]


def onnx_signature(inputs, outputs):
    """An MLflow tensor signature from `tasks.model.TensorInfo` lists (unknown dims as -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(tensor) -> TensorSpec:
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in tensor.shape)
        return TensorSpec(np.dtype(tensor.dtype), shape, tensor.name)

    return ModelSignature(inputs=Schema([spec(t) for t in inputs]), outputs=Schema([spec(t) for t in outputs]))


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        yield Path(directory)
