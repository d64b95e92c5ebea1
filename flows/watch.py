"""The watcher flow: find new models and quantize each one once.

Sources: the `*.onnx` files of a folder (not recursive; a file still being written is left for the
next watch, see `tasks.discover`) and the versions of a model in the MLflow registry, by name and/or
by a version tag. A model is known by its content (sha256 of the .onnx file and its external data,
the `int8flow.source_sha256` of the pipeline run), never by its path: the same bytes under another
name, or registered twice, are one model.

Claims. Each (pipeline name, sha256) is claimed once, by an MLflow run in the experiment
`int8flow-watch` with tags `int8flow.claim.sha256`, `.source`, `.pipeline`; the claim run is also
the audit log of what the watcher started and how it ended. Looking for a claim and creating it
happen under one Prefect global concurrency limit of 1 slot (`int8flow-watch-claims`), so two
watchers that overlap cannot both claim the same model: the MLflow store alone cannot do an atomic
check-and-create. The same model under two specs is two jobs.

Limits:
- The lock holds across processes when they share a Prefect server (`PREFECT_API_URL`), or, in the
  ephemeral default, the same `PREFECT_HOME` (each process starts its own server, but the slot count
  lives in the shared database). Two processes with different Prefect homes and no server share
  nothing, and the lock does not protect them.
- Every claim that is not deleted counts, whatever its status: a model whose pipeline failed, or
  whose watcher was killed, is not retried. Deleting its claim run (MLflow UI, `mlflow runs delete`)
  makes the next watch pick it up again.
- With `deployment`, the path handed to the deployment must be readable where its worker runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow

from int8flow.flows.console import fail, say
from int8flow.flows.locks import exclusive
from int8flow.flows.pipeline import quantization_pipeline
from int8flow.flows.runner import PrefectRunner
from int8flow.flows.specfile import load_spec
from int8flow.flows.tracking import CLAIMS_EXPERIMENT, Claims, MlflowStore
from int8flow.tasks.discover import NotReady, candidate_files, fingerprint, onnx_file_in, parse_tag, version_filter

__all__ = ["CLAIMS_EXPERIMENT", "Found", "claim", "ensure_claim_lock", "watch_models"]
CLAIM_LOCK = "int8flow-watch-claims"
# The lock is held for one search and one insert; a holder that died frees it (`flows.locks`).
LOCK_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class Found:
    source: str  # the folder file's path, or models:/name/version
    path: str  # the local .onnx file the pipeline reads
    sha256: str


@flow(name="int8flow-watch", log_prints=False)
def watch_models(
    spec_file: str,
    folder: str | None = None,
    registry_model: str | None = None,
    registry_tag: str | None = None,
    deployment: str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Quantize every model in `folder` and/or the registry that this pipeline has not claimed yet.

    `registry_model`: a registered model name; `registry_tag`: `key=value` a version must carry (alone:
    any registered model's versions with that tag). `deployment`: a deployment of the `int8flow` flow
    (`flow-name/deployment-name`) to trigger per model instead of running the pipeline here as a
    subflow. `cache_dir`: where registry versions are downloaded (default `<cwd>/.int8flow/watch-cache`).

    Returns, each a list of dicts with `source` (file path or `models:/name/version`): `new` (claimed
    now, with `sha256` and `claim_run_id`), `skipped` (claimed before: the existing claim's run id),
    `waiting` (not complete yet: looked at again next time), `unusable` (a registry version that is
    not an ONNX model), and `triggered` (per new model: `status` finished | failed | scheduled, and
    the pipeline's MLflow run id, selected variant and summary, or the deployment's flow run id, or
    the error).
    """
    if folder is None and registry_model is None and registry_tag is None:
        raise ValueError("nothing to watch: give a folder, a registry model, or a registry tag")
    spec_path = Path(spec_file).resolve()
    pipeline = load_spec(spec_path).name  # a bad spec stops here, before anything is claimed
    tag = parse_tag(registry_tag) if registry_tag is not None else None
    store = MlflowStore()
    report: dict[str, Any] = {"pipeline": pipeline}
    report |= {key: [] for key in ("new", "skipped", "waiting", "unusable", "triggered")}

    found: list[Found] = []
    if folder is not None:
        found += _scan_folder(Path(folder).resolve(), report)
    if registry_model is not None or tag is not None:
        cache = Path(cache_dir) if cache_dir else Path.cwd() / ".int8flow" / "watch-cache"
        found += _scan_registry(store, version_filter(registry_model, tag), cache.resolve(), report)
    say(
        "watch",
        f"{pipeline}: {len(found)} complete model(s) found, {len(report['waiting'])} not ready, "
        f"{len(report['unusable'])} unusable",
    )

    claims = Claims(store)
    ensure_claim_lock()
    # Claimed one at a time, each just before it runs: an overlapping watcher takes the next model
    # instead of waiting for this one, and a watcher that dies holds at most one claim it never ran.
    for model in found:
        claim_id, created = claim(claims, pipeline, model)
        entry = {"source": model.source, "sha256": model.sha256, "claim_run_id": claim_id}
        if not created:
            say("watch", f"skip {model.source}: sha256 {model.sha256[:12]} already claimed (run {claim_id})")
            report["skipped"].append(entry)
            continue
        say("watch", f"new {model.source}: sha256 {model.sha256[:12]}, claim run {claim_id}")
        report["new"].append(entry)
        report["triggered"].append(entry | _start(claims, claim_id, spec_path, model, deployment))
    return report


