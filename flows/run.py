"""The steps of one pipeline run, in order, for any runner and any tracking.

`run_pipeline` is what the Prefect flow (`flows.pipeline.quantization_pipeline`) runs with Prefect
tasks and MLflow, and what the bare benchmark (`bench/bare_pipeline.py`) runs with plain calls and no
logging: same plan, same stages, same order. Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from int8flow.flows import steps
from int8flow.flows.console import fail, say
from int8flow.flows.fallbacks import retry_inaccurate
from int8flow.flows.plan import make_plan
from int8flow.flows.promote import Promotion, promote
from int8flow.flows.records import VariantRecord, describe
from int8flow.flows.runner import Runner
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.steps import Baseline, Job
from int8flow.flows.timing import candidate, deciding, faster_in, fp32_candidate, time_candidates
from int8flow.flows.tracking import PipelineRun, scratch_dir
from int8flow.flows.training import log_qat, train_qat
from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges
from int8flow.tasks.hardware import detect
from int8flow.tasks.report import plot_pareto, write_table
from int8flow.tasks.select import Candidate, SelectionResult, select
from int8flow.tasks.timing import TimingSession


@dataclass
class PipelineOutcome:
    parent_run_id: str
    selected: str | None
    summary: str
    variants: dict[str, str]  # name -> "ok" or the error
    registered_version: str | None = None
    alias_moved: bool = False
    alias_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    spec: PipelineSpec, spec_path: Path, runner: Runner, run: PipelineRun, *, register: bool = True
) -> PipelineOutcome:
    """The steps of one pipeline run, in order."""
    plan = make_plan(spec, detect())
    with scratch_dir("int8flow-work-") as work:
        job = Job(spec, spec_path, plan, runner, run, work, steps.tokenizer(spec))
        source = steps.source_model(job)
        steps.log_setup(job, source)
        records = {variant.label: VariantRecord(variant) for variant in plan.variants}
        graphs = steps.fp32_graphs(job, source, records)
        baseline = steps.fp32_baseline(job, source)
        ranges, calibration_data = steps.calibrations(job, source, graphs, records)
        train_qat(job, records)  # before anything else is quantized: training has the machine to itself
        steps.make_and_evaluate(job, records, graphs, ranges, baseline)
        steps.judge_accuracy(job, records, baseline)
        retry_inaccurate(job, records, graphs, ranges, calibration_data or baseline.data, baseline)
        sessions = time_candidates(job, records, baseline)
        return _conclude(job, records, baseline, ranges, deciding(job, sessions), register)


def _conclude(
    job: Job,
    records: Mapping[str, VariantRecord],
    baseline: Baseline,
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    session: TimingSession | None,
    register: bool,
) -> PipelineOutcome:
    """Select, log every verdict, promote the selected variant, write the summary."""
    candidates = [candidate(job, record, session) for record in records.values()]
    result = select(candidates, baseline.scores.metrics, job.accuracy, job.spec.selection, faster_in(session))
    for verdict in result.verdicts:
        status = "[green]eligible[/]" if verdict.eligible else "rejected: " + "; ".join(verdict.reasons)
        say("select", f"{verdict.name}: {status}")
    say("select", result.summary)
    promotion: Promotion | None = None
    failed_registration: Exception | None = None
    for record, chosen, verdict in zip(records.values(), candidates, result.verdicts, strict=True):
        if not job.run.has_variant(record.name):
            steps.log_made(job, record, baseline)
        selected = record.name == result.selected
        kind = record.variant.kind_name()
        job.run.verdict(record.name, kind, selected, verdict.eligible, verdict.describe(), chosen.speedup)
        log_qat(job, record)
        if selected:
            steps.explain_warnings(record, chosen)
            steps.held_out(job, record, baseline)
        if selected and register:
            try:
                promotion = promote(job, record, baseline, ranges)
            except Exception as error:  # noqa: BLE001 - the results stay; the run ends FAILED below
                failed_registration = error
                fail("register", f"{record.name}: registration failed: {describe(error)}")
        job.run.close_variant(record.name)
    _summary(job, candidates, fp32_candidate(baseline, session), result, promotion)
    if failed_registration is not None:
        raise failed_registration
    return PipelineOutcome(
        parent_run_id=job.run.run_id,
        selected=result.selected,
        summary=result.summary,
        variants={name: str(record.failure) if record.failure else "ok" for name, record in records.items()},
        registered_version=promotion.version if promotion else None,
        alias_moved=promotion.moved if promotion else False,
        alias_reason=promotion.reason if promotion else "",
    )


def _summary(
    job: Job, candidates: list[Candidate], fp32: Candidate, result: SelectionResult, promotion: Promotion | None
) -> None:
    metric = job.spec.selection_metric.name
    table = write_table(candidates, fp32, result, metric, job.work / "variants.csv")
    plot = plot_pareto(candidates, fp32, result, metric, job.work / "accuracy_vs_latency.png")
    counts = {
        "total": len(candidates),
        "failed": sum(c.error is not None for c in candidates),
        "eligible": sum(v.eligible for v in result.verdicts),
    }
    job.run.summary(table, plot, counts, result.selected, result.summary, promotion.version if promotion else None)
