"""The one MLflow adapter: every tag, metric and artifact name int8flow writes is decided here.

- `MlflowStore`: the client, with explicit run ids everywhere (MLflow's thread-local active run is
  invisible in Prefect's worker threads), runs that always end (FAILED with the error, KILLED on
  Ctrl-C), and the Model Registry (versions, aliases, recipes).
- `PipelineRun`: one pipeline run as MLflow shows it: a parent run, one nested run per variant
  (written as soon as the variant is evaluated, not at the end), fallback steps nested under the
  variant they came from.
- `NullPipelineRun`: the same calls doing nothing, for the bare pipeline the overhead benchmark times.
The watcher's claims go through `MlflowStore` too (`flows.watch`). MLflow itself is imported by the
store, not by this module: the bare pipeline uses `NullPipelineRun` and must not pay for MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from int8flow.tasks.select import Contender

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlruns"
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 5000
MAX_DESCRIPTION = 8000  # MLflow refuses longer tag values; the description (a tag) included


_UNSAFE_KEY = re.compile(r"[^/\w.\- ]")


def safe_key(key: str) -> str:
    """A metric or param name MLflow accepts: names built from a model's own output or node names (which
    may hold `:` or `[]`) have every other character replaced by `_`, and no `..` or leading `/`."""
    cleaned = _UNSAFE_KEY.sub("_", key).replace("..", "._").lstrip("/")
    return cleaned or "_"


class Tag:
    """Tags int8flow writes (runs and model versions); the prefix keeps them apart from MLflow's own."""

    PREFIX = "int8flow."
    DESCRIPTION = "mlflow.note.content"  # MLflow's own: the markdown at the top of a run's page
    # parent run
    PIPELINE = "int8flow.pipeline"
    MODEL_PATH = "int8flow.model_path"
    SOURCE_SHA256 = "int8flow.source_sha256"
    VERSION = "int8flow.version"
    ONNX_VERSION = "int8flow.onnx_version"
    ORT_VERSION = "int8flow.onnxruntime_version"
    CPU = "int8flow.cpu"
    CPU_FLAG = "int8flow.cpu."  # + flag name: "true" / "false"
    MACHINE = "int8flow.machine"
    LOGICAL_CPUS = "int8flow.logical_cpus"
    EXECUTION_PROVIDERS = "int8flow.execution_providers"
    TARGET_PRESET = "int8flow.target_preset"
    TARGET_REASON = "int8flow.target_reason"
    DETECTED_PRESET = "int8flow.detected_preset"
    REPAIRS = "int8flow.repairs"
    ORT_DEFAULT = "int8flow.ort_default"  # ORT's plain quantize_dynamic of the model as given, scored
    EVAL_FINGERPRINT = "int8flow.eval_fingerprint"
    CALIBRATION_FINGERPRINT = "int8flow.calibration_fingerprint"
    SUMMARY = "int8flow.summary"
    REGISTERED_VERSION = "int8flow.registered_version"
    RUN_WARNINGS = "int8flow.run_warnings"
    TIMING_UNCERTAIN = "int8flow.timing_uncertain."  # + session key: busy or unsettled even with extra rounds
    # both
    SELECTED = "int8flow.selected"
    ERROR = "int8flow.error"
    # variant run
    KIND = "int8flow.kind"
    ELIGIBLE = "int8flow.eligible"
    VERDICT = "int8flow.verdict"
    NOTES = "int8flow.notes"
    OP_COVERAGE = "int8flow.op_coverage"
    WARNINGS = "int8flow.warnings"
    VS_ORT_DEFAULT = "int8flow.vs_ort_default"  # a dynamic variant against ORT's plain quantize_dynamic
    FALLBACK_OF = "int8flow.fallback_of"
    KEPT_IN_FLOAT = "int8flow.kept_in_float"
    FALLBACK = "int8flow.fallback"
    FALLBACK_BEST = "int8flow.fallback_best"
    FALLBACK_STEP = "int8flow.fallback_step"  # on a step: kept (more accurate) or discarded, and why
    QAT_STOPPED = "int8flow.qat_stopped"
    HELD_OUT = "int8flow.held_out"  # the selected variant on `evaluation.test`
    HELD_OUT_CONSISTENT = "int8flow.held_out_consistent"  # "false": the held-out drop fails or flags a gap
    ALIAS_DECISION = "int8flow.alias_decision"
    # model version
    RECIPE = "int8flow.recipe"
    VARIANT = "int8flow.variant"
    SIZE_BYTES = "int8flow.size_bytes"
    OBJECTIVE = "int8flow.objective"
    METRIC = "int8flow.metric."  # + metric name: the version's score
    VERSION_SPEEDUP = "int8flow.speedup"  # over FP32, from the deciding timing session
    VERSION_SPEEDUP_INTERVAL = "int8flow.speedup_90pct"
    VERSION_LATENCY_MS = "int8flow.p50_ms"
    VERSION_FP32_LATENCY_MS = "int8flow.fp32_p50_ms"
    VERSION_DROP = "int8flow.accuracy_drop"
    VERSION_SIZE_MB = "int8flow.size_mb"
    VERSION_CPU_FLAGS = "int8flow.cpu_flags"
    ALIAS_MOVED = "int8flow.alias_moved"
    # watcher claims
    CLAIM = "int8flow.claim."
    # the process that owns a RUNNING run: how a later run tells it died (see MlflowStore.sweep_abandoned)
    HOST = "int8flow.host"
    PID = "int8flow.pid"
    PROCESS_START = "int8flow.process_start"  # /proc/<pid>/stat start time: a reused pid is another process
    HEARTBEAT = "int8flow.heartbeat"  # epoch seconds, renewed every HEARTBEAT_SECONDS while the run is open
    ABANDONED = "int8flow.abandoned"  # why a later run marked this run FAILED
    REGISTRATION = "int8flow.registration"  # on a version: "pending" until its alias decision is made


