"""The fallback step: variants that miss the accuracy constraint are re-quantized with their worst nodes
kept in float (`tasks.fallback`), each step a variant of its own, nested under the one it came from."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from int8flow.flows.console import fail, say, waiting
from int8flow.flows.records import VariantRecord, describe
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.steps import Baseline, Job, cover, log_made
from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges
from int8flow.tasks.data import Dataset
from int8flow.tasks.evaluate import Scores, evaluate_model
from int8flow.tasks.fallback import MIN_GAIN_DB, FallbackResult, accuracy_fallback
from int8flow.tasks.kinds import MakeJob, VariantBase
from int8flow.tasks.model import Graph
from int8flow.tasks.quantize import QuantizedModel, quantize
from int8flow.tasks.select import AccuracyCheck


def _retry(
    spec: PipelineSpec,
    variant: VariantBase,
    graph: Path,
    quantized: Path,
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    error_data: Dataset,
    baseline: Baseline,
    work: Path,
    base_drop: float | None,
) -> FallbackResult:
    # Plain arguments only: under Dask this runs in another process.
    rule = spec.selection.accuracy_rule(spec.selection_metric)

    def quantize_step(step: VariantBase, out: Path) -> QuantizedModel:
        return quantize(graph, step, MakeJob(out, ranges, spec.preprocess.transformer_fusion))

    def evaluate_step(path: Path) -> Scores:
        return evaluate_model(path, baseline.data, baseline.reference, spec.evaluation.metrics, spec.evaluation.output)

    def check(scores: Scores) -> AccuracyCheck:
        return rule.check(scores.metrics, baseline.scores.metrics)

    # Fewer float nodes is faster and smaller: for those objectives, look past the first pass.
    bisect = spec.selection.objective in ("latency", "size")
    return accuracy_fallback(
        variant,
        graph,
        quantized,
        error_data,
        quantize_step,
        evaluate_step,
        check,
        spec.fallback,
        bisect,
        work,
        base_drop,
    )


def retry_inaccurate(
    job: Job,
    records: dict[str, VariantRecord],
    graphs: Mapping[Graph, Path],
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    error_data: Dataset,
    baseline: Baseline,
) -> None:
    if job.spec.selection.max_drop is None or not job.spec.fallback.enabled:
        return
    retried = [record for record in records.values() if _worth_retrying(record)]
    futures = {
        record.name: job.runner.submit(
            "accuracy-fallback",
            _retry,
            job.spec,
            record.variant,
            graphs[record.variant.graph],
            record.made.path,  # type: ignore[union-attr]
            ranges,
            error_data,
            baseline,
            job.work / "fallback" / record.name,
            record.accuracy.drop if record.accuracy else None,
            label=record.name,
        )
        for record in retried
    }
    with waiting("fallback", f"retrying {len(futures)} variant(s) with their worst nodes in float"):
        for name, future in futures.items():
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - the variant stays as it was
                fail("fallback", f"{name}: fallback failed: {describe(error)}")
                continue
            records[name].fallback = result
            _steps_to_records(job, records, name, result, baseline)


def _worth_retrying(record: VariantRecord) -> bool:
    if not (record.ok and record.made is not None and not record.passed_accuracy and record.variant.facts.fallback):
        return False
    if record.coverage is not None and record.coverage.counts["integer"].get("ConvInteger"):
        # Keeping nodes in float buys accuracy, never speed: ConvInteger stays slower than float Conv.
        say(
            "fallback",
            f"{record.name}: not retried, its ConvInteger kernels would stay slower than FP32 whatever stays in float",
        )
        return False
    return True


def _steps_to_records(
    job: Job, records: dict[str, VariantRecord], name: str, result: FallbackResult, baseline: Baseline
) -> None:
    worst = ", ".join(
        f"{e.node} ({e.op_type}, {e.input_sqnr_db:.1f} -> {e.output_sqnr_db:.1f} dB SQNR)" for e in result.ranking[:3]
    )
    say("fallback", f"{name}: {len(result.ranking)} quantized nodes ranked by error; worst: {worst or 'none'}")
    if result.gains:
        helped = sorted(result.gains.items(), key=lambda item: -item[1])
        listed = ", ".join(f"{node} +{gain:.2f} dB" for node, gain in helped[:3] if gain > MIN_GAIN_DB) or "none"
        say("fallback", f"{name}: {len(result.gains)} of them measured back in float; most helpful: {listed}")
    metric = job.spec.selection_metric.name
    for step in result.steps:
        status = (
            f"[red]failed[/]: {step.error}"
            if step.error
            else f"{metric} drop {step.drop:.4g}" + (" [green]meets max_drop[/]" if step.passed else "")
        )
        say(
            "fallback",
            f"  {step.name}: {len(step.kept_in_float)} node(s) in float, {status}; {step.why} ({step.seconds:.1f} s)",
        )
        record = VariantRecord(
            step.variant,
            made=step.quantized,
            scores=step.evaluation,
            fallback_of=name,
            clipping=records[name].clipping,
        )
        if step.error:
            record.fail("fallback", step.error)
        else:
            assert step.evaluation is not None
            record.accuracy = job.accuracy.check(step.evaluation.metrics, baseline.scores.metrics)
            cover(job, record, baseline)
        records[step.name] = record
        log_made(job, record, baseline)
    best = result.best
    best_text = (
        f"; best so far {best.name} ({metric} drop {best.drop:.4g})"
        if best is not None and best.drop is not None
        else ""
    )
    say("fallback", f"{name}: stopped, {result.stopped}{best_text}")
    lines = ["node,op_type,input_sqnr_db,output_sqnr_db,loss_db,measured_gain_db"]
    lines += [
        f"{e.node},{e.op_type},{e.input_sqnr_db:.3f},{e.output_sqnr_db:.3f},{e.loss_db:.3f},"
        + (f"{result.gains[e.node]:.3f}" if e.node in result.gains else "")
        for e in result.ranking
    ]
    steps = {step.name: step.why for step in result.steps}
    job.run.fallback(name, "\n".join(lines) + "\n", result.stopped, steps, best.name if best else None)
