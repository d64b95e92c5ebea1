"""Activation ranges, computed once per calibration method and reused by every static variant.

ORT's `quantize_static` would calibrate again for each variant; instead the ranges are written with
`save_tensors_data` and each variant passes the file as `calibration_cache_path`. The histogram methods
of one graph share one pass of the model over the data (`calibration_passes`, `calibrate_in_one_pass`).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


class CalibrationPassError(CalibrationError):
    """Every method of a calibration pass failed. Raised rather than returned, so that the pass's
    Prefect task shows as failed; `errors` holds each method's own."""

    def __init__(self, errors: Mapping[str, CalibrationError]):
        super().__init__("; ".join(str(error) for error in errors.values()))
        self.errors = dict(errors)

    def __reduce__(self):  # a Dask worker pickles it with its errors, not its message
        return type(self), (self.errors,)


@dataclass(frozen=True, order=True)
class CalibrationKey:
    """Ranges are per method and per graph: the fused graph has other tensor names."""

    method: CalibrationMethodName
    graph: Graph

    def __str__(self) -> str:
        return self.method if self.graph is Graph.PREPROCESSED else f"{self.method}@{self.graph}"


# ORT's histogram calibrators augment a graph the same way (every calibrated tensor becomes an output)
# and differ only in what they make of the outputs; minmax's graph computes reductions instead.
HISTOGRAM_METHODS = frozenset({"entropy", "percentile", "distribution"})


def calibration_passes(keys: Iterable[CalibrationKey]) -> list[tuple[CalibrationKey, ...]]:
    """The calibrations grouped into passes over the data: the histogram methods of one graph together,
    every other calibration alone."""
    passes: dict[tuple[Graph, str], list[CalibrationKey]] = {}
    for key in sorted(keys):
        shared = key.method in HISTOGRAM_METHODS
        passes.setdefault((key.graph, "histogram" if shared else key.method), []).append(key)
    return [tuple(keys) for keys in passes.values()]


# False: each calibrator keeps ORT's own session, in ORT's node order, as `quantize_static` runs it (the
# "ort" rows of bench/calibration_memory.py measure that way against this one).
LEAN_SESSION = True


class _OneRunPerFeed:
    """The augmented model's session, shared by several calibrators: the first to ask for a feed's
    outputs runs the model, the others get the same arrays (ORT's collectors only read them)."""

    def __init__(self, session: ort.InferenceSession):
        self._session = session
        self._last: tuple[dict, Any] | None = None

    def get_inputs(self) -> Any:
        return self._session.get_inputs()

    def get_outputs(self) -> Any:
        return self._session.get_outputs()

    def run(self, output_names: Any, feed: dict) -> Any:
        if self._last is None or self._last[0] is not feed:
            self._last = (feed, self._session.run(output_names, feed))
        return self._last[1]


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


