"""What latency is measured on (`profiling`: batch sizes, threads, runs) and the input feed it uses.

The timing itself, FP32 and every candidate in one interleaved session, is `tasks.timing`.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from int8flow.tasks.data import Dataset
from int8flow.tasks.options import StrictModel


class Profiling(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=8, description="Batch sizes to time."
    )
    threads: list[Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=8, description="ORT intra-op thread counts to time."
    )
    warmup: int = Field(default=5, ge=0, le=1000, description="Untimed runs before timing, per model.")
    runs: int = Field(
        default=30,
        ge=3,
        le=10_000,
        description="Timed runs per model and configuration, at least: FP32 and every candidate are timed in one "
        "session, in rounds of 3 runs each in rotating order; rounds are added while the machine is busy or a "
        "speed-up's interval is wide, up to `max_seconds`.",
    )
    max_seconds: float = Field(
        default=120.0, gt=0, le=3600, description="Time budget of one timing session (one batch size and thread count)."
    )
    all_variants: bool = Field(
        default=False,
        description="Also time variants that miss `selection.max_drop` (they stay rejected), for side-by-side "
        "comparisons; by default they are not worth the time.",
    )


def input_feed(dataset: Dataset, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of `batch_size` real evaluation samples (repeated if the data has fewer)."""
    first = dataset.batches[0]
    indices = np.arange(batch_size) % first.size
    return {name: np.asarray(array, order="C") for name, array in first.take(indices).items()}  # 0-d stays 0-d
