"""Each stage on its own, on a real model with real ONNX Runtime sessions and nothing but a temp dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from int8flow.tasks.calibrate import Calibration, CalibrationKey, calibrate
from int8flow.tasks.clipping import clipping
from int8flow.tasks.coverage import op_coverage
from int8flow.tasks.data import Dataset, DataSource, load_dataset
from int8flow.tasks.evaluate import Metric, evaluate, evaluate_model, run_model
from int8flow.tasks.hardware import HARDWARE_PRESETS, detect, preset_for
from int8flow.tasks.kinds import DynamicVariant, Fp16Variant, MakeJob, StaticVariant, WeightOnlyInt4Variant
from int8flow.tasks.model import Graph, inspect_model
from int8flow.tasks.preprocess import Preprocess, preprocess
from int8flow.tasks.profile import input_feed
from int8flow.tasks.quantize import QuantizationError, quantize
from int8flow.tasks.select import AccuracyRule, Candidate, Contender, Selection, decide_alias, pareto_front, select
from int8flow.tasks.timing import Speedup, time_session

METRICS = [Metric(name="top1"), Metric(name="cosine"), Metric(name="mae")]


def job(out: Path, ranges: dict | None = None) -> MakeJob:
    """Where a variant goes, with shared calibration ranges keyed by method (on the pre-processed graph)."""
    return MakeJob(out, {CalibrationKey(method, Graph.PREPROCESSED): r for method, r in (ranges or {}).items()})


@pytest.fixture(scope="module")
def prepared(digits_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("stages")
    info = inspect_model(digits_model.model)
    pre = preprocess(digits_model.model, Preprocess(), work / "pre" / "model.onnx")
    evaluation = load_dataset(DataSource(path=digits_model.evaluation, batch_size=64), info.input_dtypes)
    calibration = load_dataset(DataSource(path=digits_model.calibration, batch_size=32), info.input_dtypes)
    reference = run_model(digits_model.model, evaluation)
    return info, pre, evaluation, calibration, reference, work


def test_inspect_model_reports_io_and_hash(digits_model):
    info = inspect_model(digits_model.model)
    assert [t.name for t in info.inputs] == ["pixels"] and info.inputs[0].shape == ("batch", 64)
    assert info.opset == 17 and len(info.sha256) == 64 and info.size_bytes == digits_model.model.stat().st_size


def test_fp32_evaluation_matches_the_fitted_model(prepared, digits_model):
    _info, _pre, evaluation, _, reference, _ = prepared
    scores = evaluate(reference, reference, evaluation, METRICS).metrics
    assert scores["top1"] == pytest.approx(digits_model.fp32_top1)
    assert scores["cosine"] == pytest.approx(1.0) and scores["mae"] == 0.0


def test_calibration_once_is_reused_by_static_variants(prepared):
    _info, pre, evaluation, calibration, reference, work = prepared
    ranges = calibrate(
        pre.path, calibration, "minmax", Calibration(data=DataSource(path=pre.path)), work / "minmax.json"
    )
    cached = json.loads(ranges.path.read_text())
    assert ranges.samples == 128 and ranges.tensors > 0 and cached
    # given ranges computed once, when two static variants quantize, then neither calibrates again:
    # ORT receives no data reader at all, only the cache file.
    for per_channel in (False, True):
        variant = StaticVariant(
            kind="static", name=f"s{per_channel}", per_channel=per_channel, calibration_method="minmax"
        )
        result = quantize(pre.path, variant, job(work / f"static{per_channel}" / "model.onnx", {"minmax": ranges}))
        coverage = op_coverage(result.path, input_feed(evaluation, 4))
        assert coverage.total("integer") >= 2, coverage.counts  # both dense layers run as integer kernels
        scores = evaluate_model(result.path, evaluation, reference, METRICS).metrics
        assert scores["top1"] > 0.9 and scores["cosine"] > 0.99


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_shared_ranges_give_the_same_model_as_ort_calibrating_itself(prepared, method):
    from onnxruntime.quantization import CalibrationMethod, QuantType, quantize_static

    from int8flow.tasks.calibrate import ORT_METHODS, DatasetReader

    _info, pre, _evaluation, calibration, _reference, work = prepared
    ranges = calibrate(
        pre.path, calibration, method, Calibration(data=DataSource(path=pre.path)), work / f"{method}.json"
    )
    variant = StaticVariant(kind="static", name="shared", per_channel=True, calibration_method=method)
    ours = quantize(pre.path, variant, job(work / f"shared-{method}" / "model.onnx", {method: ranges}))

    quantize_static(
        pre.path,
        work / f"ort_own_{method}.onnx",
        DatasetReader(calibration),
        per_channel=True,
        activation_type=QuantType.QUInt8,
        calibrate_method=ORT_METHODS[method],
    )
    assert isinstance(ORT_METHODS[method], CalibrationMethod)

    def scales(path: Path) -> dict:
        graph = onnx.load(str(path)).graph
        return {
            t.name: np.asarray(onnx.numpy_helper.to_array(t), dtype=np.float64)
            for t in graph.initializer
            if "scale" in t.name or "zero_point" in t.name
        }

    mine, theirs = scales(ours.path), scales(work / f"ort_own_{method}.onnx")
    assert mine.keys() == theirs.keys()
    if method == "minmax":  # ranges merge exactly across the calls int8flow makes a few batches at a time
        assert all(np.array_equal(mine[name], theirs[name]) for name in mine)
    else:  # histograms merged across calls (ORT's own merge) shift a bin edge at most: scales within 15 %
        for name in (n for n in mine if "scale" in n):
            assert np.allclose(mine[name], theirs[name], rtol=0.15), name


def test_histogram_methods_in_one_pass_give_the_ranges_each_computes_alone(prepared, monkeypatch):
    from int8flow.tasks import calibrate as calibration

    _info, pre, _evaluation, data, _reference, work = prepared
    options = Calibration(data=DataSource(path=pre.path))
    methods = ["entropy", "percentile", "distribution"]
    alone = {method: calibrate(pre.path, data, method, options, work / f"alone-{method}.json") for method in methods}

    runs = []
    run = calibration._OneRunPerFeed.run

    def counted(self, names, feed):
        runs.append(self._last is None or self._last[0] is not feed)  # True: the model ran for this feed
        return run(self, names, feed)

    monkeypatch.setattr(calibration._OneRunPerFeed, "run", counted)
    together = calibration.calibrate_in_one_pass(
        pre.path, data, methods, options, {method: work / f"together-{method}.json" for method in methods}
    )
    feeds = len(data.batches)
    assert sum(runs) == feeds and len(runs) == feeds * len(methods)  # the model ran once per feed, for all three
    for method in methods:
        assert json.loads(together[method].path.read_text()) == json.loads(alone[method].path.read_text()), method

    keys = [
        CalibrationKey(m, g) for m in ("minmax", "entropy", "percentile") for g in (Graph.PREPROCESSED, Graph.FUSED)
    ]
    passes = calibration.calibration_passes(keys)
    assert sorted(passes) == sorted(
        [
            (CalibrationKey("entropy", Graph.PREPROCESSED), CalibrationKey("percentile", Graph.PREPROCESSED)),
            (CalibrationKey("entropy", Graph.FUSED), CalibrationKey("percentile", Graph.FUSED)),
            (CalibrationKey("minmax", Graph.PREPROCESSED),),
            (CalibrationKey("minmax", Graph.FUSED),),
        ]
    )


def test_a_method_that_fails_in_a_shared_pass_fails_alone(prepared, monkeypatch):
    from onnxruntime.quantization.calibrate import HistogramCollector

    from int8flow.tasks.calibrate import CalibrationError, calibrate_in_one_pass

    _info, pre, _evaluation, data, _reference, work = prepared

    def too_many_bins(self):  # what ORT's percentile calibrator raises on MiniLM's graph (docs/benchmarks.md)
        raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")

    monkeypatch.setattr(HistogramCollector, "compute_percentile", too_many_bins)
    options = Calibration(data=DataSource(path=pre.path))
    outcome = calibrate_in_one_pass(
        pre.path,
        data,
        ["entropy", "percentile"],
        options,
        {m: work / f"fails-{m}.json" for m in ("entropy", "percentile")},
    )
    assert outcome["entropy"].tensors > 0
    assert isinstance(outcome["percentile"], CalibrationError) and "Too many bins" in str(outcome["percentile"])


def test_a_pass_whose_every_method_fails_raises_each_methods_error(prepared, monkeypatch):
    # raised, not returned: the pass's Prefect task must show as failed, not Completed
    import pickle

    from onnxruntime.quantization.calibrate import HistogramCollector

    from int8flow.tasks.calibrate import CalibrationError, CalibrationPassError, calibrate, calibrate_in_one_pass

    _info, pre, _evaluation, data, _reference, work = prepared

    def too_many_bins(self):
        raise ValueError("Too many bins for data range. Cannot create 2048 finite-sized bins.")

    monkeypatch.setattr(HistogramCollector, "compute_percentile", too_many_bins)
    monkeypatch.setattr(HistogramCollector, "compute_entropy", too_many_bins)
    options = Calibration(data=DataSource(path=pre.path))
    outs = {m: work / f"all-fail-{m}.json" for m in ("entropy", "percentile")}
    with pytest.raises(CalibrationPassError) as raised:
        calibrate_in_one_pass(pre.path, data, ["entropy", "percentile"], options, outs)
    assert set(raised.value.errors) == {"entropy", "percentile"}
    assert all("Too many bins" in str(error) for error in raised.value.errors.values())
    assert not any(path.exists() for path in outs.values())
    assert pickle.loads(pickle.dumps(raised.value)).errors.keys() == raised.value.errors.keys()
    with pytest.raises(CalibrationError, match="percentile calibration failed") as alone:
        calibrate(pre.path, data, "percentile", options, work / "alone.json")
    assert not isinstance(alone.value, CalibrationPassError)


def test_calibrating_only_the_op_types_a_variant_quantizes_gives_the_same_model(prepared):
    _info, pre, _evaluation, calibration, _reference, work = prepared
    from int8flow.tasks.calibrate import ALL_QUANTIZABLE_OPS

    present = sorted({node.op_type for node in onnx.load(str(pre.path)).graph.node} & set(ALL_QUANTIZABLE_OPS))
    assert len(present) >= 2, present  # otherwise "only one op type" would calibrate everything anyway
    op = present[0]
    options = Calibration(data=DataSource(path=pre.path))
    every = calibrate(pre.path, calibration, "minmax", options, work / "every.json")
    only = calibrate(pre.path, calibration, "minmax", options, work / "only.json", [op])
    assert 0 < only.tensors < every.tensors

    def scales(ranges) -> dict:
        variant = StaticVariant(kind="static", name=f"only-{op}", op_types=[op], calibration_method="minmax")
        made = quantize(pre.path, variant, job(work / ranges.path.stem / "model.onnx", {"minmax": ranges}))
        return {
            t.name: onnx.numpy_helper.to_array(t).tobytes()
            for t in onnx.load(str(made.path)).graph.initializer
            if "scale" in t.name or "zero_point" in t.name
        }

    assert scales(only) == scales(every) and scales(only)


def test_static_without_ranges_for_its_method_fails_clearly(prepared):
    _info, pre, *_, work = prepared
    variant = StaticVariant(kind="static", name="s", calibration_method="entropy")
    with pytest.raises(QuantizationError, match="no entropy calibration ranges"):
        quantize(pre.path, variant, job(work / "nope" / "model.onnx"))


THIS_CPU = HARDWARE_PRESETS[preset_for(detect())]


@pytest.mark.parametrize(
    ("variant", "expected_ops", "max_top1_drop"),
    [
        # With this CPU's preset: without VNNI, full 8-bit per-channel weights saturate ORT's u8s8
        # kernels (0.976 -> 0.957 on an AVX2-only EPYC) and reduce_range brings it back (0.981).
        (
            DynamicVariant(kind="dynamic", name="d", reduce_range=THIS_CPU.reduce_range),
            {"MatMulInteger", "DynamicQuantizeLinear"},
            0.02,
        ),
        (
            DynamicVariant(kind="dynamic", name="dpc", per_channel=True, reduce_range=THIS_CPU.reduce_range),
            {"MatMulInteger", "DynamicQuantizeLinear"},
            0.02,
        ),
        # 4-bit weights cost this small network ~7 points (0.976 -> 0.907): int4 is for big MatMuls
        (WeightOnlyInt4Variant(kind="weight_only_int4", name="w4"), {"MatMulNBits"}, 0.10),
    ],
)
def test_weight_quantizing_kinds_write_integer_ops(prepared, digits_model, variant, expected_ops, max_top1_drop):
    info, pre, evaluation, _, reference, work = prepared
    source = pre.path if variant.kind == "dynamic" else digits_model.model
    result = quantize(source, variant, job(work / variant.label / "model.onnx"))
    graph_ops = {node.op_type for node in onnx.load(str(result.path)).graph.node}
    assert expected_ops <= graph_ops, graph_ops
    assert "MatMul" not in graph_ops  # every weight MatMul was converted
    assert result.size_bytes < info.size_bytes / 2.5
    scores = evaluate_model(result.path, evaluation, reference, METRICS).metrics
    assert scores["top1"] >= digits_model.fp32_top1 - max_top1_drop


def test_fp16_halves_the_weights_and_keeps_float32_io(prepared, digits_model):
    info, _, evaluation, _, reference, work = prepared
    result = quantize(digits_model.model, Fp16Variant(kind="fp16", name="h"), job(work / "fp16" / "model.onnx"))
    assert result.size_bytes < info.size_bytes * 0.6
    assert inspect_model(result.path).inputs[0].dtype == "float32"
    assert evaluate_model(result.path, evaluation, reference, METRICS).metrics["cosine"] > 0.9999


def test_fp16_without_kept_io_types_gets_float16_inputs(prepared, digits_model):
    _info, _, evaluation, _, reference, work = prepared
    variant = Fp16Variant(kind="fp16", name="h16", keep_io_types=False)
    result = quantize(digits_model.model, variant, job(work / "fp16-io" / "model.onnx"))
    assert inspect_model(result.path).inputs[0].dtype == "float16"
    assert evaluate_model(result.path, evaluation, reference, METRICS).metrics["top1"] >= digits_model.fp32_top1 - 0.01
    # float32 data, float16 inputs: each model is fed the same samples in its own input type
    session = time_session({"fp32": digits_model.model, "h16": result.path}, input_feed(evaluation, 4), 1, 1, 6)
    assert session.models["h16"].rounds.size >= 6


def test_one_timing_session_interleaves_every_model_and_gives_intervals(prepared, digits_model):
    _info, pre, evaluation, *_ = prepared
    feed = input_feed(evaluation, 32)
    assert feed["pixels"].shape == (32, 64)
    # given FP32, an identical copy of it, and the pre-processed graph, timed together in one session
    models = {"fp32": digits_model.model, "same": digits_model.model, "pre": pre.path}
    session = time_session(models, feed, threads=1, warmup=2, runs=30)
    # then every model ran the same number of runs, in at least the planned rounds
    shapes = {name: timing.rounds.shape for name, timing in session.models.items()}
    assert len(set(shapes.values())) == 1 and session.rounds >= 10 and shapes["fp32"][1] == 3
    metrics = session.models["same"].as_metrics("b32_t1")
    assert 0 < metrics["b32_t1_p50_ms"] <= metrics["b32_t1_p90_ms"] <= metrics["b32_t1_p99_ms"]
    # and each speed-up is a ratio of medians inside its own 90 % interval; a model against itself is ~1x
    same = session.speedup("same")
    assert same.low <= same.value <= same.high and 0.7 < same.value < 1.4
    assert session.speedup("fp32").value == 1.0
    flipped = session.speedup("fp32", over="same")
    assert abs(flipped.value * same.value - 1.0) < 1e-9
    assert session.load.other_cores >= 0 and "rounds" in session.summary()


def _select_between_equals(models: dict, feed: dict) -> tuple[str | None, object]:
    """Two copies of one model, equally fast by construction, the first less accurate: latency selection
    must call them a tie and take the more accurate one."""
    session = time_session(models, feed, threads=1, warmup=2, runs=30)
    metric, rules = Metric(name="top1"), Selection(max_drop=0.05, min_speedup=0.0)
    candidates = [
        Candidate(name, {"top1": top1}, session.speedup(name), session.models[name].p50_ms, 1)
        for name, top1 in (("copy-a", 0.93), ("copy-b", 0.95))
    ]
    faster = lambda a, b: session.speedup(a, over=b)  # noqa: E731 - the selection's view of one session
    return select(candidates, {"top1": 0.95}, rules.accuracy_rule(metric), rules, faster).selected, session


def test_a_busy_neighbour_widens_the_intervals_but_does_not_flip_the_choice(prepared, digits_model):
    _info, _pre, evaluation, *_ = prepared
    models = {"fp32": digits_model.model, "copy-a": digits_model.model, "copy-b": digits_model.model}
    feed = input_feed(evaluation, 32)
    idle_choice, idle = _select_between_equals(models, feed)
    # a neighbour spinning on every core while the same session is timed again
    spin = "import time\nend = time.time() + 300\nwhile time.time() < end: pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 2)]
    try:
        busy_choice, busy = _select_between_equals(models, feed)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait(timeout=30)
    assert idle_choice == busy_choice == "copy-b", (idle.summary(), busy.summary())
    # the session saw the neighbour and said so
    assert busy.load.other_cores > 0.5 and busy.load.other_cores > idle.load.other_cores, busy.summary()
    assert busy.load.busy and busy.uncertain


def _x(value: float, spread: float = 0.02) -> Speedup:
    return Speedup(value, value - spread, value + spread)


def test_selection_applies_each_constraint_and_says_why():
    metric = Metric(name="top1")
    fp32 = {"top1": 0.95}
    candidates = [
        Candidate("fast-but-wrong", {"top1": 0.80}, speedup=_x(3.0), latency_ms=1.0, size_bytes=100),
        Candidate("slow", {"top1": 0.95}, speedup=_x(0.5), latency_ms=4.0, size_bytes=100),
        Candidate("good", {"top1": 0.945}, speedup=_x(1.5), latency_ms=2.0, size_bytes=300),
        Candidate("good-small", {"top1": 0.944}, speedup=_x(1.4), latency_ms=2.1, size_bytes=200),
        Candidate("crashed", error="QuantizationError: boom"),
    ]
    rules = Selection(max_drop=0.01, min_speedup=1.0, objective="latency", latency_tolerance=0.0)

    def selected(rules: Selection, among: list[Candidate] = candidates, faster=None):
        return select(among, fp32, rules.accuracy_rule(metric), rules, faster)

    result = selected(rules)
    assert result.selected == "good"
    reasons = {v.name: " ".join(v.reasons) for v in result.verdicts}
    assert "top1 drop 0.15 > max_drop 0.01" in reasons["fast-but-wrong"]
    assert "speed-up 0.50x [0.48-0.52] < min_speedup 1x" in reasons["slow"]
    assert reasons["crashed"].startswith("failed: QuantizationError")
    assert selected(rules.model_copy(update={"objective": "size"})).selected == "good-small"
    assert set(pareto_front(candidates, metric)) == {"fast-but-wrong", "good", "slow"}
    nothing = selected(rules, candidates[:2])
    assert nothing.selected is None and "none meets the constraints" in nothing.summary
    relative = selected(rules.model_copy(update={"max_drop": 0.2, "drop": "relative"}))
    assert relative.selected == "fast-but-wrong"
    # rejections are values: counted by rule, not found by searching their text
    assert "1 over max_drop" in nothing.summary and "1 accurate enough but below min_speedup" in nothing.summary


def test_min_speedup_is_judged_on_the_lower_end_of_the_interval():
    metric = Metric(name="top1")
    rules = Selection(max_drop=0.01, min_speedup=1.0)
    maybe = Candidate("maybe", {"top1": 0.95}, speedup=Speedup(1.04, 0.97, 1.10), latency_ms=1.0, size_bytes=1)
    sure = Candidate("sure", {"top1": 0.95}, speedup=Speedup(1.04, 1.01, 1.07), latency_ms=1.0, size_bytes=1)
    verdicts = select([maybe, sure], {"top1": 0.95}, rules.accuracy_rule(metric), rules).verdicts
    assert [v.eligible for v in verdicts] == [False, True]
    assert "1.04x [0.97-1.10] < min_speedup 1x at the interval's lower end" in verdicts[0].reasons[0]


def test_candidates_the_fastest_does_not_clearly_beat_tie_and_accuracy_decides():
    metric = Metric(name="cosine")
    fp32 = {"cosine": 1.0}
    rules = Selection(max_drop=0.01, latency_tolerance=0.0)
    twins = [
        Candidate("quick", {"cosine": 0.991}, _x(1.60), 10.0, 100),
        Candidate("careful", {"cosine": 0.995}, _x(1.55), 10.3, 100),
        Candidate("slower", {"cosine": 0.999}, _x(1.20), 13.3, 100),
    ]

    def pick(faster):
        return select(twins, fp32, rules.accuracy_rule(metric), rules, faster).selected

    # the session cannot tell quick from careful (their interval spans 1) but clearly beats slower:
    # quick and careful tie, and the more accurate of the two wins, whatever the point estimates say
    overlapping = {("quick", "careful"): Speedup(1.03, 0.99, 1.07), ("quick", "slower"): Speedup(1.33, 1.28, 1.38)}
    assert pick(lambda a, b: overlapping.get((a, b))) == "careful"
    # when the session separates them, the faster one wins
    separated = overlapping | {("quick", "careful"): Speedup(1.03, 1.02, 1.05)}
    assert pick(lambda a, b: separated.get((a, b))) == "quick"
    # and a tolerance makes a small but certain difference a tie again
    tolerant = rules.model_copy(update={"latency_tolerance": 0.03})
    assert (
        select(twins, fp32, tolerant.accuracy_rule(metric), tolerant, lambda a, b: separated.get((a, b))).selected
        == "careful"
    )
    # the same inputs always give the same choice; among full ties, spec order decides
    same = [Candidate(name, {"cosine": 0.995}, _x(1.5), 10.0, 100) for name in ("first", "second")]
    assert (
        select(same, fp32, rules.accuracy_rule(metric), rules, lambda a, b: Speedup(1.0, 0.95, 1.05)).selected
        == "first"
    )


def test_alias_moves_only_when_the_new_version_beats_the_holder():
    metric = Metric(name="mae")  # lower is better

    def version(number: str, mae: float, size: int, data: str = "eval-a") -> Contender:
        return Contender(number, {"mae": mae}, size, data)

    new, holder = version("2", 0.1, 9), version("1", 0.2, 10)
    assert decide_alias(new, None, "latency", metric).move, "nobody holds it yet"
    assert decide_alias(new, holder, "accuracy", metric).move
    assert not decide_alias(version("2", 0.3, 10), holder, "accuracy", metric).move
    assert decide_alias(version("2", 0.3, 9), holder, "size", metric).move
    assert not decide_alias(new, holder, "latency", metric, _x(0.97)).move
    assert decide_alias(new, holder, "latency", metric, _x(1.2)).move
    assert not decide_alias(new, holder, "latency", metric, Speedup(1.06, 0.98, 1.12)).move, "within the noise"
    assert not decide_alias(new, holder, "latency", metric, _x(1.04), latency_tolerance=0.03).move
    assert not decide_alias(new, holder, "latency", metric, None).move, "an untimed holder keeps the alias"
    assert not decide_alias(new, version("2", 0.2, 10), "accuracy", metric).move, "the same version"
    other_data = decide_alias(new, version("1", 0.9, 99, data="eval-b"), "accuracy", metric)
    assert not other_data.move and "different data" in other_data.reason


def test_accuracy_rule_rejects_nan_and_reads_relative_drops():
    rule = AccuracyRule(Metric(name="top1"), max_drop=0.01, relative=False)
    assert rule.check({"top1": 0.945}, {"top1": 0.95}).passed
    assert not rule.check({"top1": float("nan")}, {"top1": 0.95}).passed, "NaN never meets a constraint"
    assert not AccuracyRule(Metric(name="top1"), 0.1, relative=True).check({"top1": 0.8}, {"top1": 0.95}).passed


def test_external_data_model_goes_through_every_stage(tmp_path, digits_model):
    # given a model whose weights live in a side .data file, as exporters write for big models
    model = onnx.load(str(digits_model.model))
    external = tmp_path / "src" / "model.onnx"
    external.parent.mkdir()
    onnx.save(
        model,
        str(external),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.data",
        size_threshold=0,
    )
    info = inspect_model(external)
    assert info.size_bytes > external.stat().st_size * 2  # the hash and size cover the .data file
    # when it is pre-processed, calibrated, quantized and evaluated
    pre = preprocess(external, Preprocess(), tmp_path / "pre" / "model.onnx")
    assert list((tmp_path / "pre").glob("*.data")), "pre-processing keeps external data"
    evaluation = load_dataset(DataSource(path=digits_model.evaluation, batch_size=64), info.input_dtypes)
    reference = run_model(external, evaluation)
    calibration = load_dataset(DataSource(path=digits_model.calibration), info.input_dtypes)
    ranges = calibrate(
        pre.path, calibration, "minmax", Calibration(data=DataSource(path=pre.path)), tmp_path / "r.json"
    )
    for variant in (
        DynamicVariant(kind="dynamic", name="d", per_channel=True, reduce_range=THIS_CPU.reduce_range),
        StaticVariant(kind="static", name="s", calibration_method="minmax", reduce_range=THIS_CPU.reduce_range),
    ):
        result = quantize(pre.path, variant, job(tmp_path / variant.label / "model.onnx", {"minmax": ranges}))
        # then every variant loads with its weights and stays accurate
        assert (
            evaluate_model(result.path, evaluation, reference, METRICS).metrics["top1"] > digits_model.fp32_top1 - 0.02
        )


def test_preprocess_falls_back_when_symbolic_shape_inference_fails(tmp_path):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    # given a graph with an ORT contrib op (CDist) that symbolic shape inference does not know
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("CDist", ["x", "B"], ["d"], domain="com.microsoft", metric="euclidean"),
        helper.make_node("MatMul", ["d", "W"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cdist",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(rng.normal(size=(5, 8)).astype(np.float32), "B"),
            numpy_helper.from_array(rng.normal(size=(5, 3)).astype(np.float32), "W"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "cdist.onnx"))
    # when pre-processed, then it is retried without symbolic shape inference, and says so
    result = preprocess(tmp_path / "cdist.onnx", Preprocess(), tmp_path / "pre" / "model.onnx")
    assert not result.symbolic_shape_inference
    assert "symbolic shape inference failed" in result.notes[0] and "pre-processed without it" in result.notes[0]
    feed = {"x": rng.normal(size=(4, 8)).astype(np.float32)}
    run = lambda path: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]  # noqa: E731
    np.testing.assert_allclose(run(result.path), run(tmp_path / "cdist.onnx"), rtol=1e-5)
    assert not list(Path.cwd().glob("sym_shape_infer_temp.onnx")), "no scratch file left in the working directory"


def test_calibration_that_does_not_cover_the_evaluation_data_is_reported_per_tensor(prepared, tmp_path):
    _info, pre, evaluation, calibration, _reference, _work = prepared
    options = Calibration(data=DataSource(path=pre.path))
    # minmax ranges from the evaluation data itself clip nothing of it
    own = calibrate(pre.path, evaluation, "minmax", options, tmp_path / "own.json")
    covered = clipping(pre.path, own.path, "minmax", evaluation)
    assert covered.samples == 64 and covered.worst_share == 0.0 and covered.warning() is None
    # ranges from dim calibration images (a third of the ink) clip a large share of the real ones
    dim = Dataset(tuple(replace(b, inputs={"pixels": b.inputs["pixels"] / 3}) for b in calibration.batches), "dim")
    narrow = calibrate(pre.path, dim, "minmax", options, tmp_path / "dim.json")
    report = clipping(pre.path, narrow.path, "minmax", evaluation)
    assert report.worst_share > 0.05 and report.tensors[0].overshoot > 0.5
    assert report.warning() is not None and "does not cover the evaluation data" in report.warning()
    metrics = report.as_metrics()
    assert metrics["calibration.clipped_share_max"] == report.worst_share
    assert metrics["calibration.tensors_clipping_over_1pct"] >= 1
    assert report.as_csv().splitlines()[1].startswith(report.tensors[0].tensor + ",")