def embedded_tracking_uri(root: Path | None = None) -> str:
    """MLflow's own default (SQLite `mlflow.db` in the working directory), so plain `mlflow ui` sees it."""
    return f"sqlite:///{(root or Path.cwd()).resolve() / EMBEDDED_DB}"


def configure_environment() -> str:
    """Defaults for an offline machine; anything already set in the environment wins."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow draws a progress bar on the console when promotion downloads the champion to compare with
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's ephemeral server gets 20 s to start by default; on 2 busy cores it sometimes needs more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
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


HEARTBEAT_SECONDS = 60
# A RUNNING run from another machine whose heartbeat is older than this is taken for dead.
STALE_HEARTBEAT_SECONDS = 900


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process `pid` (clock ticks since boot), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_identity() -> dict[str, str]:
    return {
        Tag.HOST: socket.gethostname(),
        Tag.PID: str(os.getpid()),
        Tag.PROCESS_START: _process_start(os.getpid()) or "",
        Tag.HEARTBEAT: str(int(time.time())),
    }


def owner_is_gone(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Why the process that owns a run with these tags is dead, or None if it may be alive."""
    if Tag.PID not in tags:
        return None
    if tags.get(Tag.HOST) == socket.gethostname():
        start = _process_start(int(tags[Tag.PID]))
        if start is None:
            return f"process {tags[Tag.PID]} on {tags[Tag.HOST]} is gone"
        if tags.get(Tag.PROCESS_START) and start != tags[Tag.PROCESS_START]:
            return f"process {tags[Tag.PID]} on {tags[Tag.HOST]} is gone (its pid now belongs to another process)"
        return None
    beat = float(tags.get(Tag.HEARTBEAT, "0") or 0)
    silent = (now or time.time()) - beat
    if silent > STALE_HEARTBEAT_SECONDS:
        return f"process {tags[Tag.PID]} on {tags.get(Tag.HOST)} has not renewed its heartbeat for {silent:.0f} s"
    return None


