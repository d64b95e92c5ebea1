"""The pipeline's steps: each runs one or more stages through the runner and logs what came out.

`flows.pipeline` lists these steps in order; here each one wires stage functions from `tasks/` to
their inputs, says what happened, and hands results to the MLflow adapter. Per-variant state lives in
`VariantRecord`s; a stage that fails for one variant fails that record only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import onnx
import onnxruntime

from int8flow import __version__
from int8flow.flows.console import say, warn
from int8flow.flows.plan import Plan
from int8flow.flows.records import VariantRecord, attempt
from int8flow.flows.runner import Outcome, Runner
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.tracking import PipelineRun, Tag
from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges, calibrate
from int8flow.tasks.coverage import op_coverage, slow_int8_warnings
from int8flow.tasks.data import Dataset, Tokenizer, load_dataset
from int8flow.tasks.evaluate import ModelOutputs, Scores, evaluate, evaluate_model, run_model
from int8flow.tasks.kinds import MakeJob
from int8flow.tasks.model import Graph, ModelInfo, inspect_model
from int8flow.tasks.preprocess import fuse_transformer, preprocess
from int8flow.tasks.profile import LatencyStats, PairProfile, input_feed, profile_pair, profile_single
from int8flow.tasks.quantize import QuantizedModel, quantize
from int8flow.tasks.repair import repair_model
from int8flow.tasks.select import AccuracyRule, Candidate


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

    @property
    def accuracy(self) -> AccuracyRule:
        return self.spec.selection.accuracy_rule(self.spec.selection_metric)

    def feed(self, data: Dataset, batch_size: int | None = None) -> dict:
        return input_feed(data, batch_size or self.spec.selection_batch_size)


@dataclass(frozen=True)
class Baseline:
    """The FP32 model on the evaluation data: its outputs, scores and latency."""

    source: ModelInfo
    data: Dataset
    reference: ModelOutputs
    scores: Scores
    latency: Mapping[tuple[int, int], LatencyStats]  # (batch size, threads)


def tokenizer(spec: PipelineSpec) -> Tokenizer | None:
    if spec.model.source != "huggingface":
        return None
    from int8flow.tasks.export import hf_tokenizer

    return hf_tokenizer(spec.model)


def _export(source: Any, batches: Any, out: Path) -> Any:
    from int8flow.tasks.export import export_model  # imports torch: only for pytorch / huggingface sources

    return export_model(source, batches, out)


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
    repaired = runner.call(
        "repair", repair_model, source.path, work / "repaired" / "model.onnx", job.plan.opset, label="given"
    )
    pre = runner.call(
        "pre-process", preprocess, repaired.path, job.spec.preprocess, work / "preprocessed" / "model.onnx"
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
            "transformer-fusion", fuse_transformer, model, fusion, job.work / "fused" / "model.onnx"
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
    spec, runner = job.spec, job.runner
    exported = spec.model.source != "onnx"
    data = runner.call(
        "load-data",
        load_dataset,
        spec.evaluation.data,
        source.input_dtypes,
        tokenize=job.tokenize,
        ignore_extra_inputs=exported,
        label="evaluation",
    )
    reference = runner.call("fp32-outputs", run_model, source.path, data, spec.evaluation.output)
    scores = evaluate(reference, reference, data, spec.evaluation.metrics)
    say("fp32", f"{data.samples} samples: " + ", ".join(f"{k}={v:.4g}" for k, v in scores.metrics.items()))
    latency: dict[tuple[int, int], LatencyStats] = {}
    metrics: dict[str, float] = {}
    for batch_size in spec.profiling.batch_sizes:
        for threads in spec.profiling.threads:
            stats = runner.call(
                "profile-fp32",
                profile_single,
                source.path,
                job.feed(data, batch_size),
                threads,
                spec.profiling.warmup,
                spec.profiling.runs,
                label=f"b{batch_size}_t{threads}",
            )
            latency[(batch_size, threads)] = stats
            metrics |= stats.as_metrics(f"fp32.b{batch_size}_t{threads}")
    job.run.fp32(scores.metrics, source.size_bytes, data.fingerprint, metrics)
    return Baseline(source, data, reference, scores, latency)


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
        label="calibration",
    )
    futures = {
        key: job.runner.submit(
            "calibrate",
            calibrate,
            graphs[key.graph],
            data,
            key.method,
            spec.calibration,
            job.work / "calibration" / f"{key}.json",
            label=str(key),
        )
        for key in wanted
    }
    ranges = {}
    for key, future in futures.items():
        try:
            ranges[key] = future.result()
        except Exception as error:  # noqa: BLE001 - only the variants of this calibration fail
            for record in records.values():
                if record.ok and record.variant.calibration_key() == key:
                    record.fail("calibrate", error)
            continue
        say(
            "calibrate",
            f"{key}: {ranges[key].tensors} tensors from {data.samples} samples in {ranges[key].seconds:.1f} s",
        )
    job.run.calibration(data.fingerprint, {str(key): value.seconds for key, value in ranges.items()})
    return ranges, data


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
    tags = {}
    if record.coverage is not None:
        metrics |= record.coverage.as_metrics("ops.")
        tags[Tag.OP_COVERAGE] = record.coverage.summary()
    if record.made.notes:
        tags[Tag.NOTES] = " | ".join(record.made.notes)
    if record.warnings:
        tags[Tag.WARNINGS] = " | ".join(record.warnings)
    if record.fallback_of:
        tags[Tag.FALLBACK_OF] = record.fallback_of
        tags[Tag.KEPT_IN_FLOAT] = ",".join(record.variant.excluded_nodes())
    job.run.variant_made(record.name, metrics, tags, record.made.path)


def judge_accuracy(job: Job, records: Mapping[str, VariantRecord], baseline: Baseline) -> None:
    """Each evaluated variant against the accuracy constraint (the one rule, `AccuracyRule`)."""
    rule = job.accuracy
    for record in records.values():
        if record.ok and record.scores is not None and record.accuracy is None:
            record.accuracy = rule.check(record.scores.metrics, baseline.scores.metrics)
            if not record.accuracy.passed:
                say("accuracy", f"{record.name}: {record.accuracy.text}")


def time_variants(job: Job, records: Mapping[str, VariantRecord], baseline: Baseline) -> None:
    """FP32 and each variant worth timing, interleaved in one process, one variant at a time (two
    models timed at once on a 2-core machine would time each other)."""
    spec = job.spec
    for record in records.values():
        if not (record.ok and record.made is not None and (record.passed_accuracy or spec.profiling.all_variants)):
            continue
        for batch_size in spec.profiling.batch_sizes:
            for threads in spec.profiling.threads:
                pair = attempt(record, "profile", partial(_time_pair, job, record, baseline, batch_size, threads))
                if pair is None:
                    break
                record.timings.append(pair)
                say(
                    "profile",
                    f"{record.name} b{batch_size} t{threads}: p50 {pair.candidate.p50_ms:.3g} ms vs FP32 {pair.baseline.p50_ms:.3g} ms = {pair.speedup:.2f}x",
                )
        if record.failure is not None:
            job.run.variant_failed(record.name, str(record.failure))
        elif record.timings:
            metrics: dict[str, float] = {}
            for pair in record.timings:
                metrics |= pair.candidate.as_metrics(pair.key) | {
                    f"{pair.key}_speedup": pair.speedup,
                    f"{pair.key}_fp32_p50_ms": pair.baseline.p50_ms,
                }
            job.run.variant_timed(record.name, metrics)


def _time_pair(job: Job, record: VariantRecord, baseline: Baseline, batch_size: int, threads: int) -> PairProfile:
    assert record.made is not None
    profiling = job.spec.profiling
    feed = job.feed(baseline.data, batch_size)
    label = f"{record.name}-b{batch_size}_t{threads}"
    return job.runner.call(
        "profile",
        profile_pair,
        baseline.source.path,
        record.made.path,
        feed,
        threads,
        profiling.warmup,
        profiling.runs,
        label=label,
    )


def candidate(job: Job, record: VariantRecord) -> Candidate:
    if record.failure is not None or record.made is None or record.scores is None:
        return Candidate(record.name, error=str(record.failure))
    key = (job.spec.selection_batch_size, job.spec.selection_threads)
    pair = next((p for p in record.timings if (p.batch_size, p.threads) == key), None)
    if pair is None:  # missed the accuracy constraint: not worth timing
        return Candidate(record.name, metrics=record.scores.metrics, size_bytes=record.made.size_bytes)
    return Candidate(record.name, record.scores.metrics, pair.speedup, pair.candidate.p50_ms, record.made.size_bytes)
