"""Is the evaluation able to tell a good variant from a bad one? Checks on FP32's own results.

An accuracy rule is only as good as the data and metric behind it: NaN everywhere, labels of the wrong
kind, or an FP32 model at chance level let any variant "pass". What cannot be right is an error
(`InputError`: the run stops, nothing is registered); what looks degenerate is a warning the run
records on its parent run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from int8flow.tasks.data import Dataset
from int8flow.tasks.errors import InputError
from int8flow.tasks.evaluate import Metric, ModelOutputs, Scores


def check_fp32(scores: Scores, reference: ModelOutputs, dataset: Dataset, metrics: Sequence[Metric]) -> list[str]:
    """Raise InputError for what cannot be right; return warnings for what looks degenerate."""
    bad = {name: value for name, value in scores.metrics.items() if not math.isfinite(value)}
    if bad:
        listed = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise InputError(f"FP32 scores {listed} on the evaluation data: no variant can be judged against that")
    warnings = []
    if any(metric.name == "top1" for metric in metrics):
        warnings += _top1_warnings(scores.metrics["top1"], reference, dataset)
    return warnings


def _top1_warnings(top1: float, reference: ModelOutputs, dataset: Dataset) -> list[str]:
    labels = dataset.labels()
    assert labels is not None  # top1 raised before this otherwise
    if labels.dtype.kind == "f" and not np.array_equal(labels, np.round(labels)):
        raise InputError("top1 needs integer class indices as labels; the labels hold fractions")
    labels = labels.astype(np.int64).reshape(-1)
    classes = min(row.size for batch in reference.batches for row in batch)
    warnings = []
    outside = int(np.sum((labels < 0) | (labels >= classes)))
    if outside:
        warnings.append(
            f"{outside} of {labels.size} labels are outside the output's {classes} classes (0..{classes - 1})"
        )
    counts = np.bincount(labels[(labels >= 0)], minlength=1)
    if np.count_nonzero(counts) == 1:
        warnings.append(
            f"every label is class {int(np.argmax(counts))}: top1 cannot tell a good model from a constant one"
        )
    majority = counts.max() / labels.size if labels.size else 1.0
    chance = max(1.0 / classes, majority)
    if top1 <= chance * 1.5:
        warnings.append(f"FP32 top1 {top1:.3g} is near chance ({chance:.3g}): the labels may not match the model")
    return warnings


def constant_metric_warning(metric: str, fp32: float, variants: Mapping[str, Scores]) -> str | None:
    """A metric that does not move while the outputs do cannot see what quantization changes."""
    values = [scores.metrics.get(metric) for scores in variants.values()]
    if len(values) < 2 or any(value != fp32 for value in values):
        return None
    moved = [
        name for name, scores in variants.items() if any(fidelity.sqnr_db < 20 for fidelity in scores.fidelity.values())
    ]
    if not moved:
        return None
    return (
        f"{metric} is {fp32:.4g} for FP32 and all {len(values)} variants, although the outputs of {len(moved)} of them "
        f"differ clearly from FP32's (SQNR under 20 dB, e.g. {moved[0]}): the metric may not see what quantization changes"
    )
