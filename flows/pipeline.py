"""The Prefect flow: a spec in, every variant measured and logged, the best one promoted.

Stage logic lives in `tasks/`; here it is wrapped as Prefect tasks (one place) and chained, and
every result is logged to MLflow from the flow's own thread through `flows.tracking`.

Order: inspect -> pre-process -> FP32 evaluation and profile -> calibration (once per method) ->
per variant, concurrently: quantize -> evaluate -> then profiling, one variant at a time (two
models timed at once on a 2-core machine would time each other) -> selection -> registration.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import yaml
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner
from rich.console import Console

from flows import __version__
from flows.spec import HARDWARE_PRESETS, PipelineSpec, QatVariant, StaticVariant, VariantBase
from flows.specfile import load_spec
from flows.tracking import TAG_PREFIX, Tracker, flatten, onnx_signature, scratch_dir
from tasks.calibrate import calibrate, calibration_key
from tasks.data import load_dataset
from tasks.evaluate import evaluate, evaluate_model, run_model
from tasks.coverage import op_coverage, slow_int8_warnings
from tasks.fallback import FallbackResult, accuracy_fallback
from tasks.hardware import describe, detect, preset_for
from tasks.model import inspect_model
from tasks.preprocess import fuse_transformer, preprocess
from tasks.profile import input_feed, profile_pair, profile_single
from tasks.quantize import QUANTIZERS, QuantizedModel, quantize
from tasks.repair import repair_model, required_opset
from tasks.report import plot_pareto, write_table
from tasks.select import Candidate, accuracy_drop, beats_holder, select


def _task(function, name: str, **options):
    # Inputs hold numpy arrays and paths in temp dirs: caching them would only log hashing errors.
    return task(function, name=name, cache_policy=NO_CACHE, persist_result=False, **options)


inspect_task = _task(inspect_model, "inspect-model")
preprocess_task = _task(preprocess, "pre-process")
fuse_task = _task(fuse_transformer, "transformer-fusion")
load_data_task = _task(load_dataset, "load-data")
run_model_task = _task(run_model, "fp32-outputs")
calibrate_task = _task(calibrate, "calibrate")
quantize_task = _task(quantize, "quantize")
evaluate_task = _task(evaluate_model, "evaluate")
profile_pair_task = _task(profile_pair, "profile")
profile_single_task = _task(profile_single, "profile-fp32")
repair_task = _task(repair_model, "repair")
coverage_task = _task(op_coverage, "op-coverage")


def _export_model(source, batches, out, base_dir):
    from tasks.export import export_model  # imports torch: only for pytorch / huggingface sources

    return export_model(source, batches, out, base_dir)


export_task = _task(_export_model, "export")


def _quantization_aware_training(*args, **kwargs):
    from tasks.qat import quantization_aware_training  # imports torch: only for qat variants

    return quantization_aware_training(*args, **kwargs)


qat_task = _task(_quantization_aware_training, "quantization-aware-training")

console = Console(highlight=False, soft_wrap=True)


def say(stage: str, message: str) -> None:
    console.print(f"[bold cyan]{stage:>12}[/] {message}")


@dataclass
class VariantOutcome:
    variant: VariantBase
    quantized: Any = None
    evaluation: Any = None
    profiles: list = field(default_factory=list)
    coverage: Any = None  # tasks.coverage.OpCoverage of the graph ORT runs
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    failed_stage: str | None = None
    fallback_of: str | None = None  # the variant whose accuracy fallback made this one
    fallback: FallbackResult | None = None  # the fallback this variant started
    qat: Any = None  # tasks.qat.QatResult of a qat variant
    passed_accuracy: bool = True

    @property
    def name(self) -> str:
        return str(self.variant.name)


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


@flow(name="int8flow", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False)
def quantization_pipeline(spec_file: str, model_path: str | None = None) -> dict[str, Any]:
    """Run the pipeline described by `spec_file` (a YAML spec) and return what happened.

    `model_path`: an ONNX file to quantize instead of the spec's model (a watcher's new model); the
    spec's data, variants and constraints apply unchanged.
    """
    spec_path = Path(spec_file).resolve()
    spec = load_spec(spec_path)
    tags = {f"{TAG_PREFIX}pipeline": spec.name}
    if model_path is not None:
        spec = spec.with_model_file(Path(model_path).resolve())
        tags[f"{TAG_PREFIX}model_path"] = str(Path(model_path).resolve())
    tracker = Tracker()
    experiment = tracker.experiment_id(spec.name)
    with scratch_dir("int8flow-work-") as work, tracker.run(experiment, spec.name, tags) as parent:
        say("run", f"{spec.name}: MLflow run {parent} at {tracker.tracking_uri}")
        outcome = _run(spec, spec_path, tracker, experiment, parent, work)
    say("done", outcome.summary)
    return outcome.as_dict()


def dask_task_runner(address: str | None = None, workers: int | None = None):
    """Prefect's DaskTaskRunner: an existing cluster at `address`, or a local one of `workers`
    single-threaded worker processes (ORT in each brings its own threads; one per core is enough)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True})


