"""Latency of a candidate against the FP32 baseline, timed interleaved in one process.

Both models get the same session options, thread count and input feed; each timed iteration runs
both, alternating which goes first, so drift of a noisy machine hits both alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field

from int8flow.tasks.data import Dataset
from int8flow.tasks.evaluate import feed_for, session
from int8flow.tasks.options import StrictModel


class Profiling(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=8, description="Batch sizes to time."
    )
    threads: list[Annotated[int, Field(ge=1, le=256)]] = Field(
        default_factory=lambda: [1], min_length=1, max_length=8, description="ORT intra-op thread counts to time."
    )
    warmup: int = Field(default=5, ge=0, le=1000, description="Untimed runs before timing, per model.")
    runs: int = Field(default=30, ge=3, le=10_000, description="Timed runs per model and configuration.")
    all_variants: bool = Field(
        default=False,
        description="Also time variants that miss `selection.max_drop` (they stay rejected), for side-by-side "
        "comparisons; by default they are not worth the time.",
    )


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples per second at this batch size
    runs: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}_p50_ms": self.p50_ms,
            f"{prefix}_p90_ms": self.p90_ms,
            f"{prefix}_p99_ms": self.p99_ms,
            f"{prefix}_throughput": self.throughput,
        }


@dataclass(frozen=True)
class PairProfile:
    batch_size: int
    threads: int
    baseline: LatencyStats
    candidate: LatencyStats

    @property
    def speedup(self) -> float:
        return self.baseline.p50_ms / self.candidate.p50_ms

    @property
    def key(self) -> str:
        return f"b{self.batch_size}_t{self.threads}"


def input_feed(dataset: Dataset, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of `batch_size` real evaluation samples (repeated if the data has fewer)."""
    first = dataset.batches[0]
    indices = np.arange(batch_size) % first.size
    return {name: np.ascontiguousarray(array) for name, array in first.take(indices).items()}


def stats(samples_ns: list[int], batch_size: int) -> LatencyStats:
    milliseconds = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return LatencyStats(
        p50_ms=float(p50),
        p90_ms=float(p90),
        p99_ms=float(p99),
        mean_ms=float(milliseconds.mean()),
        throughput=float(batch_size * 1000.0 / milliseconds.mean()),
        runs=len(samples_ns),
    )


def profile_interleaved(
    models: dict[str, Path], feed: dict[str, np.ndarray], threads: int, warmup: int, runs: int
) -> dict[str, LatencyStats]:
    """Time several models round-robin on the same `feed` with the same session options.

    Each iteration runs every model once, rotating which goes first, so machine drift and
    cache effects spread evenly over all of them.
    """
    names = list(models)
    sessions = {name: session(models[name], threads) for name in names}
    feeds = {name: feed_for(sessions[name], feed) for name in names}
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    timings: dict[str, list[int]] = {name: [] for name in names}
    for iteration in range(runs):
        shift = iteration % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter_ns()
            sessions[name].run(None, feeds[name])
            timings[name].append(time.perf_counter_ns() - started)
    batch_size = len(next(iter(feed.values())))
    return {name: stats(timings[name], batch_size) for name in names}


def profile_pair(
    baseline: Path, candidate: Path, feed: dict[str, np.ndarray], threads: int, warmup: int, runs: int
) -> PairProfile:
    """Time `baseline` and `candidate` alternately on the same `feed` with the same options."""
    measured = profile_interleaved({"baseline": baseline, "candidate": candidate}, feed, threads, warmup, runs)
    return PairProfile(
        batch_size=len(next(iter(feed.values()))),
        threads=threads,
        baseline=measured["baseline"],
        candidate=measured["candidate"],
    )


def profile_single(model: Path, feed: dict[str, np.ndarray], threads: int, warmup: int, runs: int) -> LatencyStats:
    runner = session(model, threads)
    feed = feed_for(runner, feed)
    for _ in range(warmup):
        runner.run(None, feed)
    timings = []
    for _ in range(runs):
        started = time.perf_counter_ns()
        runner.run(None, feed)
        timings.append(time.perf_counter_ns() - started)
    return stats(timings, len(next(iter(feed.values()))))
