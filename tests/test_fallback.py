"""The accuracy fallback on a small real graph: one layer with outlier weights that int8 cannot hold."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from int8flow.tasks import fallback
from int8flow.tasks.calibrate import Calibration, CalibrationKey, calibrate
from int8flow.tasks.data import Batch, Dataset, DataSource
from int8flow.tasks.evaluate import Metric, evaluate_model, run_model
from int8flow.tasks.fallback import AccuracyFallback, accuracy_fallback, measure_gains, rank_nodes, search_order
from int8flow.tasks.kinds import DynamicVariant, MakeJob, StaticVariant
from int8flow.tasks.model import Graph
from int8flow.tasks.quantize import quantize
from int8flow.tasks.select import AccuracyRule

COSINE = Metric(name="cosine")


def _mlp_with_an_outlier_layer(path: Path) -> Path:
    """Three MatMul layers; the middle one has a few weights 1000x larger than the rest, so one
    per-tensor int8 scale rounds all its ordinary weights to zero."""
    rng = np.random.default_rng(11)
    first = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    middle = rng.normal(0, 0.02, (32, 32)).astype(np.float32)
    first[:, 0] = 0.0  # the first layer's column 0 is always zero ...
    middle[0, :3] = 40.0  # ... so these outliers never show in the activations, only in the weight scale
    last = rng.normal(0, 0.3, (32, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "first"], ["h1"], name="first_layer"),
            helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
            helper.make_node("MatMul", ["r1", "middle"], ["h2"], name="middle_layer"),
            helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
            helper.make_node("MatMul", ["r2", "last"], ["y"], name="last_layer"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            numpy_helper.from_array(first, "first"),
            numpy_helper.from_array(middle, "middle"),
            numpy_helper.from_array(last, "last"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("fallback")
    model = _mlp_with_an_outlier_layer(work / "fp32.onnx")
    rng = np.random.default_rng(3)
    data = Dataset(tuple(Batch({"x": rng.normal(size=(16, 16)).astype(np.float32)}) for _ in range(4)), "test")
    reference = run_model(model, data)
    variant = DynamicVariant(kind="dynamic", name="dynamic", reduce_range=False, weight_type="QInt8")
    quantized = quantize(model, variant, MakeJob(work / "dynamic.onnx", {}))
    return work, model, data, reference, variant, quantized


def _run(setup, max_drop: float, budget: AccuracyFallback, bisect: bool = True):
    work, model, data, reference, variant, quantized = setup
    return accuracy_fallback(
        variant,
        model,
        quantized.path,
        data,
        quantize_step=lambda step, out: quantize(model, step, MakeJob(out, {})),
        evaluate_step=lambda path: evaluate_model(path, data, reference, [COSINE]),
        check=lambda scores: AccuracyRule(COSINE, max_drop, relative=False).check(scores.metrics, {"cosine": 1.0}),
        budget=budget,
        bisect=bisect,
        work=work / f"steps-{max_drop}-{budget.max_steps}",
    )


def test_the_outlier_layer_breaks_plain_dynamic_quantization(setup):
    _work, _model, data, reference, _variant, quantized = setup
    cosine = evaluate_model(quantized.path, data, reference, [COSINE]).metrics["cosine"]
    assert cosine < 0.99


def test_nodes_are_ranked_by_their_own_quantization_error(setup):
    _work, model, data, _reference, variant, quantized = setup
    feeds = [{"x": batch.inputs["x"][:1]} for batch in data.batches]
    ranking = rank_nodes(model, quantized.path, variant, feeds)
    assert [error.node for error in ranking][:1] == ["middle_layer"]
    assert {error.node for error in ranking} == {"first_layer", "middle_layer", "last_layer"}
    assert ranking[0].added_noise > ranking[1].added_noise


def test_tracing_in_bounded_passes_gives_the_same_noise_as_one_pass(setup, monkeypatch):
    # the passes bound memory (a pass holds TENSORS_PER_PASS tensors of a feed); they must not change a number
    _work, model, data, _reference, _variant, quantized = setup
    feeds = [{"x": batch.inputs["x"][:1]} for batch in data.batches]
    whole = fallback.tensor_sqnr(model, quantized.path, feeds)
    monkeypatch.setattr(fallback, "TENSORS_PER_PASS", 1)
    one_by_one = fallback.tensor_sqnr(model, quantized.path, feeds)
    assert len(whole) >= 4 and one_by_one == whole
    assert min(whole.values()) < fallback.CLEAN_SQNR_DB  # the outlier layer's noise is in it


def test_keeping_the_worst_node_in_float_meets_the_constraint(setup):
    result = _run(setup, max_drop=0.001, budget=AccuracyFallback(max_steps=6))
    first = result.steps[0]
    assert first.kept_in_float == ("middle_layer",)
    assert first.passed and first.drop <= 0.001 and first.kept
    assert first.variant.nodes_to_exclude == ["middle_layer"] and first.name == "dynamic-float1"
    assert result.best is first
    # one float node already passes: there is nothing fewer to trim towards
    assert len(result.steps) == 1 and result.stopped.startswith("constraint met")


def test_the_step_budget_stops_an_impossible_constraint_and_keeps_the_best_so_far(setup):
    result = _run(setup, max_drop=-1.0, budget=AccuracyFallback(max_steps=1))
    assert len(result.steps) == 1 and not result.steps[0].passed
    assert result.stopped == "step budget (1) used"
    assert result.best is result.steps[0]


def test_the_search_only_keeps_steps_that_make_the_variant_more_accurate(setup):
    # a constraint nothing meets: the search tries every node once, never keeping a step that got worse
    result = _run(setup, max_drop=-1.0, budget=AccuracyFallback(max_steps=6))
    kept_drops = [step.drop for step in result.steps if step.kept]
    assert kept_drops and kept_drops == sorted(kept_drops, reverse=True)
    assert all(step.kept == (step.drop < previous) for step, previous in _with_previous_kept(result, setup))
    assert result.stopped == "every candidate node tried"
    # the float set only grows along kept steps: a discarded step's nodes are not tried again
    tried = [set(step.kept_in_float) for step in result.steps]
    assert all(len(later) > len(earlier) for earlier, later in itertools.pairwise(tried))


def _with_previous_kept(result, setup):
    _work, _model, data, reference, _variant, quantized = setup
    drop = 1.0 - evaluate_model(quantized.path, data, reference, [COSINE]).metrics["cosine"]
    for step in result.steps:
        yield step, drop
        if step.kept:
            drop = step.drop


def test_a_qdq_node_put_back_in_float_in_place_gains_what_re_quantizing_without_it_gains(setup):
    # static QDQ of the same model: the middle layer's outliers ruin one per-tensor weight scale
    work, model, data, reference, _variant, _quantized = setup
    ranges = calibrate(model, data, "minmax", Calibration(data=DataSource(path=model)), work / "minmax.json")
    job = MakeJob(work / "static.onnx", {CalibrationKey("minmax", Graph.PREPROCESSED): ranges})
    static = StaticVariant(
        kind="static", name="static", reduce_range=False, activation_type="QUInt8", weight_type="QInt8"
    )
    quantized = quantize(model, static, job)
    feeds = [{"x": batch.inputs["x"][:1]} for batch in data.batches]
    gains = measure_gains(model, quantized.path, ["middle_layer", "last_layer"], feeds, seconds=60)
    assert gains["middle_layer"] > 10 > gains["last_layer"]
    # and the order the search follows puts the measured gain first
    ranking = rank_nodes(model, quantized.path, static, feeds)
    assert search_order(ranking, gains)[0] == "middle_layer"
    # the in-place float copy agrees with a real re-quantization that keeps the node in float
    excluded = quantize(
        model,
        static.with_excluded(("middle_layer",), "static-float1"),
        MakeJob(work / "static-float1.onnx", job.ranges),
    )
    in_place = evaluate_model(quantized.path, data, reference, [COSINE]).metrics["cosine"]
    requantized = evaluate_model(excluded.path, data, reference, [COSINE]).metrics["cosine"]
    assert requantized > in_place


def test_a_node_kept_in_float_reads_float_tensors_so_ort_cannot_quantize_it_again(setup):
    work, model, data, reference, _variant, _quantized = setup
    ranges = calibrate(model, data, "minmax", Calibration(data=DataSource(path=model)), work / "minmax-2.json")
    job = MakeJob(work / "kept.onnx", {CalibrationKey("minmax", Graph.PREPROCESSED): ranges})
    static = StaticVariant(
        kind="static",
        name="s",
        reduce_range=False,
        activation_type="QUInt8",
        weight_type="QInt8",
        nodes_to_exclude=["middle_layer"],
    )
    made = quantize(model, static, job)
    graph = onnx.load(str(made.path)).graph
    producers = {name: node.op_type for node in graph.node for name in node.output}
    middle = next(node for node in graph.node if node.name == "middle_layer")
    # its activation input comes from the float Relu, not from a DequantizeLinear: ORT's
    # WeightBiasQuantization transformer only re-quantizes float nodes fed by a DequantizeLinear
    assert producers[middle.input[0]] == "Relu" and middle.input[1] == "middle"
    assert any("WeightBiasQuantization" in note for note in made.notes)
    cosine = evaluate_model(made.path, data, reference, [COSINE]).metrics["cosine"]
    assert cosine > 0.999