def _run(spec: PipelineSpec, spec_path: Path, tracker: Tracker, experiment: str, parent: str, work: Path) -> PipelineOutcome:
    hardware = detect()
    detected = preset_for(hardware)
    variants = spec.resolved_variants(detected)
    base_dir = spec_path.parent
    tokenize = _tokenizer(spec)
    model_path = _export(spec, base_dir, tokenize, tracker, parent, work)
    source = inspect_task(model_path)
    _log_parent_setup(tracker, parent, spec, variants, source, hardware, spec_path, detected)
    _say_target(spec, hardware, detected, variants)
    say("model", f"{source.path.name}: opset {source.opset}, {source.size_bytes / 1e6:.1f} MB, sha256 {source.sha256[:12]}")

    opset = required_opset(variants)
    repaired = repair_task(source.path, work / "repaired" / "model.onnx", opset)
    pre = preprocess_task(repaired.path, spec.preprocess, work / "preprocessed" / "model.onnx")
    # Pre-processing writes graph patterns of its own (MatMul + Add -> Gemm with a [1, N] bias).
    pre_repaired = repair_task(pre.path, work / "preprocessed" / "repaired" / "model.onnx", opset)
    repairs = list(dict.fromkeys([*repaired.repairs, *pre.notes, *pre_repaired.repairs]))
    for note in repairs:
        say("repair", f"[yellow]{note}[/]")
    tracker.set_tags(parent, {f"{TAG_PREFIX}repairs": " | ".join(repairs) or "none"})
    outcomes = {variant.name: VariantOutcome(variant) for variant in variants}
    graphs = _graphs(spec, variants, repaired.path, pre_repaired.path, work, tracker, parent, outcomes)

    exported = spec.model.source != "onnx"
    eval_data = load_data_task(
        spec.evaluation.data, source.input_dtypes, base_dir=base_dir, tokenize=tokenize, ignore_extra_inputs=exported
    )
    reference = run_model_task(source.path, eval_data, spec.evaluation.output)
    fp32 = evaluate(reference, reference, eval_data, spec.evaluation.metrics)
    say("fp32", f"{eval_data.samples} samples: " + ", ".join(f"{k}={v:.4g}" for k, v in fp32.metrics.items()))
    fp32_latency = {}
    for batch_size in spec.profiling.batch_sizes:
        feed = input_feed(eval_data, batch_size)
        for threads in spec.profiling.threads:
            latency = profile_single_task(source.path, feed, threads, spec.profiling.warmup, spec.profiling.runs)
            fp32_latency[(batch_size, threads)] = latency
            tracker.log_metrics(parent, latency.as_metrics(f"fp32.b{batch_size}_t{threads}"))
    tracker.log_metrics(parent, {f"fp32.{name}": value for name, value in fp32.metrics.items()} | {"fp32.size_mb": source.size_bytes / 1e6})
    tracker.set_tags(parent, {f"{TAG_PREFIX}eval_fingerprint": eval_data.fingerprint})

    ranges, calibration_data = _calibrate(spec, variants, source, graphs, base_dir, tokenize, work, tracker, parent, outcomes)

    variant_paths = {name: work / "variants" / name / "model.onnx" for name in outcomes}
    # Training has the machine to itself: a quantizer running beside it would slow every step.
    _train_qat(spec, outcomes, base_dir, tokenize, work, tracker, parent)
    quantized = {
        name: quantize_task.with_options(task_run_name=f"quantize[{name}]").submit(
            graphs[_graph_key(outcome.variant)], outcome.variant, ranges, variant_paths[name],
            spec.preprocess.transformer_fusion,
        )
        for name, outcome in outcomes.items()
        if outcome.error is None and outcome.quantized is None
    }
    evaluated = {}
    for name, outcome in outcomes.items():
        if outcome.error is None:  # quantized now, or already (qat)
            evaluated[name] = evaluate_task.with_options(task_run_name=f"evaluate[{name}]").submit(
                outcome.quantized.path if outcome.quantized else variant_paths[name], eval_data, reference,
                spec.evaluation.metrics, spec.evaluation.output, wait_for=[quantized[name]] if name in quantized else None,
            )
    for name in evaluated:
        outcome = outcomes[name]
        try:
            if name in quantized:
                outcome.quantized = quantized[name].result()
        except Exception as error:
            outcome.error, outcome.failed_stage = _describe(error), "quantize"
            say("quantize", f"[red]{name} failed[/]: {outcome.error}")
            continue
        try:
            outcome.evaluation = evaluated[name].result()
        except Exception as error:
            outcome.error, outcome.failed_stage = _describe(error), "evaluate"
            say("evaluate", f"[red]{name} failed[/]: {outcome.error}")
            continue
        say("evaluate", f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in outcome.evaluation.metrics.items()))
        _cover(spec, eval_data, outcome)
        for note in outcome.quantized.notes:
            if note.startswith("repair:"):
                say("repair", f"[yellow]{name}: {note.removeprefix('repair: ')}[/]")

    _run_fallbacks(spec, outcomes, graphs, ranges, calibration_data or eval_data, eval_data, reference, fp32.metrics, work)

    for outcome in outcomes.values():
        if outcome.error is None and (outcome.passed_accuracy or spec.profiling.all_variants):
            _profile(spec, source.path, eval_data, outcome)

    candidates = [_candidate(spec, outcome) for outcome in outcomes.values()]
    fp32_selection_latency = fp32_latency[(spec.selection_batch_size, spec.selection_threads)]
    fp32_candidate = Candidate("fp32", fp32.metrics, 1.0, fp32_selection_latency.p50_ms, source.size_bytes)
    result = select(candidates, fp32.metrics, spec.selection_metric, spec.selection)
    for verdict in result.verdicts:
        status = "[green]eligible[/]" if verdict.eligible else "rejected: " + "; ".join(verdict.reasons)
        say("select", f"{verdict.name}: {status}")
    say("select", result.summary)

    outcome_summary = PipelineOutcome(
        parent_run_id=parent,
        selected=result.selected,
        summary=result.summary,
        variants={name: outcome.error or "ok" for name, outcome in outcomes.items()},
    )
    run_ids: dict[str, str] = {}
    # Variants first, then the fallback steps, each nested under the variant it started from.
    ordered = sorted(zip(outcomes.values(), candidates, result.verdicts), key=lambda item: item[0].fallback_of is not None)
    for outcome, candidate, verdict in ordered:
        run_parent = run_ids.get(outcome.fallback_of, parent) if outcome.fallback_of else parent
        with tracker.run(experiment, outcome.name, _variant_tags(outcome, verdict, result.selected), parent_id=run_parent) as run_id:
            run_ids[outcome.name] = run_id
            _log_variant(tracker, run_id, outcome, candidate, verdict, fp32.metrics, source.size_bytes)
            if outcome.fallback is not None:
                _log_fallback(tracker, run_id, outcome.fallback)
            if outcome.qat is not None:
                _log_qat(tracker, run_id, outcome.qat)
            if outcome.name == result.selected and spec.registry is not None and spec.registry.promote:
                _promote(spec, tracker, run_id, outcome, source, eval_data, ranges, outcome_summary, work)

    _log_summary(tracker, parent, spec, candidates, fp32_candidate, result, work)
    tracker.set_tags(parent, {f"{TAG_PREFIX}selected": result.selected or "none", f"{TAG_PREFIX}summary": result.summary})
    if outcome_summary.registered_version:
        tracker.set_tags(parent, {f"{TAG_PREFIX}registered_version": outcome_summary.registered_version})
    return outcome_summary