class Heartbeat:
    """Renews the run's heartbeat tag in the background until stopped."""

    def __init__(self, store: MlflowStore, run_id: str, seconds: float = HEARTBEAT_SECONDS):
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(store, run_id, seconds), daemon=True, name="int8flow-heartbeat"
        )
        self._thread.start()

    def _beat(self, store: MlflowStore, run_id: str, seconds: float) -> None:
        while not self._stop.wait(seconds):
            with contextlib.suppress(Exception):  # a missed beat only makes the run look older
                store.client.set_tag(run_id, Tag.HEARTBEAT, str(int(time.time())))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _model_requirements() -> list[str]:
    """The registered model's pip requirements: the versions that built and timed it."""
    import onnx
    import onnxruntime

    return [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"]


class MlflowStore:
    """MLflow through `MlflowClient`, with explicit run ids."""

    def __init__(self, tracking_uri: str | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or configure_environment()
        mlflow.set_tracking_uri(self.tracking_uri)
        self.client = MlflowClient(self.tracking_uri)

    # -- runs --------------------------------------------------------------------------------------

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        artifact_location = None
        if self.tracking_uri == embedded_tracking_uri():
            artifact_location = (Path.cwd() / EMBEDDED_ARTIFACTS).resolve().as_uri()
        try:
            return str(self.client.create_experiment(name, artifact_location=artifact_location))
        except MlflowException:  # another process created it meanwhile
            found = self.client.get_experiment_by_name(name)
            assert found is not None
            return str(found.experiment_id)

    def create_run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str], parent_id: str | None = None
    ) -> str:
        all_tags = dict(tags)
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        return str(self.client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id)

    @contextlib.contextmanager
    def run(
        self, experiment_id: str, run_name: str, tags: Mapping[str, str] | None = None, parent_id: str | None = None
    ) -> Iterator[str]:
        """A run that is ended whatever happens: FINISHED, FAILED (error recorded) or KILLED."""
        run_id = self.create_run(experiment_id, run_name, tags or {}, parent_id)
        try:
            yield run_id
        except KeyboardInterrupt:
            self.end(run_id, "KILLED", "interrupted")
            raise
        except BaseException as error:
            self.end(run_id, "FAILED", f"{type(error).__name__}: {error}", traceback.format_exc())
            raise
        else:
            self.end_if_running(run_id)

    def sweep_abandoned(self, experiment_id: str) -> list[str]:
        """Mark FAILED every run of this experiment left RUNNING by a process that is gone (and the runs
        nested under it); return their ids."""
        running = self.client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=5000)
        by_parent: dict[str, list[Any]] = {}
        for run in running:
            by_parent.setdefault(run.data.tags.get("mlflow.parentRunId", ""), []).append(run)
        swept = []
        for run in running:
            why = owner_is_gone(run.data.tags)
            if why is None:
                continue
            stack = [run]
            while stack:
                current = stack.pop()
                stack += by_parent.get(current.info.run_id, [])
                self.client.set_tag(current.info.run_id, Tag.ABANDONED, f"{why}: marked FAILED by a later run")
                self.end(current.info.run_id, "FAILED", f"abandoned: {why}")
                swept.append(current.info.run_id)
        return swept

    def end_if_running(self, run_id: str, status: str = "FINISHED") -> None:
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.end(run_id, status)

    def end(self, run_id: str, status: str, error: str | None = None, details: str | None = None) -> None:
        if error is not None:
            self.client.set_tag(run_id, Tag.ERROR, error[:MAX_TAG_LENGTH])
            self.client.log_text(run_id, details or error, "error.txt")
        self.client.set_terminated(run_id, status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(safe_key(key), str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's per-batch limit
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float | None], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(safe_key(key), float(value), now, step) for key, value in metrics.items() if value is not None]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def log_history(self, run_id: str, key: str, values: list[tuple[int, float]]) -> None:
        """One metric over many steps (a training loss), in few writes."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, step) for step, value in values]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [
            RunTag(key, str(value)[: MAX_DESCRIPTION if key == Tag.DESCRIPTION else MAX_TAG_LENGTH])
            for key, value in tags.items()
        ]
        if items:
            self.client.log_batch(run_id, tags=items)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    # -- registry ----------------------------------------------------------------------------------

    def find_version(self, name: str, recipe: str) -> RegisteredVersion | None:
        """A registered version built from the same recipe (same model, variant, data), if any."""
        for version in self._versions(name):
            if version.tags.get(Tag.RECIPE) == recipe:
                return RegisteredVersion(name, str(version.version), reused=True)
        return None

    def _versions(self, name: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            return []
        # The name is validated at spec load (letters, digits, `_.-`): no quote can break the filter.
        return list(self.client.search_model_versions(f"name='{name}'"))

    def warm_up_registration(self) -> threading.Thread:
        """Start paying, in the background, what `register` pays first: importing MLflow's pyfunc flavour
        and reading every installed package's metadata (`log_model` checks its requirements against
        them). ~1.4 s of one core that otherwise sits on the run's critical path at promotion (a quarter
        of the MNIST run's overhead); started with the run, it overlaps the export's child process."""

        def warm() -> None:
            with contextlib.suppress(Exception):  # only a cache: register() does the same work if this fails
                import mlflow.onnx
                import mlflow.pyfunc  # noqa: F401
                from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

                warn_dependency_requirement_mismatches(_model_requirements())  # fills MLflow's package map

        thread = threading.Thread(target=warm, daemon=True, name="int8flow-registration-warm-up")
        thread.start()
        return thread

    def register(
        self, run_id: str, model_path: Path, name: str, signature: Any, tags: Mapping[str, str]
    ) -> RegisteredVersion:
        """Log `model_path` as an ONNX-flavour MLflow model in `run_id` and register it as a new version."""
        import mlflow
        import onnx
        from mlflow.exceptions import MlflowException

        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(model_path)),
                name="model",
                signature=signature,
                pip_requirements=_model_requirements(),
                onnx_execution_providers=["CPUExecutionProvider"],
                save_as_external_data=model_path.stat().st_size > 1_800_000_000
                or any(model_path.parent.glob("*.data")),
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

    def holder(self, name: str, alias: str) -> Contender | None:
        """The version holding `alias`, as the alias decision sees it, or None."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return self.contender(version)

    def contender(self, version: Any) -> Contender:
        tags = version.tags
        metrics = {
            key.removeprefix(Tag.METRIC): float(value) for key, value in tags.items() if key.startswith(Tag.METRIC)
        }
        size = tags.get(Tag.SIZE_BYTES)
        return Contender(str(version.version), metrics, int(size) if size else None, tags.get(Tag.EVAL_FINGERPRINT))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def describe(self, name: str, model_description: str, version: str, version_description: str) -> None:
        """The registered model's and the version's descriptions (markdown, shown on their pages)."""
        self.client.update_registered_model(name, description=model_description)
        self.client.update_model_version(name, version, description=version_description)

    def tag_version(self, name: str, version: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, str(value)[:MAX_TAG_LENGTH])

    def download(self, uri: str, directory: Path) -> Path:
        """The artifacts at `uri` (`models:/name/version`, `runs:/...`) downloaded into `directory`."""
        import mlflow

        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(directory), tracking_uri=self.tracking_uri
            )
        )

    def download_version(self, name: str, version: str, directory: Path) -> Path:
        """The ONNX file of a registered version, downloaded into `directory`."""
        found = sorted(self.download(f"models:/{name}/{version}", directory).rglob("*.onnx"))
        if not found:
            raise FileNotFoundError(f"no .onnx file in registered model {name} version {version}")
        return found[0]

    def search_versions(self, filter_string: str) -> list[Any]:
        versions, token = [], None
        while True:
            page = self.client.search_model_versions(filter_string, page_token=token)
            versions += list(page)
            token = page.token
            if not token:
                return versions


