"""Activation ranges, computed once per calibration method and reused by every static variant.

ORT's `quantize_static` would calibrate again for each variant; instead the ranges are written with
`save_tensors_data` and each variant passes the file as `calibration_cache_path`.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator
from onnxruntime.quantization.calibrate import CalibraterBase, save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
from pydantic import Field

from int8flow.tasks.data import Dataset, DataSource
from int8flow.tasks.model import Graph, private_link
from int8flow.tasks.options import MAX_COUNT, StrictModel
from int8flow.tasks.quiet import quiet_prints

CalibrationMethodName = Literal["minmax", "entropy", "percentile", "distribution"]


class Calibration(StrictModel):
    data: DataSource = Field(description="Representative inputs for static quantization ranges.")
    method: CalibrationMethodName = Field(
        default="minmax", description="Default range method for static variants that don't set one."
    )
    samples: int = Field(default=128, ge=1, le=MAX_COUNT, description="At most this many calibration samples.")
    percentile: float = Field(default=99.999, gt=50, le=100, description="Percentile kept by the `percentile` method.")
    symmetric: bool = Field(
        default=False, description="Make activation ranges symmetric around zero while calibrating."
    )


ORT_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
    "distribution": CalibrationMethod.Distribution,
}
# Without a list of op types: every tensor any variant might quantize; each variant picks what it needs.
ALL_QUANTIZABLE_OPS = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))


@dataclass(frozen=True)
class CalibrationRanges:
    method: str
    path: Path  # ORT calibration cache (JSON)
    samples: int
    tensors: int
    seconds: float


class CalibrationError(RuntimeError):
    pass


@dataclass(frozen=True, order=True)
class CalibrationKey:
    """Ranges are per method and per graph: the fused graph has other tensor names."""

    method: CalibrationMethodName
    graph: Graph

    def __str__(self) -> str:
        return self.method if self.graph is Graph.PREPROCESSED else f"{self.method}@{self.graph}"


class _Feeds(CalibrationDataReader):
    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


# How many feeds one `collect_data` call sees. ORT's calibrators keep every output of a call until it
# ends, then fold them into ranges (minmax: two small reductions per tensor) or histograms (every
# calibrated tensor of every sample, ~60 MB a MiniLM sentence), which they merge across calls. A few feeds
# per call keeps memory flat in the number of samples; the histograms merge as ORT merges them.
FEEDS_PER_COLLECT = {"minmax": 16, "entropy": 1, "percentile": 1, "distribution": 1}


class DatasetReader(CalibrationDataReader):
    """Feeds the dataset's batches; one sample at a time when batch shapes differ.

    ORT's histogram calibrators stack every batch's outputs into one array, which fails on a ragged last
    batch ("inhomogeneous shape"); single samples always stack. A histogram method holds every
    calibrated tensor of one batch at a time (MiniLM: ~60 MB a sentence), so `calibration.data.batch_size`
    bounds its memory. Single samples for all would bound it further, but each merge re-bins ORT's
    histograms: entropy scales moved by up to 18 % on the test model.
    """

    def __init__(self, dataset: Dataset):
        shapes = {tuple((name, array.shape) for name, array in sorted(b.inputs.items())) for b in dataset.batches}
        self._feeds: Iterator[dict] = (
            iter([batch.inputs for batch in dataset.batches])
            if len(shapes) == 1
            else (batch.take(slice(index, index + 1)) for batch in dataset.batches for index in range(batch.size))
        )

    def get_next(self):
        return next(self._feeds, None)


def _lean_session(calibrator: CalibraterBase) -> None:
    """Replace ORT's session for the augmented model by one that runs each range reduction as soon as
    its tensor exists.

    The augmented model reads every calibrated tensor twice more (ReduceMin, ReduceMax); in ORT's default
    node order those reductions run late, so every activation of the network stays alive until the end of
    the run. Priority-based order runs them right after the producer: MiniLM's 209 tensors at batch 16
    peak at 0.4 GB instead of 2.6 GB, in half the time (measured, docs/benchmarks.md, *Run cost*).
    Graph optimisation stays off, as ORT has it: the calibrated tensors must keep their names.
    (`create_calibrator` has made ORT's session already and takes no session options, so the augmented
    model is loaded twice.)
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.log_severity_level = 3
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, sess_options=options, providers=["CPUExecutionProvider"]
    )


def _take(reader: CalibrationDataReader, count: int) -> list[dict]:
    chunk: list[dict] = []
    while len(chunk) < count and (feed := reader.get_next()) is not None:
        chunk.append(feed)
    return chunk


def calibrate(
    model: Path,
    dataset: Dataset,
    method: str,
    options: Calibration,
    out: Path,
    op_types: Sequence[str] | None = None,
) -> CalibrationRanges:
    """Compute activation ranges of `model` on `dataset` with `method` and save them to `out`: of the
    inputs and outputs of nodes of `op_types` (the ones the variants quantize, as ORT's `quantize_static`
    calibrates them), or of every op type any variant could quantize."""
    started = time.perf_counter()
    extra_options: dict[str, float | bool] = {"symmetric": options.symmetric}
    if method == "percentile":
        extra_options["percentile"] = options.percentile
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="int8flow-calib-") as scratch:
            calibrator = create_calibrator(
                private_link(model, Path(scratch) / "model"),
                list(op_types or ALL_QUANTIZABLE_OPS),
                augmented_model_path=str(Path(scratch) / "augmented.onnx"),
                calibrate_method=ORT_METHODS[method],
                use_external_data_format=True,
                providers=["CPUExecutionProvider"],
                extra_options=extra_options,
            )
            _lean_session(calibrator)
            feeds, per_call = DatasetReader(dataset), FEEDS_PER_COLLECT[method]
            with quiet_prints():  # ORT's histogram calibrators print progress to stdout
                while chunk := _take(feeds, per_call):
                    calibrator.collect_data(_Feeds(chunk))
                ranges = calibrator.compute_data()
            del calibrator
    except Exception as error:
        raise CalibrationError(f"{method} calibration failed: {type(error).__name__}: {error}") from error
    save_tensors_data(ranges, out)
    return CalibrationRanges(
        method=method,
        path=out,
        samples=dataset.samples,
        tensors=len(ranges.data),
        seconds=time.perf_counter() - started,
    )