def _tokenizer(spec: PipelineSpec):
    if spec.model.source != "huggingface":
        return None
    from tasks.export import hf_tokenizer

    return hf_tokenizer(spec.model)


def _export(spec: PipelineSpec, base_dir: Path, tokenize, tracker: Tracker, parent: str, work: Path) -> Path:
    """The FP32 ONNX model: the spec's file, or exported from PyTorch / Hugging Face with a parity check."""
    if spec.model.source == "onnx":
        return spec.model.path
    from tasks.export import declared_input_dtypes

    declared = declared_input_dtypes(spec.model)
    data = load_data_task(spec.evaluation.data, declared, base_dir=base_dir, tokenize=tokenize)
    exported = export_task(spec.model, data.batches, work / "exported" / "model.onnx", base_dir)
    say("export", f"{spec.model.source} -> ONNX opset {spec.model.export.opset} ({spec.model.export.exporter}) in {exported.seconds:.1f} s; parity max abs diff {exported.parity_max_abs_diff:.2g}")
    for note in exported.notes:
        say("export", note)
    tracker.log_metrics(parent, {"export.parity_max_abs_diff": exported.parity_max_abs_diff, "export.seconds": exported.seconds})
    tracker.log_artifact(parent, exported.path, "exported")
    return exported.path


