"""The pipeline's steps: each runs one or more stages through the runner and logs what came out.

`flows.pipeline` lists these steps in order; here each one wires stage functions from `tasks/` to
their inputs, says what happened, and hands results to the MLflow adapter. Per-variant state lives in
`VariantRecord`s; a stage that fails for one variant fails that record only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from int8flow import __version__
from int8flow.flows import faults
from int8flow.flows.console import say, waiting, warn
from int8flow.flows.isolated import in_child_process
from int8flow.flows.plan import Plan
from int8flow.flows.records import VariantRecord, attempt, describe
from int8flow.flows.runner import Outcome, Runner
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.tracking import PipelineRun, Tag
from int8flow.tasks.calibrate import (
    CalibrationKey,
    CalibrationPassError,
    CalibrationRanges,
    calibrate_in_one_pass,
    calibration_passes,
)
from int8flow.tasks.clipping import clipping
from int8flow.tasks.coverage import op_coverage, slow_int8_warnings
from int8flow.tasks.data import Dataset, Tokenizer, load_dataset
from int8flow.tasks.errors import InputError
from int8flow.tasks.evaluate import EvaluationError, ModelOutputs, Scores, evaluate, evaluate_model, run_model
from int8flow.tasks.kinds import MakeJob
from int8flow.tasks.kinds.dynamic import DynamicVariant
from int8flow.tasks.model import Graph, ModelInfo, inspect_model
from int8flow.tasks.preprocess import fuse_transformer, preprocess
from int8flow.tasks.profile import input_feed
from int8flow.tasks.quantize import QuantizedModel, quantize
from int8flow.tasks.repair import repair_model
from int8flow.tasks.sanity import check_fp32, constant_metric_warning
from int8flow.tasks.select import AccuracyCheck, AccuracyRule, Candidate


@dataclass(frozen=True)
class Job:
    """What every step of one pipeline run needs."""

    spec: PipelineSpec
    spec_path: Path
    plan: Plan
    runner: Runner
    run: PipelineRun
    work: Path
    tokenize: Tokenizer | None
    repairs: list[str] = field(default_factory=list)  # what `fp32_graphs` changed in the model as given

    @property
    def accuracy(self) -> AccuracyRule:
        return self.spec.selection.accuracy_rule(self.spec.selection_metric)

    def feed(self, data: Dataset, batch_size: int | None = None) -> dict:
        return input_feed(data, batch_size or self.spec.selection_batch_size)


@dataclass(frozen=True)
class Baseline:
    """The FP32 model on the evaluation data: its outputs and scores (its latency is timed with the
    candidates, in the same session: `flows.timing`)."""

    source: ModelInfo
    data: Dataset
    reference: ModelOutputs
    scores: Scores


def tokenizer(spec: PipelineSpec) -> Tokenizer | None:
    if spec.model.source != "huggingface":
        return None
    from int8flow.tasks.export import hf_tokenizer

    return hf_tokenizer(spec.model)


def _export(source: Any, batches: Any, out: Path) -> Any:
    from int8flow.tasks.export import export_model  # imports torch: only for pytorch / huggingface sources

    # in a child process: torch's and the exporter's memory end with it (flows/isolated.py)
    return in_child_process(export_model, source, batches, out)


def source_model(job: Job) -> ModelInfo:
    """The FP32 ONNX model: the spec's file, or exported from PyTorch / Hugging Face with a parity check."""
    model = job.spec.model
    if model.source == "onnx":
        path = model.path
    else:
        from int8flow.tasks.export import declared_input_dtypes

        data = job.runner.call(
            "load-data",
            load_dataset,
            job.spec.evaluation.data,
            declared_input_dtypes(model),
            tokenize=job.tokenize,
            label="export-examples",
        )
        exported = job.runner.call("export", _export, model, data.batches, job.work / "exported" / "model.onnx")
        say(
            "export",
            f"{model.source} -> ONNX opset {model.export.opset} ({model.export.exporter}) in {exported.seconds:.1f} s; parity max abs diff {exported.parity_max_abs_diff:.2g}",
        )
        for note in exported.notes:
            say("export", note)
        job.run.exported(exported.path, exported.parity_max_abs_diff, exported.seconds)
        path = exported.path
    source = job.runner.call("inspect-model", inspect_model, path)
    say(
        "model",
        f"{source.path.name}: opset {source.opset}, {source.size_bytes / 1e6:.1f} MB, sha256 {source.sha256[:12]}",
    )
    return source