def _scan_folder(folder: Path, report: dict[str, Any]) -> list[Found]:
    if not folder.is_dir():
        raise FileNotFoundError(f"watched folder {folder} does not exist")
    found = []
    for path in candidate_files(folder):
        try:
            model = fingerprint(path)
        except NotReady as error:
            report["waiting"].append({"source": str(path), "reason": str(error)})
            continue
        found.append(Found(str(path), str(path), model.sha256))
    return found


def _scan_registry(store: MlflowStore, filter_string: str, cache: Path, report: dict[str, Any]) -> list[Found]:
    versions = store.search_versions(filter_string)
    found = []
    for version in sorted(versions, key=lambda v: (v.name, int(v.version))):
        uri = f"models:/{version.name}/{version.version}"
        if version.status != "READY":  # registries that copy artifacts asynchronously
            report["waiting"].append({"source": uri, "reason": f"registration {version.status}"})
            continue
        try:
            model_dir = PrefectRunner().call(
                "download-version",
                _download,
                store,
                uri,
                cache / _folder_name(version.name) / str(version.version),
                label=f"{version.name}/{version.version}",
            )
            onnx_path = onnx_file_in(model_dir)
            # A downloaded version is complete by construction: no need to wait for it to settle.
            sha256 = fingerprint(onnx_path, quiet_seconds=0).sha256
        except Exception as error:  # noqa: BLE001 - one unusable version (not ONNX, artifacts gone) spares the rest
            report["unusable"].append({"source": uri, "reason": f"{type(error).__name__}: {error}"})
            continue
        found.append(Found(uri, str(onnx_path), sha256))
    return found


def _download(store: MlflowStore, uri: str, target: Path) -> Path:
    """A registry version in the cache: versions never change, so a cached one is reused as is."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Downloaded beside the target and renamed: a watcher never sees a half-downloaded version,
    # and of two watchers downloading the same version at once, the second one's copy is dropped.
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        store.download(uri, staging)
        with contextlib.suppress(OSError):
            os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_claim_lock() -> None:
    """Kept for callers that prepared the lock first; `flows.locks.exclusive` creates what it needs."""


def claim(claims: Claims, pipeline: str, model: Found) -> tuple[str, bool]:
    """(claim run id, True) if this call claimed the model for `pipeline`, (the existing claim's run id,
    False) if it was claimed before. Call `ensure_claim_lock()` once first."""
    with exclusive(
        CLAIM_LOCK, LOCK_TIMEOUT_SECONDS, f"claiming {model.source} for {pipeline}", lambda text: say("watch", text)
    ):
        # Deleted claims are not searched: deleting a claim run is how a model is released for a rerun.
        existing = claims.find(pipeline, model.sha256)
        if existing is not None:
            return existing, False
        return claims.create(pipeline, model.sha256, model.source, model.path, _current_flow_run_id()), True


def _start(claims: Claims, claim_id: str, spec_path: Path, model: Found, deployment: str | None) -> dict[str, Any]:
    """Run (or trigger) the pipeline for a claimed model and close the claim with the outcome.

    Any error is the claim's, never the watcher's: the other models are still handled.
    """
    parameters = {"spec_file": str(spec_path), "model_path": model.path}
    try:
        if deployment is not None:
            from prefect.deployments import run_deployment

            # Keyed by the claim, not the content: a retried request makes no second flow run, and a
            # model released by deleting its claim can still be run again.
            flow_run: Any = run_deployment(
                name=deployment, parameters=parameters, timeout=0, idempotency_key=claim_id, tags=["int8flow-watch"]
            )
            result = {"status": "scheduled", "flow_run_id": str(flow_run.id)}
            say("watch", f"triggered {deployment}: flow run {flow_run.id}")
        else:
            outcome = quantization_pipeline(**parameters)
            result = {
                "status": "finished",
                "pipeline_run_id": outcome["parent_run_id"],
                "selected": outcome["selected"],
                "summary": outcome["summary"],
                "registered_version": outcome["registered_version"],
            }
    except Exception as error:  # noqa: BLE001 - the claim's failure, never the watcher's
        message = f"{type(error).__name__}: {error}"
        fail("watch", f"{model.source} failed: {message}")
        claims.failed(claim_id, message, traceback.format_exc())
        return {"status": "failed", "error": message}
    except BaseException:
        claims.interrupted(claim_id)
        raise
    claims.finished(claim_id, result)
    return result


def _current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.id or None


def _folder_name(model_name: str) -> str:
    """The model name as a folder name; a hash keeps apart names that differ only in replaced characters."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)
    return safe if safe == model_name else f"{safe}-{hashlib.sha256(model_name.encode()).hexdigest()[:8]}"