def _lean_session(augmented_model: str) -> ort.InferenceSession:
    """A session for ORT's augmented calibration model that runs each range reduction as soon as its
    tensor exists, to replace the calibrator's own.

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
    return ort.InferenceSession(augmented_model, sess_options=options, providers=["CPUExecutionProvider"])


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
    try:
        outcome = calibrate_in_one_pass(model, dataset, [method], options, {method: out}, op_types)[method]
    except CalibrationPassError as failed:
        raise failed.errors[method] from failed.errors[method].__cause__
    assert isinstance(outcome, CalibrationRanges)
    return outcome


def calibrate_in_one_pass(
    model: Path,
    dataset: Dataset,
    methods: Sequence[str],
    options: Calibration,
    outs: Mapping[str, Path],
    op_types: Sequence[str] | None = None,
) -> dict[str, CalibrationRanges | CalibrationError]:
    """`calibrate` for several methods whose calibrators see the same outputs (the histogram methods,
    `calibration_passes`), running the model once per feed for all of them. The ranges are the ones
    each method computes alone (tests/test_stages.py). A method that fails gets its error; the others go
    on; if none is left, `CalibrationPassError`. Each result's `seconds` is the whole pass's."""
    assert len(methods) == 1 or set(methods) <= HISTOGRAM_METHODS, f"{methods} do not share a pass"
    started = time.perf_counter()
    results: dict[str, CalibrationRanges | CalibrationError] = {}
    with tempfile.TemporaryDirectory(prefix="int8flow-calib-") as scratch:
        calibrators = _calibrators(model, methods, options, op_types, Path(scratch), results)
        computed = _run_pass(calibrators, dataset, results) if calibrators else {}
    seconds = time.perf_counter() - started
    for method, ranges in computed.items():
        outs[method].parent.mkdir(parents=True, exist_ok=True)
        save_tensors_data(ranges, outs[method])
        results[method] = CalibrationRanges(
            method=method, path=outs[method], samples=dataset.samples, tensors=len(ranges.data), seconds=seconds
        )
    errors = {method: result for method, result in results.items() if isinstance(result, CalibrationError)}
    if len(errors) == len(methods):
        raise CalibrationPassError(errors)
    return {method: results[method] for method in methods}


def _calibrators(
    model: Path,
    methods: Sequence[str],
    options: Calibration,
    op_types: Sequence[str] | None,
    scratch: Path,
    failures: dict[str, CalibrationRanges | CalibrationError],
) -> dict[str, CalibraterBase]:
    """ORT's calibrator per method, each on its augmented copy of `model` in `scratch`; a method whose
    calibrator cannot be made is recorded in `failures`."""
    private = private_link(model, scratch / "model")
    calibrators: dict[str, CalibraterBase] = {}
    for method in methods:
        extra_options: dict[str, float | bool] = {"symmetric": options.symmetric}
        if method == "percentile":
            extra_options["percentile"] = options.percentile
        try:
            calibrators[method] = create_calibrator(
                private,
                list(op_types or ALL_QUANTIZABLE_OPS),
                augmented_model_path=str(scratch / f"augmented-{method}.onnx"),
                calibrate_method=ORT_METHODS[method],
                use_external_data_format=True,
                providers=["CPUExecutionProvider"],
                extra_options=extra_options,
            )
        except Exception as error:  # noqa: BLE001 - this method fails; the others go on
            failures[method] = _failed(method, error)
    return calibrators


def _run_pass(
    calibrators: dict[str, CalibraterBase],
    dataset: Dataset,
    failures: dict[str, CalibrationRanges | CalibrationError],
) -> dict[str, Any]:
    """Feed `dataset` once through one lean session shared by `calibrators` (ORT's own sessions when
    `LEAN_SESSION` is off) and return each method's ranges (ORT's TensorsData); a method that fails is
    recorded in `failures` and dropped."""
    if LEAN_SESSION:
        first = next(iter(calibrators.values()))
        shared = _OneRunPerFeed(_lean_session(first.augmented_model_path))
        outputs = [output.name for output in shared.get_outputs()]
        for calibrator in calibrators.values():
            # the histogram methods augment the graph alike; if ORT ever differs, each runs alone
            same = [output.name for output in calibrator.infer_session.get_outputs()] == outputs
            calibrator.infer_session = shared if same else _lean_session(calibrator.augmented_model_path)
    feeds = DatasetReader(dataset)
    per_call = min(FEEDS_PER_COLLECT[method] for method in calibrators)
    computed: dict[str, Any] = {}
    with quiet_prints():  # ORT's histogram calibrators print progress to stdout
        while chunk := _take(feeds, per_call):
            for method, calibrator in list(calibrators.items()):
                try:
                    calibrator.collect_data(_Feeds(chunk))
                except Exception as error:  # noqa: BLE001 - this method fails; the others go on
                    failures[method] = _failed(method, error)
                    del calibrators[method]
        for method, calibrator in calibrators.items():
            try:
                computed[method] = calibrator.compute_data()
            except Exception as error:  # noqa: BLE001 - this method fails; the others go on
                failures[method] = _failed(method, error)
    calibrators.clear()  # the sessions hold the augmented models in the scratch directory
    return computed


def _failed(method: str, error: Exception) -> CalibrationError:
    failure = CalibrationError(f"{method} calibration failed: {type(error).__name__}: {error}")
    failure.__cause__ = error
    return failure
