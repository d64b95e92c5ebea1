"""The qat step: fine-tune each `kind: qat` variant (one at a time, the machine to itself), and add its
untrained twin as a variant of its own."""

from __future__ import annotations

from typing import Any

from int8flow.flows.console import progress, say
from int8flow.flows.records import VariantRecord
from int8flow.flows.steps import Job
from int8flow.tasks.data import load_dataset
from int8flow.tasks.kinds import QatVariant
from int8flow.tasks.quantize import QuantizedModel


def _train(*args: Any, **kwargs: Any) -> Any:
    from int8flow.tasks.qat import quantization_aware_training  # imports torch: only for qat variants

    return quantization_aware_training(*args, **kwargs)


def train_qat(job: Job, records: dict[str, VariantRecord]) -> None:
    trainees = [record for record in records.values() if isinstance(record.variant, QatVariant) and record.ok]
    options = job.spec.calibration
    if not trainees or options is None:  # the spec requires calibration for qat variants
        return
    from int8flow.tasks.export import declared_input_dtypes

    spec, runner = job.spec, job.runner
    declared = declared_input_dtypes(spec.model)  # type: ignore[arg-type]  # qat needs a torch source (spec rule)
    calibration = runner.call(
        "load-data",
        load_dataset,
        options.data,
        declared,
        max_samples=options.samples,
        tokenize=job.tokenize,
        label="qat-calibration",
    )
    examples = runner.call(
        "load-data", load_dataset, spec.evaluation.data, declared, tokenize=job.tokenize, label="qat-export-examples"
    ).batches
    for record in trainees:
        variant = record.variant
        assert isinstance(variant, QatVariant)
        try:
            training = (
                calibration
                if variant.training.data is None
                else runner.call(
                    "load-data",
                    load_dataset,
                    variant.training.data,
                    declared,
                    tokenize=job.tokenize,
                    label="qat-training",
                )
            )
            with progress("qat", record.name) as update:
                result = runner.call(
                    "quantization-aware-training",
                    _train,
                    spec.model,
                    variant,
                    calibration.batches,
                    training.batches,
                    examples,
                    job.work / "variants" / record.name / "model.onnx",
                    percentile=options.percentile,
                    on_step=lambda entry, planned: update(entry.step + 1, planned, f"loss {entry.loss:.4g}"),
                    label=record.name,
                )
        except Exception as error:  # noqa: BLE001 - one variant's failure
            record.fail("qat", error)
            continue
        _trained(records, record, variant, result)


def _trained(records: dict[str, VariantRecord], record: VariantRecord, variant: QatVariant, result: Any) -> None:
    record.qat = result
    record.made = QuantizedModel(record.name, result.path, result.size_bytes, result.seconds, result.notes)
    last = f", last loss {result.steps[-1].loss:.4g}" if result.steps else ""
    say(
        "qat",
        f"{record.name}: {len(result.quantized_layers)} layers fake-quantized; {result.stopped}; trained {result.train_seconds:.0f} s{last}",
    )
    if result.untrained_path is not None:
        twin = VariantRecord(variant.untrained_twin())
        note = "calibrated ranges, no training: post-training quantization of the same layers"
        twin.made = QuantizedModel(twin.name, result.untrained_path, result.untrained_size_bytes, 0.0, [note])
        records[twin.name] = twin


def log_qat(job: Job, record: VariantRecord) -> None:
    result: Any = record.qat
    if result is None:
        return
    metrics = {
        "qat.steps": len(result.steps),
        "qat.planned_steps": result.planned_steps,
        "qat.train_seconds": result.train_seconds,
        "qat.final_loss": result.steps[-1].loss if result.steps else None,
    }
    losses = [(entry.step, entry.loss) for entry in result.steps]
    job.run.qat(record.name, losses, metrics, result.stopped, result.quantized_layers, result.checkpoint)
