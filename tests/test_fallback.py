"""The accuracy fallback on a small real graph: one layer with outlier weights that int8 cannot hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from int8flow.tasks.data import Batch, Dataset
from int8flow.tasks.evaluate import Metric, evaluate_model, run_model
from int8flow.tasks.fallback import AccuracyFallback, accuracy_fallback, next_count, rank_nodes
from int8flow.tasks.kinds import DynamicVariant, MakeJob
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


def test_keeping_the_worst_node_in_float_meets_the_constraint(setup):
    result = _run(setup, max_drop=0.001, budget=AccuracyFallback(max_steps=6))
    first = result.steps[0]
    assert first.kept_in_float == ("middle_layer",)
    assert first.passed and first.drop <= 0.001
    assert first.variant.nodes_to_exclude == ["middle_layer"] and first.name == "dynamic-float1"
    assert result.best is first
    # one float node already passes: there is nothing fewer to bisect towards
    assert len(result.steps) == 1 and result.stopped.startswith("constraint met")


def test_the_step_budget_stops_an_impossible_constraint_and_keeps_the_best_so_far(setup):
    result = _run(setup, max_drop=-1.0, budget=AccuracyFallback(max_steps=1))
    assert len(result.steps) == 1 and not result.steps[0].passed
    assert result.stopped == "step budget (1) used"
    assert result.best is result.steps[0]


def test_the_schedule_doubles_until_a_pass_then_bisects_towards_fewer_float_nodes():
    assert next_count({0: False}, 20, bisect=True) == 1
    assert next_count({0: False, 1: False}, 20, bisect=True) == 2
    assert next_count({0: False, 1: False, 2: False, 4: False}, 20, bisect=True) == 8
    assert next_count({0: False, 1: False, 2: False, 4: False, 8: False}, 12, bisect=True) == 12
    # passed at 8, failed at 4: try 6, then 5 or 7
    assert next_count({0: False, 4: False, 8: True}, 20, bisect=True) == 6
    assert next_count({0: False, 4: False, 6: True, 8: True}, 20, bisect=True) == 5
    assert next_count({0: False, 4: False, 5: True, 6: True}, 20, bisect=True) is None
    # an objective that does not reward fewer float nodes stops at the first pass
    assert next_count({0: False, 4: False, 8: True}, 20, bisect=False) is None
    # every candidate tried without a pass
    assert next_count({0: False, 1: False, 2: False, 3: False}, 3, bisect=True) is None
