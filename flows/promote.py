"""Registration and the alias: the selected variant becomes a registry version (once per recipe), and
takes the alias only if it beats the holder (`tasks.select.decide_alias`, a pure decision).

Two runs promoting into the same registered model at once would both read "no holder" (or the same
holder) and both move the alias: the read-decide-write happens under one lock per registered model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import onnxruntime

from int8flow.flows import faults
from int8flow.flows.console import say
from int8flow.flows.locks import exclusive
from int8flow.flows.records import VariantRecord
from int8flow.flows.review import describe_model, describe_version, version_tags
from int8flow.flows.steps import Baseline, Job
from int8flow.flows.tracking import RegisteredVersion, Tag, onnx_signature
from int8flow.tasks.calibrate import CalibrationKey, CalibrationRanges
from int8flow.tasks.select import Candidate, Contender, decide_alias, holder_needs_timing
from int8flow.tasks.timing import TimingSession, time_session

# Registration is a few seconds; a live holder keeping it longer than this is stuck, not busy.
REGISTRY_LOCK_SECONDS = 900


@dataclass(frozen=True)
class Promotion:
    version: str
    moved: bool
    reason: str


def promote(
    job: Job,
    record: VariantRecord,
    chosen: Candidate,
    fp32: Candidate,
    baseline: Baseline,
    ranges: Mapping[CalibrationKey, CalibrationRanges],
    session: TimingSession | None,
) -> Promotion | None:
    registry = job.spec.registry
    if registry is None or not registry.promote:
        return None
    lock = f"registry-{registry.model_name}"
    with exclusive(
        lock,
        REGISTRY_LOCK_SECONDS,
        f"promoting {record.name} of run {job.run.run_id}",
        lambda text: say("register", text),
    ):
        faults.point("registry-locked")
        promotion = _register_and_decide(job, record, baseline, ranges)
        _describe(job, record, chosen, fp32, baseline, session, promotion)
        return promotion


def recipe(
    job: Job, record: VariantRecord, baseline: Baseline, ranges: Mapping[CalibrationKey, CalibrationRanges]
) -> str:
    """What makes two versions identical: same model, same resolved variant, same data, same tools."""
    variant, spec = record.variant, job.spec
    key = variant.calibration_key()
    calibration = ranges.get(key) if key is not None else None
    qat_checkpoint = getattr(record.qat, "checkpoint", None)
    ingredients = {
        "source_sha256": baseline.source.sha256,
        "variant": variant.model_dump(mode="json", exclude={"name", "grid"}),
        "preprocess": spec.preprocess.model_dump(mode="json"),
        "calibration": spec.calibration.model_dump(mode="json", exclude={"data"})
        if calibration and spec.calibration
        else None,
        "calibration_ranges_sha256": hashlib.sha256(calibration.path.read_bytes()).hexdigest() if calibration else None,
        # a trained model is the recipe's result only if training ran the same: hash what it produced
        "qat_checkpoint_sha256": hashlib.sha256(qat_checkpoint.read_bytes()).hexdigest() if qat_checkpoint else None,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


def _register(
    job: Job, record: VariantRecord, baseline: Baseline, ranges: Mapping[CalibrationKey, CalibrationRanges]
) -> RegisteredVersion:
    registry, store = job.spec.registry, job.run.store
    assert registry is not None and record.made is not None and record.scores is not None
    fingerprint = recipe(job, record, baseline, ranges)
    existing = store.find_version(registry.model_name, fingerprint)
    if existing is not None:
        say("register", f"{registry.model_name} v{existing.version} already holds this exact variant; no new version")
        return existing
    tags = {
        Tag.RECIPE: fingerprint,
        Tag.VARIANT: record.name,
        Tag.SOURCE_SHA256: baseline.source.sha256,
        Tag.EVAL_FINGERPRINT: baseline.data.fingerprint,
        Tag.SIZE_BYTES: str(record.made.size_bytes),
        Tag.OBJECTIVE: job.spec.selection.objective,
        # until the alias decision is made and recorded; a run killed in between leaves it pending, and
        # the next run with the same recipe reuses this version and makes the decision
        Tag.REGISTRATION: "pending",
    } | {f"{Tag.METRIC}{name}": repr(value) for name, value in record.scores.metrics.items()}
    signature = onnx_signature(baseline.source.inputs, baseline.source.outputs)
    registered = store.register(
        job.run.variant_run(record.name), record.made.path, registry.model_name, signature, tags
    )
    say("register", f"{registry.model_name} v{registered.version} <- {record.name}")
    faults.point("registered")
    return registered


def _register_and_decide(
    job: Job, record: VariantRecord, baseline: Baseline, ranges: Mapping[CalibrationKey, CalibrationRanges]
) -> Promotion:
    spec, store = job.spec, job.run.store
    registry = spec.registry
    assert registry is not None and record.made is not None and record.scores is not None
    registered = _register(job, record, baseline, ranges)
    newcomer = Contender(registered.version, record.scores.metrics, record.made.size_bytes, baseline.data.fingerprint)
    holder = store.holder(registry.model_name, registry.alias)
    speedup = None
    if holder is not None and holder_needs_timing(newcomer, holder, spec.selection.objective):
        holder_path = store.download_version(registry.model_name, holder.version, job.work / "holder")
        profiling = spec.profiling
        session = job.runner.call(
            "time-holder",
            time_session,
            {"holder": holder_path, "newcomer": record.made.path},
            job.feed(baseline.data),
            spec.selection_threads,
            profiling.warmup,
            profiling.runs,
            profiling.max_seconds,
            "holder",
            label=f"v{holder.version}",
        )
        speedup = session.speedup("newcomer")
        say(
            "promote",
            f"v{registered.version} vs @{registry.alias} v{holder.version}: {speedup.text()} ({session.summary()})",
        )
    decision = decide_alias(
        newcomer, holder, spec.selection.objective, spec.selection_metric, speedup, spec.selection.latency_tolerance
    )
    reason = f"@{registry.alias}: {decision.reason}"
    if decision.move:
        store.set_alias(registry.model_name, registry.alias, registered.version)
        say("promote", f"[green]@{registry.alias} -> v{registered.version}[/] ({decision.reason})")
    else:
        say("promote", f"@{registry.alias} unchanged ({decision.reason})")
    store.tag_version(
        registry.model_name, registered.version, {Tag.REGISTRATION: "complete", Tag.ALIAS_DECISION: reason}
    )
    job.run.alias_decision(record.name, registered.version, reason)
    return Promotion(registered.version, decision.move, reason)


def _describe(
    job: Job,
    record: VariantRecord,
    chosen: Candidate,
    fp32: Candidate,
    baseline: Baseline,
    session: TimingSession | None,
    promotion: Promotion,
) -> None:
    """The registry says why: the model's and the version's descriptions, and the version's key numbers."""
    registry = job.spec.registry
    assert registry is not None
    store = job.run.store
    text = describe_version(job, record, chosen, fp32, baseline, session) + f"\n\nAlias decision: {promotion.reason}."
    store.describe(registry.model_name, describe_model(job, baseline), promotion.version, text)
    drop = record.accuracy.drop if record.accuracy else None
    tags = version_tags(chosen, fp32, job, drop) | {Tag.ALIAS_MOVED: str(promotion.moved).lower()}
    store.tag_version(registry.model_name, promotion.version, tags)
