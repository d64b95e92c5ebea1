"""The steps of one pipeline run, in order, for any runner and any tracking.

`run_pipeline` is what the Prefect flow (`flows.pipeline.quantization_pipeline`) runs with Prefect
tasks and MLflow, and what the bare benchmark (`bench/bare_pipeline.py`) runs with plain calls and no
logging: same plan, same stages, same order. Nothing here imports Prefect or MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from int8flow.flows import steps
from int8flow.flows.console import fail, say
from int8flow.flows.fallbacks import retry_inaccurate
from int8flow.flows.plan import make_plan
from int8flow.flows.promote import Promotion, promote
from int8flow.flows.records import VariantRecord, describe
from int8flow.flows.review import Review, describe_run, write_report
from int8flow.flows.review import verdict as verdict_text
from int8flow.flows.runner import Runner
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.steps import Baseline, Job
from int8flow.flows.timing import candidate, deciding, faster_in, fp32_candidate, time_candidates
from int8flow.flows.tracking import PipelineRun, scratch_dir
from int8flow.flows.training import log_qat, train_qat
from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges
from int8flow.tasks.hardware import detect
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
    verdict: str = ""  # one paragraph: what won, by how much, registered how
    table: str = ""  # every variant and its verdict, as markdown
    tags: list[str] = field(default_factory=list)  # spec, model, preset, selected: for the Prefect run

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
        steps.calibration_coverage(job, graphs, ranges, baseline, records)
        train_qat(job, records)  # before anything else is quantized: training has the machine to itself
        steps.make_and_evaluate(job, records, graphs, ranges, baseline)
        steps.judge_accuracy(job, records, baseline)
        steps.ort_reference(job, records, graphs, baseline)
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
    """Select, log every verdict, promote the selected variant, write the report."""
    candidates = [candidate(job, record, session) for record in records.values()]
    fp32 = fp32_candidate(baseline, session)
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
        job.run.verdict(
            record.name,
            kind,
            selected,
            verdict.eligible,
            verdict.describe(),
            _key_numbers(chosen, verdict.accuracy_drop),
        )
        log_qat(job, record)
        if selected:
            steps.explain_warnings(record, chosen)
            steps.held_out(job, record, baseline)
        if selected and register:
            try:
                promotion = promote(job, record, chosen, fp32, baseline, ranges, session)
            except Exception as error:  # noqa: BLE001 - the results stay; the run ends FAILED below
                failed_registration = error
                fail("register", f"{record.name}: registration failed: {describe(error)}")
        job.run.close_variant(record.name)
    review = _report(job, records, candidates, fp32, result, session, promotion)
    if failed_registration is not None:
        raise failed_registration
    return _outcome(job, records, baseline, result, promotion, review)


def _outcome(
    job: Job,
    records: Mapping[str, VariantRecord],
    baseline: Baseline,
    result: SelectionResult,
    promotion: Promotion | None,
    review: Review,
) -> PipelineOutcome:
    return PipelineOutcome(
        parent_run_id=job.run.run_id,
        selected=result.selected,
        summary=result.summary,
        variants={name: str(record.failure) if record.failure else "ok" for name, record in records.items()},
        registered_version=promotion.version if promotion else None,
        alias_moved=promotion.moved if promotion else False,
        alias_reason=promotion.reason if promotion else "",
        verdict=review.verdict,
        table=review.table,
        tags=[
            f"spec:{job.spec.name}",
            f"model:{baseline.source.sha256[:12]}",
            f"preset:{job.plan.preset.name}",
            f"selected:{result.selected or 'none'}",
        ],
    )


def _key_numbers(chosen: Candidate, drop: float | None) -> dict[str, float | None]:
    """The variant's verdict in numbers; the `0_` ones sort first in MLflow's metric columns."""
    speedup = chosen.speedup
    return {
        "0_speedup": speedup.value if speedup else None,
        "0_speedup_low": speedup.low if speedup else None,
        "0_drop": drop,
        "0_p50_ms": chosen.latency_ms,
        "0_size_mb": chosen.size_bytes / 1e6 if chosen.size_bytes else None,
        "speedup": speedup.value if speedup else None,
        "speedup_low": speedup.low if speedup else None,
        "speedup_high": speedup.high if speedup else None,
    }


def _report(
    job: Job,
    records: Mapping[str, VariantRecord],
    candidates: list[Candidate],
    fp32: Candidate,
    result: SelectionResult,
    session: TimingSession | None,
    promotion: Promotion | None,
) -> Review:
    version, reason = (promotion.version, promotion.reason) if promotion else (None, None)
    text = verdict_text(job, result, candidates, fp32, session, version, reason)
    table, files = write_report(job, records, candidates, fp32, result, text)
    description = describe_run(job, text, table, session, job.run.warnings)
    counts = {
        "total": len(candidates),
        "failed": sum(c.error is not None for c in candidates),
        "eligible": sum(v.eligible for v in result.verdicts),
    }
    chosen = next((c for c in candidates if c.name == result.selected), None)
    metrics = {"0_fp32_p50_ms": fp32.latency_ms} | (
        {"0_speedup": chosen.speedup.value} if chosen and chosen.speedup else {}
    )
    job.run.summary(
        files,
        counts,
        result.selected,
        result.summary,
        version,
        description,
        {k: v for k, v in metrics.items() if v is not None},
    )
    return Review(text, description, table, files)