def _train_qat(spec: PipelineSpec, outcomes: dict, base_dir: Path, tokenize, work: Path, tracker: Tracker, parent: str) -> None:
    """Fine-tune each qat variant (one at a time), and add its untrained twin as a variant of its own."""
    trainees = [o for o in outcomes.values() if isinstance(o.variant, QatVariant) and o.error is None]
    if not trainees:
        return
    from tasks.export import declared_input_dtypes

    declared = declared_input_dtypes(spec.model)
    calibration = load_data_task(spec.calibration.data, declared, max_samples=spec.calibration.samples, base_dir=base_dir, tokenize=tokenize)
    export_examples = load_data_task(spec.evaluation.data, declared, base_dir=base_dir, tokenize=tokenize).batches
    for outcome in trainees:
        variant: QatVariant = outcome.variant
        name = outcome.name
        try:
            training = calibration if variant.training.data is None else load_data_task(
                variant.training.data, declared, base_dir=base_dir, tokenize=tokenize
            )
            with _training_progress(name) as on_step:
                result = qat_task.with_options(task_run_name=f"qat[{name}]")(
                    spec.model, variant, calibration.batches, training.batches, export_examples,
                    work / "variants" / name / "model.onnx", percentile=spec.calibration.percentile,
                    base_dir=base_dir, on_step=on_step,
                )
        except Exception as error:
            outcome.error, outcome.failed_stage = _describe(error), "qat"
            say("qat", f"[red]{name} failed[/]: {outcome.error}")
            continue
        outcome.qat = result
        outcome.quantized = QuantizedModel(name, result.path, result.size_bytes, result.seconds, result.notes)
        last = f", last loss {result.steps[-1].loss:.4g}" if result.steps else ""
        say("qat", f"{name}: {len(result.quantized_layers)} layers fake-quantized; {result.stopped}; trained {result.train_seconds:.0f} s{last}")
        if result.untrained_path is not None:
            untrained = variant.model_copy(
                update={"name": f"{name}-untrained", "compare_untrained": False, "training": variant.training.model_copy(update={"steps": 0, "epochs": None})}
            )
            twin = VariantOutcome(untrained)
            twin.quantized = QuantizedModel(str(untrained.name), result.untrained_path, result.untrained_size_bytes, 0.0, ["calibrated ranges, no training: post-training quantization of the same layers"])
            outcomes[twin.name] = twin


