"""The Prefect flow: a spec in, every variant measured and logged, the best one promoted.

The flow loads the spec, opens the MLflow run and hands both to `flows.run.run_pipeline`, which lists
the steps in order (export, graphs, FP32 baseline, calibration, qat, quantize + evaluate, fallback,
timing, selection, promotion) with every stage run as a Prefect task (`flows.runner.PrefectRunner`).
Stage logic lives in `tasks/`, the wiring of each step in `flows/steps.py`, every MLflow name in
`flows/tracking.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from int8flow.flows.console import say, warn
from int8flow.flows.prefect_ui import show_in_prefect
from int8flow.flows.run import PipelineOutcome, run_pipeline
from int8flow.flows.runlog import run_log
from int8flow.flows.runner import PrefectRunner
from int8flow.flows.specfile import load_spec
from int8flow.flows.tracking import MlflowStore, PipelineRun

__all__ = ["PipelineOutcome", "dask_task_runner", "quantization_pipeline", "run_pipeline"]


def _flow_run_name() -> str:
    """`<spec file>` or `<spec file> <- <model file>`: what the run is about, in Prefect's run list."""
    from prefect.runtime import flow_run

    parameters = flow_run.parameters
    name = Path(str(parameters.get("spec_file", "spec"))).stem
    model = parameters.get("model_path")
    return f"{name} <- {Path(str(model)).name}" if model else name


@flow(name="int8flow", flow_run_name=_flow_run_name, task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)  # type: ignore[arg-type]
def quantization_pipeline(spec_file: str, model_path: str | None = None) -> dict[str, Any]:
    """Run the pipeline described by `spec_file` (a YAML spec) and return what happened.

    `model_path`: an ONNX file to quantize instead of the spec's model (a watcher's new model); the
    spec's data, variants and constraints apply unchanged.
    """
    spec_path = Path(spec_file).resolve()
    spec = load_spec(spec_path)
    model = Path(model_path).resolve() if model_path is not None else None
    if model is not None:
        spec = spec.with_model_file(model)
    # a deployment's worker has no CLI around it: the flow keeps its own log then
    with run_log(spec.name), PipelineRun.open(MlflowStore(), spec.name, model) as run:
        say("run", f"{spec.name}: MLflow run {run.run_id}")
        if run.swept:
            warn("run", f"{len(run.swept)} run(s) left RUNNING by processes that are gone were marked FAILED")
        outcome = run_pipeline(spec, spec_path, PrefectRunner(), run)
        show_in_prefect(spec.name, outcome, run.store.tracking_uri, run.experiment_id)
    say("done", outcome.summary)
    return outcome.as_dict()


def dask_task_runner(address: str | None = None, workers: int | None = None) -> Any:
    """Prefect's DaskTaskRunner: an existing cluster at `address`, or a local one of `workers`
    single-threaded worker processes (ORT in each brings its own threads; one per core is enough)."""
    import dask
    from prefect_dask import DaskTaskRunner

    # A busy 2-core machine stalls workers for long stretches: distributed's defaults (30 s to connect,
    # workers declared dead after missed heartbeats) turn that stall into failed tasks.
    dask.config.set(
        {
            "distributed.comm.timeouts.connect": "300s",
            "distributed.comm.timeouts.tcp": "600s",
            "distributed.scheduler.worker-ttl": "30 minutes",
        }
    )
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True})
