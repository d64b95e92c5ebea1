"""Make one variant of an FP32 graph: the kind's own function (`VariantBase.make`), run safely.

Each kind writes its model to `job.out`; here that runs in a private scratch folder (ORT's quantizers
write `<name>-inferred.onnx` beside the model they read, so two variants made at once from one file
would overwrite each other's), is timed, and any failure comes back as a QuantizationError carrying
ORT's own message, so the flow can record it on the variant's run and go on with the others.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from int8flow.tasks.kinds import MakeJob, VariantBase
from int8flow.tasks.model import model_size_bytes, private_link, save_model, uses_external_data


class QuantizationError(RuntimeError):
    pass


@dataclass(frozen=True)
class QuantizedModel:
    variant: str
    path: Path
    size_bytes: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def quantize(model: Path, variant: VariantBase, job: MakeJob) -> QuantizedModel:
    """Write `variant` of `model` to `job.out`; raise QuantizationError with the cause if it fails.

    `job.fusion`: for a `fused` variant, the transformer-graph edits to apply again to the result
    (quantizers add value_info back and rewrite attention nodes).
    """
    job.out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="int8flow-quant-") as scratch:
            notes = variant.make(private_link(model, Path(scratch)), job)
        if variant.fused and job.fusion is not None:
            notes = [*notes, *_finish(job.out, job)]
    except Exception as error:
        raise QuantizationError(f"{type(error).__name__}: {error}") from error
    return QuantizedModel(
        variant=variant.label,
        path=job.out,
        size_bytes=model_size_bytes(job.out),
        seconds=time.perf_counter() - started,
        notes=notes,
    )


def _finish(out: Path, job: MakeJob) -> list[str]:
    from int8flow.tasks.preprocess import finish_transformer_graph

    assert job.fusion is not None
    model = onnx.load(str(out))
    notes = finish_transformer_graph(model, job.fusion)
    save_model(model, out, uses_external_data(out))
    return notes