class _training_progress:
    """A rich progress bar for one training run; the stage only sees an `on_step(entry, planned)` callback."""

    def __init__(self, name: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn(f"[bold cyan]{'qat':>12}[/] {name}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self.task_id = None

    def __enter__(self):
        self.progress.start()

        def on_step(entry, planned: int) -> None:
            if self.task_id is None:
                self.task_id = self.progress.add_task("train", total=planned, loss="-")
            self.progress.update(self.task_id, completed=entry.step + 1, loss=f"{entry.loss:.4g}")

        return on_step

    def __exit__(self, *exc) -> None:
        self.progress.stop()


def _log_qat(tracker: Tracker, run_id: str, result) -> None:
    tracker.log_history(run_id, "qat.loss", [(entry.step, entry.loss) for entry in result.steps])
    tracker.log_metrics(
        run_id,
        {
            "qat.steps": len(result.steps),
            "qat.planned_steps": result.planned_steps,
            "qat.train_seconds": result.train_seconds,
            "qat.final_loss": result.steps[-1].loss if result.steps else None,
        },
    )
    tracker.set_tags(run_id, {f"{TAG_PREFIX}qat_stopped": result.stopped})
    tracker.log_text(run_id, "\n".join(result.quantized_layers) + "\n", "qat/quantized_layers.txt")
    tracker.log_artifact(run_id, result.checkpoint, "qat")


def _graph_key(variant: VariantBase) -> tuple[bool, bool]:
    return (variant.fused, QUANTIZERS[variant.kind].wants_preprocessed)  # type: ignore[attr-defined]


def _graphs(spec, variants, source_path: Path, pre_path: Path, work: Path, tracker, parent, outcomes) -> dict:
    """The FP32 graph each variant starts from, by (fused, pre-processed)."""
    graphs = {(False, False): source_path, (False, True): pre_path}
    fused_variants = [v for v in variants if v.fused]
    if not fused_variants:
        return graphs
    try:
        fused = fuse_task(source_path, spec.preprocess.transformer_fusion, work / "fused" / "model.onnx")
        graphs[(True, False)] = fused.path
        say("fuse", "transformer fusion: " + (", ".join(f"{op} {n}" for op, n in fused.fused_ops.items()) or "nothing fused"))
        for note in fused.notes:
            say("fuse", f"[yellow]{note}[/]")
        tracker.log_metrics(parent, {f"fusion.{op}": n for op, n in fused.fused_ops.items()})
        # The transformer optimizer is the fused graph's pre-processing: quant_pre_process's ORT
        # optimisation pass would re-create fusions left out (SkipLayerNormalization) and its
        # value_info, undoing `disable`/`strip_value_info`.
        graphs[(True, True)] = fused.path
    except Exception as error:
        say("fuse", f"[red]transformer fusion failed[/]: {_describe(error)}")
        for variant in fused_variants:
            outcome = outcomes[variant.name]
            outcome.error, outcome.failed_stage = _describe(error), "fuse"
    return graphs


def _calibrate(spec, variants, source, graphs, base_dir, tokenize, work, tracker, parent, outcomes) -> dict:
    """One calibration per method (and graph) static variants use; a failure fails only its variants."""
    keys = {
        calibration_key(v): v.fused
        for v in variants
        if isinstance(v, StaticVariant) and outcomes[v.name].error is None
    }
    if not keys or spec.calibration is None:
        return {}, None
    data = load_data_task(
        spec.calibration.data, source.input_dtypes, max_samples=spec.calibration.samples, base_dir=base_dir,
        tokenize=tokenize, ignore_extra_inputs=spec.model.source != "onnx",
    )
    tracker.set_tags(parent, {f"{TAG_PREFIX}calibration_fingerprint": data.fingerprint})
    futures = {
        key: calibrate_task.with_options(task_run_name=f"calibrate[{key}]").submit(
            graphs[(fused, True)], data, key.split("@")[0], spec.calibration, work / "calibration" / f"{key}.json"
        )
        for key, fused in sorted(keys.items())
    }
    ranges = {}
    for key, future in futures.items():
        try:
            ranges[key] = future.result()
            say("calibrate", f"{key}: {ranges[key].tensors} tensors from {data.samples} samples in {ranges[key].seconds:.1f} s")
            tracker.log_metrics(parent, {f"calibration.{key.replace('@', '.')}.seconds": ranges[key].seconds})
        except Exception as error:
            say("calibrate", f"[red]{key} failed[/]: {_describe(error)}")
            for outcome in outcomes.values():
                if isinstance(outcome.variant, StaticVariant) and calibration_key(outcome.variant) == key:
                    outcome.error, outcome.failed_stage = _describe(error), "calibrate"
    return ranges, data


def _fallback(spec: PipelineSpec, variant: VariantBase, graph: Path, quantized_path: Path, ranges, error_data, eval_data, reference, fp32_metrics, work: Path) -> FallbackResult:
    metric = spec.selection_metric
    return accuracy_fallback(
        variant,
        graph,
        quantized_path,
        error_data,
        quantize_step=lambda step, out: quantize(graph, step, ranges, out, spec.preprocess.transformer_fusion),
        evaluate_step=lambda path: evaluate_model(path, eval_data, reference, spec.evaluation.metrics, spec.evaluation.output),
        drop_of=lambda evaluation: accuracy_drop(evaluation.metrics[metric.name], fp32_metrics[metric.name], metric, spec.selection.drop),
        max_drop=spec.selection.max_drop,
        budget=spec.fallback,
        # Fewer float nodes is faster and smaller: for those objectives, look past the first pass.
        bisect=spec.selection.objective in ("latency", "size"),
        work=work,
    )


fallback_task = _task(_fallback, "accuracy-fallback")


def _run_fallbacks(spec, outcomes: dict, graphs, ranges, error_data, eval_data, reference, fp32_metrics, work: Path) -> None:
    """Mark the variants that miss `max_drop`; retry dynamic/static ones with their worst nodes in float."""
    rules, metric = spec.selection, spec.selection_metric
    if rules.max_drop is None:
        return
    missed = []
    for outcome in outcomes.values():
        if outcome.error is not None:
            continue
        drop = accuracy_drop(outcome.evaluation.metrics[metric.name], fp32_metrics[metric.name], metric, rules.drop)
        outcome.passed_accuracy = drop <= rules.max_drop
        if not outcome.passed_accuracy:
            missed.append(outcome)
            say("fallback", f"{outcome.name}: {metric.name} drop {drop:.4g} > max_drop {rules.max_drop:g}")
    retried = []
    for outcome in missed:
        if outcome.variant.kind not in ("dynamic", "static"):
            continue
        if outcome.coverage is not None and outcome.coverage.counts["integer"].get("ConvInteger"):
            # Keeping nodes in float buys accuracy, never speed: ConvInteger stays slower than float Conv.
            say("fallback", f"{outcome.name}: not retried, its ConvInteger kernels would stay slower than FP32 whatever stays in float")
            continue
        retried.append(outcome)
    if not retried or not spec.fallback.enabled:
        return
    futures = {
        outcome.name: fallback_task.with_options(task_run_name=f"fallback[{outcome.name}]").submit(
            spec, outcome.variant, graphs[_graph_key(outcome.variant)], outcome.quantized.path, ranges,
            error_data, eval_data, reference, fp32_metrics, work / "fallback" / outcome.name,
        )
        for outcome in retried
    }
    for name, future in futures.items():
        base = outcomes[name]
        try:
            result = future.result()
        except Exception as error:
            say("fallback", f"[red]{name}: fallback failed[/]: {_describe(error)}")
            continue
        base.fallback = result
        worst = ", ".join(f"{e.node} ({e.op_type}, {e.input_sqnr_db:.1f} -> {e.output_sqnr_db:.1f} dB SQNR)" for e in result.ranking[:3])
        say("fallback", f"{name}: {len(result.ranking)} quantized nodes ranked by error; worst: {worst or 'none'}")
        for step in result.steps:
            status = f"[red]failed[/]: {step.error}" if step.error else (
                f"{metric.name} drop {step.drop:.4g} " + ("[green]meets max_drop[/]" if step.passed else "still too large")
            )
            say("fallback", f"  {step.name}: {len(step.kept_in_float)} node(s) in float, {status} ({step.seconds:.1f} s)")
            outcome = VariantOutcome(step.variant, quantized=step.quantized, evaluation=step.evaluation, fallback_of=name, passed_accuracy=step.passed)
            if step.error:
                outcome.error, outcome.failed_stage = step.error, "fallback"
            outcomes[step.name] = outcome
        best = result.best
        say("fallback", f"{name}: stopped, {result.stopped}" + (f"; best so far {best.name} ({metric.name} drop {best.drop:.4g})" if best is not None and best.drop is not None else ""))


def _log_fallback(tracker: Tracker, run_id: str, result: FallbackResult) -> None:
    lines = ["node,op_type,input_sqnr_db,output_sqnr_db,loss_db"]
    lines += [f"{e.node},{e.op_type},{e.input_sqnr_db:.3f},{e.output_sqnr_db:.3f},{e.loss_db:.3f}" for e in result.ranking]
    tracker.log_text(run_id, "\n".join(lines) + "\n", "fallback/node_errors.csv")
    best = result.best
    tracker.set_tags(
        run_id,
        {
            f"{TAG_PREFIX}fallback": f"{len(result.steps)} step(s); {result.stopped}",
            f"{TAG_PREFIX}fallback_best": best.name if best is not None else "none",
        },
    )


def _cover(spec: PipelineSpec, eval_data, outcome: VariantOutcome) -> None:
    """Which ops of the graph ORT runs are integer, and the warnings that follow, said before timing."""
    try:
        coverage = coverage_task.with_options(task_run_name=f"op-coverage[{outcome.name}]")(
            outcome.quantized.path, input_feed(eval_data, spec.selection_batch_size), spec.selection_threads
        )
    except Exception as error:
        outcome.error, outcome.failed_stage = _describe(error), "op-coverage"
        say("ops", f"[red]{outcome.name} failed[/]: {outcome.error}")
        return
    outcome.coverage = coverage
    outcome.warnings = slow_int8_warnings(coverage) if outcome.variant.kind in ("dynamic", "static", "qat") else []
    say("ops", f"{outcome.name}: {coverage.summary()}")
    for warning in outcome.warnings:
        say("ops", f"[yellow]{outcome.name}: likely slower than FP32: {warning}[/]")


def _profile(spec: PipelineSpec, fp32_path: Path, eval_data, outcome: VariantOutcome) -> None:
    if outcome.coverage is None:
        _cover(spec, eval_data, outcome)
        if outcome.error is not None:
            return
    try:
        for batch_size in spec.profiling.batch_sizes:
            feed = input_feed(eval_data, batch_size)
            for threads in spec.profiling.threads:
                pair = profile_pair_task.with_options(task_run_name=f"profile[{outcome.name}]")(
                    fp32_path, outcome.quantized.path, feed, threads, spec.profiling.warmup, spec.profiling.runs
                )
                outcome.profiles.append(pair)
                say("profile", f"{outcome.name} b{batch_size} t{threads}: p50 {pair.candidate.p50_ms:.3g} ms vs FP32 {pair.baseline.p50_ms:.3g} ms = {pair.speedup:.2f}x")
    except Exception as error:
        outcome.error, outcome.failed_stage = _describe(error), "profile"
        say("profile", f"[red]{outcome.name} failed[/]: {outcome.error}")


def _candidate(spec: PipelineSpec, outcome: VariantOutcome) -> Candidate:
    if outcome.error is not None:
        return Candidate(outcome.name, error=f"{outcome.failed_stage}: {outcome.error}")
    if not outcome.profiles:  # missed the accuracy constraint: not worth timing
        return Candidate(outcome.name, metrics=outcome.evaluation.metrics, size_bytes=outcome.quantized.size_bytes)
    pair = next(p for p in outcome.profiles if (p.batch_size, p.threads) == (spec.selection_batch_size, spec.selection_threads))
    return Candidate(
        outcome.name,
        metrics=outcome.evaluation.metrics,
        speedup=pair.speedup,
        latency_ms=pair.candidate.p50_ms,
        size_bytes=outcome.quantized.size_bytes,
    )


def _variant_tags(outcome: VariantOutcome, verdict, selected: str | None) -> dict[str, str]:
    return {
        f"{TAG_PREFIX}kind": outcome.variant.kind,  # type: ignore[attr-defined]
        f"{TAG_PREFIX}selected": str(outcome.name == selected).lower(),
        f"{TAG_PREFIX}eligible": str(verdict.eligible).lower(),
        f"{TAG_PREFIX}verdict": "eligible" if verdict.eligible else "; ".join(verdict.reasons),
    }


def _log_variant(tracker: Tracker, run_id: str, outcome: VariantOutcome, candidate: Candidate, verdict, fp32_metrics, fp32_size) -> None:
    tracker.log_params(run_id, flatten(outcome.variant.model_dump(mode="json", exclude={"grid"})))
    if outcome.error is not None:
        tracker.end(run_id, "FAILED", f"{outcome.failed_stage}: {outcome.error}")
        return
    metrics: dict[str, float] = dict(outcome.evaluation.metrics)
    for name, value in outcome.evaluation.metrics.items():
        if name in fp32_metrics:
            metrics[f"{name}_drop"] = fp32_metrics[name] - value
    for pair in outcome.profiles:
        metrics |= pair.candidate.as_metrics(pair.key) | {f"{pair.key}_speedup": pair.speedup}
        metrics[f"{pair.key}_fp32_p50_ms"] = pair.baseline.p50_ms
    metrics |= {
        "size_mb": outcome.quantized.size_bytes / 1e6,
        "compression_ratio": fp32_size / outcome.quantized.size_bytes,
        "quantize_seconds": outcome.quantized.seconds,
        "speedup": candidate.speedup or 0.0,
    }
    if outcome.coverage is not None:
        metrics |= outcome.coverage.as_metrics("ops.")
    tracker.log_metrics(run_id, metrics)
    tags = {}
    if outcome.quantized.notes:
        tags[f"{TAG_PREFIX}notes"] = " | ".join(outcome.quantized.notes)
    if outcome.coverage is not None:
        tags[f"{TAG_PREFIX}op_coverage"] = outcome.coverage.summary()
    if outcome.warnings:
        tags[f"{TAG_PREFIX}warnings"] = " | ".join(outcome.warnings)
    if outcome.fallback_of:
        tags[f"{TAG_PREFIX}fallback_of"] = outcome.fallback_of
        tags[f"{TAG_PREFIX}kept_in_float"] = ",".join(outcome.variant.nodes_to_exclude)[:5000]
    if tags:
        tracker.set_tags(run_id, tags)
    tracker.log_artifact(run_id, outcome.quantized.path, "quantized")


def _recipe(spec: PipelineSpec, outcome: VariantOutcome, source, ranges) -> str:
    """What makes two versions identical: same model, same resolved variant, same data, same tools."""
    import hashlib

    variant = outcome.variant
    calibration = ranges.get(calibration_key(variant)) if isinstance(variant, StaticVariant) else None
    ingredients = {
        "source_sha256": source.sha256,
        "variant": variant.model_dump(mode="json", exclude={"name", "grid"}),
        "preprocess": spec.preprocess.model_dump(mode="json"),
        "calibration": spec.calibration.model_dump(mode="json", exclude={"data"}) if calibration else None,
        "calibration_ranges_sha256": hashlib.sha256(calibration.path.read_bytes()).hexdigest() if calibration else None,
        # a trained model is the recipe's result only if training ran the same: hash what it produced
        "qat_checkpoint_sha256": hashlib.sha256(outcome.qat.checkpoint.read_bytes()).hexdigest() if outcome.qat else None,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


def _promote(spec, tracker: Tracker, run_id: str, outcome: VariantOutcome, source, eval_data, ranges, summary: PipelineOutcome, work: Path) -> None:
    from flows.locks import exclusive

    # Two runs promoting into the same registered model at once would both read "no holder" (or the
    # same holder) and both move the alias: the read-decide-write happens under one lock per model.
    with exclusive(f"int8flow-registry-{_lock_name(spec.registry.model_name)}"):
        _register_and_decide(spec, tracker, run_id, outcome, source, eval_data, ranges, summary, work)


def _lock_name(text: str) -> str:
    return "".join(character if character.isalnum() or character in "-_" else "_" for character in text)


def _register_and_decide(spec, tracker: Tracker, run_id: str, outcome: VariantOutcome, source, eval_data, ranges, summary: PipelineOutcome, work: Path) -> None:
    registry = spec.registry
    metric = spec.selection_metric
    recipe = _recipe(spec, outcome, source, ranges)
    existing = tracker.find_version(registry.model_name, recipe)
    if existing is not None:
        registered = existing
        say("register", f"{registry.model_name} v{existing.version} already holds this exact variant; no new version")
    else:
        tags = {
            f"{TAG_PREFIX}recipe": recipe,
            f"{TAG_PREFIX}variant": outcome.name,
            f"{TAG_PREFIX}source_sha256": source.sha256,
            f"{TAG_PREFIX}eval_fingerprint": eval_data.fingerprint,
            f"{TAG_PREFIX}size_bytes": str(outcome.quantized.size_bytes),
            f"{TAG_PREFIX}objective": spec.selection.objective,
        } | {f"{TAG_PREFIX}metric.{name}": repr(value) for name, value in outcome.evaluation.metrics.items()}
        signature = onnx_signature(source.inputs, source.outputs)
        registered = tracker.register(run_id, outcome.quantized.path, registry.model_name, signature, tags)
        say("register", f"{registry.model_name} v{registered.version} <- {outcome.name}")
    summary.registered_version = registered.version

    holder = tracker.alias_holder(registry.model_name, registry.alias)
    if holder is None:
        decision_move, reason = True, f"no version held @{registry.alias} yet"
    elif str(holder.version) == registered.version:
        decision_move, reason = False, f"v{registered.version} already holds @{registry.alias}"
    elif holder.tags.get(f"{TAG_PREFIX}eval_fingerprint") != eval_data.fingerprint:
        decision_move = False
        reason = (
            f"@{registry.alias} v{holder.version} was evaluated on different data "
            "(evaluation fingerprints differ); not compared, alias left where it is"
        )
    else:
        speedup = None
        if spec.selection.objective == "latency":
            holder_path = tracker.download_version(registry.model_name, str(holder.version), work / "holder")
            pair = profile_pair_task(
                holder_path, outcome.quantized.path, input_feed(eval_data, spec.selection_batch_size),
                spec.selection_threads, spec.profiling.warmup, spec.profiling.runs,
            )
            speedup = pair.speedup
        holder_metrics = {
            key.removeprefix(f"{TAG_PREFIX}metric."): float(value)
            for key, value in holder.tags.items()
            if key.startswith(f"{TAG_PREFIX}metric.")
        }
        holder_size = holder.tags.get(f"{TAG_PREFIX}size_bytes")
        decision = beats_holder(
            spec.selection.objective, metric, outcome.evaluation.metrics, outcome.quantized.size_bytes,
            holder_metrics, int(holder_size) if holder_size else None, speedup, spec.selection.latency_tolerance,
        )
        decision_move, reason = decision.move, f"vs @{registry.alias} v{holder.version}: {decision.reason}"
    if decision_move:
        tracker.set_alias(registry.model_name, registry.alias, registered.version)
        say("promote", f"[green]@{registry.alias} -> v{registered.version}[/] ({reason})")
    else:
        say("promote", f"@{registry.alias} unchanged ({reason})")
    summary.alias_moved, summary.alias_reason = decision_move, reason
    tracker.set_tags(run_id, {f"{TAG_PREFIX}registered_version": registered.version, f"{TAG_PREFIX}alias_decision": reason})


def _say_target(spec: PipelineSpec, hardware, detected: str, variants) -> None:
    preset = spec.target_preset(detected)
    how = "detected" if spec.target.preset == "auto" else f"set in the spec; this CPU looks like {detected}"
    say("target", f"{preset} ({how}): {describe(hardware)}; execution providers {', '.join(hardware.execution_providers)}")
    reduced = [str(v.name) for v in variants if getattr(v, "reduce_range", None)]
    if reduced and not hardware.has_vnni:
        say("target", f"[yellow]no VNNI on this CPU: u8s8 products could saturate int16, so reduce_range (7-bit weights) is on for {', '.join(reduced)}[/]")


def _log_parent_setup(tracker, parent, spec: PipelineSpec, variants, source, hardware, spec_path: Path, detected: str) -> None:
    resolved = spec.model_dump(mode="json", exclude={"variants"}) | {
        "variants": [v.model_dump(mode="json", exclude={"grid"}) for v in variants]
    }
    tracker.log_params(parent, flatten(resolved, "spec."))
    tracker.log_text(parent, yaml.safe_dump(resolved, sort_keys=False), "spec/resolved.yaml")
    tracker.log_artifact(parent, spec_path, "spec")
    tracker.set_tags(
        parent,
        {
            f"{TAG_PREFIX}source_sha256": source.sha256,
            f"{TAG_PREFIX}version": __version__,
            f"{TAG_PREFIX}onnx_version": onnx.__version__,
            f"{TAG_PREFIX}onnxruntime_version": onnxruntime.__version__,
            f"{TAG_PREFIX}cpu": hardware.cpu_model,
            f"{TAG_PREFIX}machine": hardware.machine,
            f"{TAG_PREFIX}logical_cpus": hardware.logical_cpus,
            f"{TAG_PREFIX}execution_providers": ",".join(hardware.execution_providers),
            f"{TAG_PREFIX}target_preset": spec.target_preset(detected),
            f"{TAG_PREFIX}target_reason": HARDWARE_PRESETS[spec.target_preset(detected)].why,
            f"{TAG_PREFIX}detected_preset": detected,
        }
        | {f"{TAG_PREFIX}cpu.{flag}": str(present).lower() for flag, present in hardware.flags.items()},
    )


def _log_summary(tracker, parent, spec, candidates, fp32_candidate, result, work: Path) -> None:
    metric = spec.selection_metric.name
    table = write_table(candidates, fp32_candidate, result, metric, work / "variants.csv")
    tracker.log_artifact(parent, table, "summary")
    plot = plot_pareto(candidates, fp32_candidate, result, metric, work / "accuracy_vs_latency.png")
    tracker.log_artifact(parent, plot, "summary")
    failed = sum(c.error is not None for c in candidates)
    tracker.log_metrics(parent, {"variants_total": len(candidates), "variants_failed": failed, "variants_eligible": sum(v.eligible for v in result.verdicts)})


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()