def onnx_signature(inputs: Any, outputs: Any) -> Any:
    """An MLflow tensor signature from `tasks.model.TensorInfo` lists (unknown dims as -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(tensor: Any) -> TensorSpec:
        shape = tuple(dim if isinstance(dim, int) and dim > 0 else -1 for dim in tensor.shape)
        return TensorSpec(np.dtype(tensor.dtype), shape, tensor.name)

    return ModelSignature(inputs=Schema([spec(t) for t in inputs]), outputs=Schema([spec(t) for t in outputs]))


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        yield Path(directory)


# -- one pipeline run ---------------------------------------------------------------------------------


class PipelineRun:
    """The parent run of one pipeline run and its nested variant runs."""

    def __init__(self, store: MlflowStore, experiment_id: str, run_id: str):
        self.store = store
        self.experiment_id = experiment_id
        self.run_id = run_id
        self._variant_runs: dict[str, str] = {}
        self._warnings: list[str] = []
        self.swept: list[str] = []  # runs of dead processes this run's start marked FAILED

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    def warn(self, warning: str) -> None:
        """A warning about the whole run (the target, the evaluation), kept on the parent run."""
        self._warnings.append(warning)
        self.store.set_tags(self.run_id, {Tag.RUN_WARNINGS: " | ".join(self._warnings)})

    @classmethod
    @contextlib.contextmanager
    def open(cls, store: MlflowStore, pipeline: str, model_path: Path | None = None) -> Iterator[PipelineRun]:
        """The parent run, ended FAILED (with the error) if the pipeline raises, FINISHED otherwise;
        variant runs still open then are ended with it. Runs that a dead process left RUNNING in this
        experiment are marked FAILED first; this run carries its process's identity and a heartbeat."""
        experiment = store.experiment_id(pipeline)
        swept = store.sweep_abandoned(experiment)
        tags = {Tag.PIPELINE: pipeline} | ({Tag.MODEL_PATH: str(model_path)} if model_path else {})
        with store.run(experiment, pipeline, tags | process_identity()) as run_id:
            run = cls(store, experiment, run_id)
            run.swept = swept
            heartbeat = Heartbeat(store, run_id)
            warm_up = store.warm_up_registration()
            try:
                yield run
            except BaseException as error:
                status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
                run._end_variants(status, f"the pipeline stopped: {describe_error(error)}")
                raise
            else:
                run._end_variants("FINISHED")
            finally:
                heartbeat.stop()
                warm_up.join()  # a run that failed in its first second: no import still going on at exit
                run._attach_log()

    def _attach_log(self) -> None:
        from mlflow.exceptions import MlflowException

        log = os.environ.get("INT8FLOW_LOG_FILE")
        if log and Path(log).is_file():
            with contextlib.suppress(MlflowException, OSError):
                self.store.log_artifact(self.run_id, Path(log), "logs")

    def _end_variants(self, status: str, error: str | None = None) -> None:
        from mlflow.exceptions import MlflowException

        for run_id in self._variant_runs.values():
            with contextlib.suppress(MlflowException):
                if self.store.client.get_run(run_id).info.status == "RUNNING":
                    self.store.end(run_id, status, error)

    # -- the parent run --------------------------------------------------------------------------

    def setup(self, resolved_spec: dict[str, Any], spec_file: Path, sha256: str, versions: Mapping[str, str]) -> None:
        import yaml

        self.store.log_params(self.run_id, flatten(resolved_spec, "spec."))
        self.store.log_text(self.run_id, yaml.safe_dump(resolved_spec, sort_keys=False), "spec/resolved.yaml")
        self.store.log_artifact(self.run_id, spec_file, "spec")
        self.store.set_tags(
            self.run_id,
            {
                Tag.SOURCE_SHA256: sha256,
                Tag.VERSION: versions["int8flow"],
                Tag.ONNX_VERSION: versions["onnx"],
                Tag.ORT_VERSION: versions["onnxruntime"],
            },
        )

    def hardware(self, hardware: Any, preset: Any, detected: str, warnings: tuple[str, ...]) -> None:
        tags = {
            Tag.CPU: hardware.cpu_model,
            Tag.MACHINE: hardware.machine,
            Tag.LOGICAL_CPUS: hardware.logical_cpus,
            Tag.EXECUTION_PROVIDERS: ",".join(hardware.execution_providers),
            Tag.TARGET_PRESET: preset.name,
            Tag.TARGET_REASON: preset.why,
            Tag.DETECTED_PRESET: detected,
        } | {f"{Tag.CPU_FLAG}{flag}": str(present).lower() for flag, present in hardware.flags.items()}
        self.store.set_tags(self.run_id, tags)
        for warning in warnings:
            self.warn(warning)

    def exported(self, path: Path, parity_max_abs_diff: float | None, seconds: float) -> None:
        self.store.log_metrics(
            self.run_id, {"export.parity_max_abs_diff": parity_max_abs_diff, "export.seconds": seconds}
        )
        self.store.log_artifact(self.run_id, path, "exported")

    def repairs(self, repairs: list[str]) -> None:
        self.store.set_tags(self.run_id, {Tag.REPAIRS: " | ".join(repairs) or "none"})

    def fusion(self, fused_ops: Mapping[str, int]) -> None:
        self.store.log_metrics(self.run_id, {f"fusion.{op}": count for op, count in fused_ops.items()})

    def calibration(self, fingerprint: str, seconds: Mapping[str, float]) -> None:
        self.store.set_tags(self.run_id, {Tag.CALIBRATION_FINGERPRINT: fingerprint})
        self.store.log_metrics(
            self.run_id, {f"calibration.{key.replace('@', '.')}.seconds": value for key, value in seconds.items()}
        )

    def fp32(self, scores: Mapping[str, float], size_bytes: int, fingerprint: str) -> None:
        metrics = {f"fp32.{name}": value for name, value in scores.items()} | {"fp32.size_mb": size_bytes / 1e6}
        self.store.log_metrics(self.run_id, metrics)
        self.store.set_tags(self.run_id, {Tag.EVAL_FINGERPRINT: fingerprint})

    def timing(
        self, key: str, fp32_latency: Mapping[str, float], rounds: int, other_cores: float, uncertain: bool
    ) -> None:
        """One timing session: FP32's latency in it, its length, the load other processes put on the machine."""
        metrics = dict(fp32_latency) | {f"timing.{key}.rounds": rounds, f"timing.{key}.other_cores": other_cores}
        self.store.log_metrics(self.run_id, metrics)
        self.store.set_tags(self.run_id, {f"{Tag.TIMING_UNCERTAIN}{key}": str(uncertain).lower()})

    def summary(
        self,
        artifacts: Sequence[Path],
        counts: Mapping[str, int],
        selected: str | None,
        summary: str,
        version: str | None,
        description: str,
        metrics: Mapping[str, float],
    ) -> None:
        """The run's report: its description (the verdict and the table, shown at the top of the run's
        page), the report files under `summary/`, and the key numbers as metrics that sort first."""
        for path in artifacts:
            self.store.log_artifact(self.run_id, path, "summary")
        self.store.log_metrics(self.run_id, {f"variants_{key}": value for key, value in counts.items()} | dict(metrics))
        tags = {Tag.SELECTED: selected or "none", Tag.SUMMARY: summary, Tag.DESCRIPTION: description[:MAX_DESCRIPTION]}
        if version:
            tags[Tag.REGISTERED_VERSION] = version
        self.store.set_tags(self.run_id, tags)

    # -- variant runs ----------------------------------------------------------------------------

    def variant_run(self, name: str) -> str:
        return self._variant_runs[name]

    def has_variant(self, name: str) -> bool:
        return name in self._variant_runs

    def open_variant(self, name: str, kind: str, params: dict[str, Any], fallback_of: str | None) -> str:
        """The variant's nested run (under the variant a fallback step came from), created once."""
        if name not in self._variant_runs:
            parent = self._variant_runs.get(fallback_of, self.run_id) if fallback_of else self.run_id
            run_id = self.store.create_run(self.experiment_id, name, {Tag.KIND: kind}, parent_id=parent)
            self.store.log_params(run_id, flatten(params))
            self._variant_runs[name] = run_id
        return self._variant_runs[name]

    def variant_failed(self, name: str, error: str) -> None:
        self.store.end(self._variant_runs[name], "FAILED", error)

    def variant_made(
        self,
        name: str,
        metrics: Mapping[str, float | None],
        tags: Mapping[str, str],
        model: Path,
        texts: Mapping[str, str] | None = None,
    ) -> None:
        """The variant's numbers, tags, quantized model (`quantized/`) and reports (`texts`: artifact path -> text)."""
        run_id = self._variant_runs[name]
        self.store.log_metrics(run_id, metrics)
        if tags:
            self.store.set_tags(run_id, tags)
        self.store.log_artifact(run_id, model, "quantized")
        for path, text in (texts or {}).items():
            self.store.log_text(run_id, text, path)

    def variant_timed(self, name: str, metrics: Mapping[str, float]) -> None:
        self.store.log_metrics(self._variant_runs[name], metrics)

    def ort_reference(self, metrics: Mapping[str, float], summary: str, comparisons: Mapping[str, str]) -> None:
        """ORT's plain `quantize_dynamic` of the model as given: its scores on the parent run, and on each
        dynamic variant whether it is at least as accurate, or how it differs."""
        self.store.log_metrics(self.run_id, {f"ort_default.{name}": value for name, value in metrics.items()})
        self.store.set_tags(self.run_id, {Tag.ORT_DEFAULT: summary})
        for name, comparison in comparisons.items():
            self.store.set_tags(self._variant_runs[name], {Tag.VS_ORT_DEFAULT: comparison})

    def fallback(self, name: str, ranking_csv: str, stopped: str, steps: Mapping[str, str], best: str | None) -> None:
        """The fallback of variant `name`: its node ranking, how it stopped, and for each step (by name) why
        the search kept or discarded it."""
        run_id = self._variant_runs[name]
        self.store.log_text(run_id, ranking_csv, "fallback/node_errors.csv")
        self.store.set_tags(
            run_id, {Tag.FALLBACK: f"{len(steps)} step(s); {stopped}", Tag.FALLBACK_BEST: best or "none"}
        )
        for step, why in steps.items():
            if step in self._variant_runs:
                self.store.set_tags(self._variant_runs[step], {Tag.FALLBACK_STEP: why})

    def qat(
        self,
        name: str,
        losses: list[tuple[int, float]],
        metrics: Mapping[str, float | None],
        stopped: str,
        layers: list[str],
        checkpoint: Path,
    ) -> None:
        run_id = self._variant_runs[name]
        self.store.log_history(run_id, "qat.loss", losses)
        self.store.log_metrics(run_id, metrics)
        self.store.set_tags(run_id, {Tag.QAT_STOPPED: stopped})
        self.store.log_text(run_id, "\n".join(layers) + "\n", "qat/quantized_layers.txt")
        self.store.log_artifact(run_id, checkpoint, "qat")

    def verdict(
        self,
        name: str,
        kind: str,
        selected: bool,
        eligible: bool,
        verdict: str,
        key_numbers: Mapping[str, float | None],
    ) -> None:
        """The variant's verdict (tags, and the description at the top of its run page) and its key numbers
        as metrics whose names sort first in MLflow's column list (`0_speedup`, `0_drop`, ...)."""
        run_id = self._variant_runs[name]
        status = "**selected**" if selected else ("eligible" if eligible else f"rejected: {verdict}")
        numbers = ", ".join(
            f"{key.removeprefix('0_')} {value:.4g}" for key, value in key_numbers.items() if value is not None
        )
        tags = {
            Tag.KIND: kind,
            Tag.SELECTED: str(selected).lower(),
            Tag.ELIGIBLE: str(eligible).lower(),
            Tag.VERDICT: verdict,
            Tag.DESCRIPTION: f"{status}. {numbers}"[:MAX_DESCRIPTION],
        }
        self.store.set_tags(run_id, tags)
        self.store.log_metrics(run_id, dict(key_numbers))

    def close_variant(self, name: str) -> None:
        self.store.end_if_running(self._variant_runs[name])

    def held_out(
        self, name: str, scores: Mapping[str, float], fp32: Mapping[str, float], text: str, consistent: bool
    ) -> None:
        """The selected variant measured on `evaluation.test` (data selection never saw)."""
        self.store.log_metrics(self._variant_runs[name], {f"test.{metric}": value for metric, value in scores.items()})
        self.store.log_metrics(self.run_id, {f"test.fp32.{metric}": value for metric, value in fp32.items()})
        tags = {Tag.HELD_OUT: text, Tag.HELD_OUT_CONSISTENT: str(consistent).lower()}
        self.store.set_tags(self._variant_runs[name], tags)
        self.store.set_tags(self.run_id, tags)

    def alias_decision(self, name: str, version: str, reason: str) -> None:
        self.store.set_tags(self._variant_runs[name], {Tag.REGISTERED_VERSION: version, Tag.ALIAS_DECISION: reason})


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