def log_setup(job: Job, source: ModelInfo) -> None:
    resolved = job.spec.model_dump(mode="json", exclude={"variants"}) | {
        "variants": [variant.model_dump(mode="json", exclude={"grid"}) for variant in job.plan.variants]
    }
    versions = {"int8flow": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    job.run.setup(resolved, job.spec_path, source.sha256, versions)
    plan = job.plan
    job.run.hardware(plan.hardware, plan.preset, plan.detected, plan.warnings)
    say(
        "target",
        f"{plan.preset.name} ({plan.preset_source}): {plan.hardware.describe()}; execution providers {', '.join(plan.hardware.execution_providers)}",
    )
    for note in plan.notes:
        warn("target", note)
    for warning in plan.warnings:
        warn("target", f"WARNING {warning}")


def fp32_graphs(job: Job, source: ModelInfo, records: Mapping[str, VariantRecord]) -> dict[Graph, Path]:
    """The FP32 graph each variant starts from: as given (repaired), pre-processed, transformer-fused."""
    work, runner = job.work, job.runner
    fixed = {
        name: np.asarray(value, dtype=source.input_dtypes.get(name)) for name, value in job.spec.fixed_inputs().items()
    }
    repaired = runner.call(
        "repair", repair_model, source.path, work / "repaired" / "model.onnx", job.plan.opset, fixed, label="given"
    )
    # pre-processing and fusion in child processes: ORT's optimiser sessions and shape inference hold
    # several copies of the model that the pipeline process would keep (flows/isolated.py)
    pre = runner.call(
        "pre-process",
        in_child_process,
        preprocess,
        repaired.path,
        job.spec.preprocess,
        work / "preprocessed" / "model.onnx",
    )
    # Pre-processing writes graph patterns of its own (MatMul + Add -> Gemm with a [1, N] bias).
    pre_repaired = runner.call(
        "repair",
        repair_model,
        pre.path,
        work / "preprocessed" / "repaired" / "model.onnx",
        job.plan.opset,
        label="pre-processed",
    )
    repairs = list(dict.fromkeys([*repaired.repairs, *pre.notes, *pre_repaired.repairs]))
    for note in repairs:
        warn("repair", note)
    job.repairs[:] = repairs
    job.run.repairs(repairs)
    graphs = {Graph.GIVEN: repaired.path, Graph.PREPROCESSED: pre_repaired.path}
    if Graph.FUSED in job.plan.graphs:
        fused = _fuse(job, repaired.path, records)
        if fused is not None:
            graphs[Graph.FUSED] = fused
    return graphs


def _fuse(job: Job, model: Path, records: Mapping[str, VariantRecord]) -> Path | None:
    fusion = job.spec.preprocess.transformer_fusion
    assert fusion is not None  # the spec requires it for fused variants
    try:
        fused = job.runner.call(
            "transformer-fusion", in_child_process, fuse_transformer, model, fusion, job.work / "fused" / "model.onnx"
        )
    except Exception as error:  # noqa: BLE001 - only the fused variants fail
        for record in records.values():
            if record.variant.graph is Graph.FUSED:
                record.fail("fuse", error)
        return None
    say(
        "fuse",
        "transformer fusion: " + (", ".join(f"{op} {n}" for op, n in fused.fused_ops.items()) or "nothing fused"),
    )
    for note in fused.notes:
        warn("fuse", note)
    job.run.fusion(fused.fused_ops)
    # The transformer optimizer is the fused graph's pre-processing: quant_pre_process's ORT optimisation
    # pass would re-create fusions left out (SkipLayerNormalization) and its value_info.
    return fused.path


def fp32_baseline(job: Job, source: ModelInfo) -> Baseline:
    """The FP32 model's outputs and scores on the evaluation data; what cannot be right about them
    (NaN, labels of the wrong kind) is bad input, what looks degenerate is a recorded warning."""
    spec, runner = job.spec, job.runner
    data = runner.call(
        "load-data",
        load_dataset,
        spec.evaluation.data,
        source.input_dtypes,
        tokenize=job.tokenize,
        ignore_extra_inputs=spec.model.source != "onnx",
        input_shapes=source.input_shapes,
        label="evaluation",
    )
    try:
        reference = runner.call("fp32-outputs", run_model, source.path, data, spec.evaluation.output)
        scores = evaluate(reference, reference, data, spec.evaluation.metrics, spec.evaluation.guards.topk)
        warnings = check_fp32(scores, reference, data, spec.evaluation.metrics)
    except EvaluationError as error:  # the user's own model on the user's own data
        raise InputError(f"{source.path.name} on {spec.evaluation.data.origin}: {error}") from error
    say("fp32", f"{data.samples} samples: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.metrics.items()))
    for warning in warnings:
        job.run.warn(warning)
        warn("fp32", f"evaluation looks degenerate: {warning}")
    job.run.fp32(scores.metrics, source.size_bytes, data.fingerprint)
    faults.point("fp32-done")
    return Baseline(source, data, reference, scores)


def calibrations(
    job: Job, source: ModelInfo, graphs: Mapping[Graph, Path], records: Mapping[str, VariantRecord]
) -> tuple[dict[CalibrationKey, CalibrationRanges], Dataset | None]:
    """One calibration per method and graph the static variants use; a failure fails only its variants."""
    spec = job.spec
    wanted = [key for key in job.plan.calibrations if key.graph in graphs]
    if not wanted or spec.calibration is None:
        return {}, None
    data = job.runner.call(
        "load-data",
        load_dataset,
        spec.calibration.data,
        source.input_dtypes,
        max_samples=spec.calibration.samples,
        tokenize=job.tokenize,
        ignore_extra_inputs=spec.model.source != "onnx",
        input_shapes=source.input_shapes,
        label="calibration",
    )
    passes = calibration_passes(wanted)
    futures = {
        keys: job.runner.submit(
            "calibrate",
            calibrate_in_one_pass,
            graphs[keys[0].graph],
            data,
            [key.method for key in keys],
            spec.calibration,
            {key.method: job.work / "calibration" / f"{key}.json" for key in keys},
            _op_types(job, keys),
            label=" + ".join(str(key) for key in keys),
        )
        for keys in passes
    }
    ranges = {}
    with waiting("calibrate", f"{len(wanted)} calibration(s) in {len(passes)} pass(es) on {data.samples} samples"):
        for keys, future in futures.items():
            try:
                outcomes: dict[str, Any] = future.result()
            except CalibrationPassError as failed:  # each method failed: its own error for its variants
                outcomes = failed.errors
            except Exception as error:  # noqa: BLE001 - only the variants of these calibrations fail
                outcomes = {key.method: error for key in keys}
            for key in keys:
                outcome = outcomes[key.method]
                if isinstance(outcome, Exception):
                    for record in records.values():
                        if record.ok and record.variant.calibration_key() == key:
                            record.fail("calibrate", outcome)
                    continue
                ranges[key] = outcome
                together = f" (one pass with {', '.join(k.method for k in keys if k != key)})" if len(keys) > 1 else ""
                say(
                    "calibrate",
                    f"{key}: {outcome.tensors} tensors from {data.samples} samples in {outcome.seconds:.1f} s{together}",
                )
    job.run.calibration(data.fingerprint, {str(key): value.seconds for key, value in ranges.items()})
    return ranges, data


def _op_types(job: Job, keys: tuple[CalibrationKey, ...]) -> list[str] | None:
    """The op types one pass calibrates: what its calibrations' variants quantize (None: every type)."""
    wanted = [job.plan.calibrated_op_types.get(key) or () for key in keys]
    return sorted(set().union(*wanted)) if all(wanted) else None


def calibration_coverage(
    job: Job,
    graphs: Mapping[Graph, Path],
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    baseline: Baseline,
    records: Mapping[str, VariantRecord],
) -> None:
    """How much of the evaluation data each calibration would clip, per tensor; said when it is a lot, and
    logged with every variant that uses those ranges."""
    for key, calibrated in ranges.items():
        try:
            report = job.runner.call(
                "clipping", clipping, graphs[key.graph], calibrated.path, str(key), baseline.data, label=str(key)
            )
        except Exception as error:  # noqa: BLE001 - a diagnostic: its failure must not fail the variants
            warn("calibrate", f"{key}: clipping report failed: {type(error).__name__}: {error}")
            continue
        worst = report.tensors[0] if report.tensors else None
        say(
            "calibrate",
            f"{key}: on {report.samples} evaluation samples, "
            + (
                f"the worst tensor ({worst.tensor}) clips {worst.share:.2%} of its values"
                if worst
                else "no tensor read"
            ),
        )
        if (warning := report.warning()) is not None:
            warn("calibrate", warning)
            job.run.warn(warning)
        for record in records.values():
            if record.variant.calibration_key() == key:
                record.clipping = report


def make_and_evaluate(
    job: Job,
    records: Mapping[str, VariantRecord],
    graphs: Mapping[Graph, Path],
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    baseline: Baseline,
) -> None:
    """Quantize every variant not made yet (two at a time), then evaluate each and read its op coverage."""
    spec = job.spec
    made: dict[str, Outcome[QuantizedModel]] = {}
    for name, record in records.items():
        if record.ok and record.made is None:
            made_job = MakeJob(job.work / "variants" / name / "model.onnx", ranges, spec.preprocess.transformer_fusion)
            made[name] = job.runner.submit(
                "quantize", quantize, graphs[record.variant.graph], record.variant, made_job, label=name
            )
    for name, future in made.items():
        records[name].made = attempt(records[name], "quantize", future.result)
        if records[name].made is None:
            log_made(job, records[name], baseline)
    scored = {
        name: job.runner.submit(
            "evaluate",
            evaluate_model,
            record.made.path,
            baseline.data,
            baseline.reference,
            spec.evaluation.metrics,
            spec.evaluation.output,
            label=name,
        )
        for name, record in records.items()
        if record.ok and record.made is not None and record.scores is None
    }
    for name, scoring in scored.items():
        record = records[name]
        record.scores = attempt(record, "evaluate", scoring.result)
        if record.scores is not None:
            say("evaluate", f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in record.scores.metrics.items()))
            cover(job, record, baseline)
        log_made(job, record, baseline)


def cover(job: Job, record: VariantRecord, baseline: Baseline) -> None:
    """Which ops of the graph ORT runs are integer, and the warnings that follow, said before timing."""
    made = record.made
    assert made is not None
    coverage = attempt(
        record,
        "op-coverage",
        lambda: job.runner.call(
            "op-coverage",
            op_coverage,
            made.path,
            job.feed(baseline.data),
            job.spec.selection_threads,
            label=record.name,
        ),
    )
    if coverage is None:
        return
    record.coverage = coverage
    record.warnings = slow_int8_warnings(coverage) if record.variant.facts.integer_kernels else []
    say("ops", f"{record.name}: {coverage.summary()}")
    for warning in record.warnings:
        warn("ops", f"{record.name}: likely slower than FP32: {warning}")
    for note in made.notes:
        if note.startswith("repair:"):
            warn("repair", f"{record.name}: {note.removeprefix('repair: ')}")


def log_made(job: Job, record: VariantRecord, baseline: Baseline) -> None:
    """The variant's run, written as soon as its model and scores exist (or it failed)."""
    variant = record.variant
    job.run.open_variant(
        record.name, variant.kind_name(), variant.model_dump(mode="json", exclude={"grid"}), record.fallback_of
    )
    if record.failure is not None or record.made is None or record.scores is None:
        job.run.variant_failed(record.name, str(record.failure or "not made"))
        return
    fp32 = baseline.scores.metrics
    metrics: dict[str, float | None] = dict(record.scores.metrics)
    metrics |= {f"{name}_drop": fp32[name] - value for name, value in record.scores.metrics.items() if name in fp32}
    metrics |= {
        "size_mb": record.made.size_bytes / 1e6,
        "compression_ratio": baseline.source.size_bytes / record.made.size_bytes,
        "quantize_seconds": record.made.seconds,
    }
    tags, texts = {}, {}
    for output, fidelity in record.scores.fidelity.items():
        metrics |= fidelity.as_metrics(f"guard.{output}.")
    if record.coverage is not None:
        metrics |= record.coverage.as_metrics("ops.")
        tags[Tag.OP_COVERAGE] = record.coverage.summary()
    if record.made.notes:
        tags[Tag.NOTES] = " | ".join(record.made.notes)
    if record.warnings:
        tags[Tag.WARNINGS] = " | ".join(record.warnings)
    if record.clipping is not None:
        metrics |= record.clipping.as_metrics()
        texts["calibration/clipping.csv"] = record.clipping.as_csv()
    if record.fallback_of:
        tags[Tag.FALLBACK_OF] = record.fallback_of
        tags[Tag.KEPT_IN_FLOAT] = ",".join(record.variant.excluded_nodes())
    job.run.variant_made(record.name, metrics, tags, record.made.path, texts)
    faults.point("variant-logged")


def judge_accuracy(job: Job, records: Mapping[str, VariantRecord], baseline: Baseline) -> None:
    """Each evaluated variant against the accuracy constraint (the one rule, `AccuracyRule`) and the
    fidelity guards; and the metric itself, if it never moves."""
    rule, guards = job.accuracy, job.spec.evaluation.guards
    for record in records.values():
        if record.ok and record.scores is not None and record.accuracy is None:
            record.accuracy = rule.check(record.scores.metrics, baseline.scores.metrics)
            record.guard_failures = guards.collapsed(record.scores.fidelity)
            if not record.accuracy.passed:
                say("accuracy", f"{record.name}: {record.accuracy.text}")
            for failure in record.guard_failures:
                warn("guard", f"{record.name}: output collapsed: {failure}")
    metric = job.spec.selection_metric.name
    scored = {record.name: record.scores for record in records.values() if record.ok and record.scores is not None}
    constant = constant_metric_warning(metric, baseline.scores.metrics[metric], scored)
    if constant is not None:
        job.run.warn(constant)
        warn("accuracy", constant)


def ort_reference(
    job: Job, records: Mapping[str, VariantRecord], graphs: Mapping[Graph, Path], baseline: Baseline
) -> None:
    """ORT's plain `quantize_dynamic(model, out)` of the model as given, evaluated like the variants: each
    dynamic variant less accurate than it says how it differs (issue 16: a user's first try must not beat
    the product silently)."""
    dynamic = [
        record
        for record in records.values()
        if isinstance(record.variant, DynamicVariant) and record.fallback_of is None and record.accuracy is not None
    ]
    if not dynamic:
        return
    spec, source = job.spec, baseline.source
    scores, failures = None, []
    for graph, what in ((source.path, "as given"), (graphs[Graph.GIVEN], "as repaired by int8flow")):
        try:
            scores = _ort_default_scores(job, graph, baseline)
            break
        except Exception as error:  # noqa: BLE001 - ORT's own defaults failing is a finding, not a failed run
            failures.append(f"fails on {source.path.name} {what}: {describe(error)}")
    if scores is None:
        text = "ORT's plain quantize_dynamic " + "; ".join(failures)
        say("reference", text)
        job.run.ort_reference({}, text, {})
        return
    rule, metric = job.accuracy, spec.selection_metric.name
    plain = rule.check(scores.metrics, baseline.scores.metrics)
    summary = (
        "ORT's plain quantize_dynamic "
        + (f"{failures[0]}; of the repaired graph" if failures else f"of {source.path.name} as given")
        + f": {metric}={scores.metrics[metric]:.4g}"
    )
    say("reference", summary)
    comparisons = {}
    for record in dynamic:
        assert record.accuracy is not None and record.scores is not None and record.made is not None
        assert isinstance(record.variant, DynamicVariant)
        ours = record.scores.metrics[metric]
        if record.accuracy.drop > plain.drop + 1e-9 or (
            math.isnan(record.accuracy.drop) and not math.isnan(plain.drop)
        ):
            repairs = [] if failures else job.repairs  # the reference ran on the repaired graph too
            differences = record.variant.differences_from_ort_default(record.made.notes, repairs)
            comparisons[record.name] = (
                f"less accurate than ORT's plain quantize_dynamic ({metric} {ours:.4g} vs {scores.metrics[metric]:.4g}); "
                "it differs in: " + ("; ".join(differences) or "nothing int8flow knows of")
            )
            warn("reference", f"{record.name}: {comparisons[record.name]}")
        else:
            comparisons[record.name] = (
                f"at least as accurate as ORT's plain quantize_dynamic ({metric} {ours:.4g} vs {scores.metrics[metric]:.4g})"
            )
    job.run.ort_reference(scores.metrics, summary, comparisons)


def _ort_default_scores(job: Job, model: Path, baseline: Baseline) -> Scores:
    made = job.runner.call(
        "quantize",
        quantize,
        model,
        DynamicVariant.ort_default(),
        MakeJob(job.work / "ort-default" / "model.onnx", {}),
        label="ort-default",
    )
    return job.runner.call(
        "evaluate",
        evaluate_model,
        made.path,
        baseline.data,
        baseline.reference,
        job.spec.evaluation.metrics,
        job.spec.evaluation.output,
        label="ort-default",
    )


def held_out(job: Job, record: VariantRecord, baseline: Baseline) -> AccuracyCheck | None:
    """The selected variant on `evaluation.test`, data selection never saw: its accuracy there, logged beside
    the selection score, and a gap between the two flagged."""
    test, spec = job.spec.evaluation.test, job.spec
    if test is None or record.made is None or record.accuracy is None:
        return None
    source = baseline.source
    data = job.runner.call(
        "load-data",
        load_dataset,
        test,
        source.input_dtypes,
        tokenize=job.tokenize,
        ignore_extra_inputs=spec.model.source != "onnx",
        input_shapes=source.input_shapes,
        label="test",
    )
    try:
        reference = job.runner.call("fp32-outputs", run_model, source.path, data, spec.evaluation.output, label="test")
    except EvaluationError as error:
        raise InputError(f"{source.path.name} on {test.origin}: {error}") from error
    fp32 = evaluate(reference, reference, data, spec.evaluation.metrics)
    scores = job.runner.call(
        "evaluate",
        evaluate_model,
        record.made.path,
        data,
        reference,
        spec.evaluation.metrics,
        spec.evaluation.output,
        label=f"{record.name}-test",
    )
    check = job.accuracy.check(scores.metrics, fp32.metrics)
    metric = job.accuracy.metric.name
    gap = check.drop - record.accuracy.drop
    text = f"{metric} drop {check.drop:.4g} on {data.samples} held-out samples vs {record.accuracy.drop:.4g} on the selection data"
    margin = 0.5 * (spec.selection.max_drop or 0.0)
    if not check.passed:
        warn("held-out", f"{record.name}: {text}: over max_drop on data selection never saw")
    elif spec.selection.max_drop is not None and gap > margin:
        warn("held-out", f"{record.name}: {text}: the selection data flattered it")
    else:
        say("held-out", f"{record.name}: {text}")
    job.run.held_out(record.name, scores.metrics, fp32.metrics, text, check.passed and not gap > margin)
    return check


def explain_warnings(record: VariantRecord, chosen: Candidate) -> None:
    """A selected variant that op coverage called likely slower than FP32 was timed and won anyway."""
    if record.warnings and chosen.speedup is not None:
        for warning in record.warnings:
            say(
                "select",
                f"{record.name} was warned about ({warning.split(':')[0]}) and measured {chosen.speedup.text()} FP32 in the timing session: the warning did not hold on this CPU",
            )
