"""Does the calibration represent production? The evaluation data's activations against the calibrated ranges.

Static quantization fixes each activation's range from the calibration data; a value outside it is
clipped to the edge at run time. When the calibration data is not like the data the model will see
(another domain, too few samples, only easy cases), the evaluation data shows it: this stage runs the
FP32 graph the calibration ran on over (at most `MAX_SAMPLES` of) the evaluation samples, reads every
calibrated tensor, and counts, per tensor, the share of its values outside the calibrated range and how
far past the edge the largest one goes. Counts are accumulated sample by sample, so memory stays at
one sample's activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import load_tensors_data

from int8flow.tasks.data import Dataset
from int8flow.tasks.evaluate import feed_for
from int8flow.tasks.model import tracing_session

MAX_SAMPLES = 64
WARN_SHARE = 0.01  # a tensor whose evaluation values fall outside its range more often than this is reported


@dataclass(frozen=True)
class TensorClipping:
    tensor: str
    share: float  # of the tensor's evaluation values outside the calibrated range
    low: float  # calibrated range
    high: float
    seen_low: float  # the evaluation data's range
    seen_high: float

    @property
    def overshoot(self) -> float:
        """How far past the calibrated range the evaluation data went, in multiples of the range's width."""
        width = max(self.high - self.low, 1e-12)
        return max(self.low - self.seen_low, self.seen_high - self.high, 0.0) / width


@dataclass(frozen=True)
class ClippingReport:
    method: str
    samples: int
    tensors: tuple[TensorClipping, ...]  # worst first

    @property
    def worst_share(self) -> float:
        return self.tensors[0].share if self.tensors else 0.0

    @property
    def mean_share(self) -> float:
        return float(np.mean([tensor.share for tensor in self.tensors])) if self.tensors else 0.0

    @property
    def over_limit(self) -> list[TensorClipping]:
        return [tensor for tensor in self.tensors if tensor.share > WARN_SHARE]

    def warning(self) -> str | None:
        over = self.over_limit
        if not over:
            return None
        worst = ", ".join(f"{t.tensor} {t.share:.1%}" for t in over[:3])
        return (
            f"the {self.method} calibration does not cover the evaluation data: {len(over)} of {len(self.tensors)} "
            f"tensors clip more than {WARN_SHARE:.0%} of their evaluation values ({worst}); calibrate on data like "
            "production's, or more of it"
        )

    def as_metrics(self) -> dict[str, float]:
        return {
            "calibration.clipped_share_max": self.worst_share,
            "calibration.clipped_share_mean": self.mean_share,
            "calibration.tensors_clipping_over_1pct": float(len(self.over_limit)),
        }

    def as_csv(self) -> str:
        lines = ["tensor,clipped_share,calibrated_low,calibrated_high,evaluation_low,evaluation_high,overshoot"]
        lines += [
            f"{t.tensor},{t.share:.6f},{t.low:.6g},{t.high:.6g},{t.seen_low:.6g},{t.seen_high:.6g},{t.overshoot:.4f}"
            for t in self.tensors
        ]
        return "\n".join(lines) + "\n"


def _ranges(cache: Path) -> dict[str, tuple[float, float]]:
    data = load_tensors_data(cache)
    ranges = {}
    for name, value in data.items():
        low, high = np.asarray(value.range_value[0]), np.asarray(value.range_value[1])
        if low.size == 1 and high.size == 1:  # per-tensor activation ranges
            ranges[name] = (float(low.reshape(-1)[0]), float(high.reshape(-1)[0]))
    return ranges


def clipping(model: Path, cache: Path, method: str, dataset: Dataset, max_samples: int = MAX_SAMPLES) -> ClippingReport:
    """Per calibrated tensor of `model`, the share of the evaluation data's values outside the range in `cache`."""
    ranges = _ranges(cache)
    runner = tracing_session(model, list(ranges))
    names = [output.name for output in runner.get_outputs()]
    outside = dict.fromkeys(ranges, 0)
    total = dict.fromkeys(ranges, 0)
    seen = dict.fromkeys(ranges, (np.inf, -np.inf))
    samples = 0
    for batch in dataset.batches:
        for index in range(batch.size):
            if samples >= max_samples:
                break
            values = runner.run(None, feed_for(runner, batch.take(slice(index, index + 1))))
            samples += 1
            for name, value in zip(names, values, strict=True):
                if name not in ranges or value.dtype.kind != "f" or value.size == 0:
                    continue
                low, high = ranges[name]
                outside[name] += int(np.count_nonzero((value < low) | (value > high)))
                total[name] += value.size
                seen[name] = (min(seen[name][0], float(value.min())), max(seen[name][1], float(value.max())))
    tensors = [
        TensorClipping(name, outside[name] / total[name], *ranges[name], *seen[name]) for name in ranges if total[name]
    ]
    tensors.sort(key=lambda tensor: (-tensor.share, -tensor.overshoot))
    return ClippingReport(method, samples, tuple(tensors))