class NullPipelineRun(PipelineRun):
    """A pipeline run that logs nothing: what the bare pipeline (no MLflow, no Prefect) passes around."""

    def __init__(self) -> None:
        self.run_id = "bare"
        self._variant_runs = {}
        self._warnings = []
        self.swept = []

    def __getattribute__(self, name: str) -> Any:
        attribute = object.__getattribute__(self, name)
        if not name.startswith("_") and callable(attribute):
            return lambda *args, **kwargs: None
        return attribute


# -- the watcher's claims -------------------------------------------------------------------------------

CLAIMS_EXPERIMENT = "int8flow-watch"


class Claims:
    """One MLflow run per (pipeline, model sha256) in the experiment `int8flow-watch`: the claim that a
    watcher started that model, and the audit log of how it ended. Deleted claim runs do not count."""

    def __init__(self, store: MlflowStore):
        self.store = store
        self.experiment_id = store.experiment_id(CLAIMS_EXPERIMENT)
        store.sweep_abandoned(self.experiment_id)  # claims of watchers that died stay claimed, marked FAILED

    def find(self, pipeline: str, sha256: str) -> str | None:
        from mlflow.entities import ViewType

        # Pipeline names are validated at spec load and sha256 is hex: no quote can break the filter.
        query = f"tags.`{Tag.CLAIM}sha256` = '{sha256}' AND tags.`{Tag.CLAIM}pipeline` = '{pipeline}'"
        found = self.store.client.search_runs(
            [self.experiment_id], query, run_view_type=ViewType.ACTIVE_ONLY, max_results=1
        )
        return str(found[0].info.run_id) if found else None

    def create(self, pipeline: str, sha256: str, source: str, model_path: str, watcher_flow_run: str | None) -> str:
        tags = {
            f"{Tag.CLAIM}sha256": sha256,
            f"{Tag.CLAIM}source": source,
            f"{Tag.CLAIM}pipeline": pipeline,
            f"{Tag.CLAIM}model_path": model_path,
            f"{Tag.CLAIM}status": "running",
        }
        if watcher_flow_run is not None:
            tags[f"{Tag.CLAIM}watcher_flow_run_id"] = watcher_flow_run
        return self.store.create_run(self.experiment_id, f"{pipeline}@{sha256[:12]}", tags | process_identity())

    def finished(self, claim_id: str, result: Mapping[str, Any]) -> None:
        self.store.set_tags(
            claim_id, {f"{Tag.CLAIM}{key}": value for key, value in result.items() if value is not None}
        )
        self.store.end(claim_id, "FINISHED")

    def failed(self, claim_id: str, message: str, details: str) -> None:
        self.store.set_tags(claim_id, {f"{Tag.CLAIM}status": "failed"})
        self.store.end(claim_id, "FAILED", message, details)

    def interrupted(self, claim_id: str) -> None:
        self.store.set_tags(claim_id, {f"{Tag.CLAIM}status": "interrupted"})
        self.store.end(claim_id, "KILLED", "interrupted")
