"""Pick the best variant that meets the constraints, and decide whether it beats the alias holder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flows.spec import Metric, Selection


@dataclass(frozen=True)
class Candidate:
    """What selection knows of one variant; `error` set means the variant failed."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    speedup: float | None = None
    latency_ms: float | None = None
    size_bytes: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    name: str
    eligible: bool
    reasons: tuple[str, ...]  # why not eligible; empty when eligible
    accuracy_drop: float | None = None


@dataclass(frozen=True)
class SelectionResult:
    selected: str | None
    verdicts: tuple[Verdict, ...]
    pareto: tuple[str, ...]  # accuracy-vs-latency front among the variants that ran
    summary: str


def accuracy_drop(value: float, fp32: float, metric: Metric, kind: str) -> float:
    """How much worse than FP32 (positive = worse), absolute or as a fraction of FP32's value."""
    drop = (fp32 - value) if metric.higher_better else (value - fp32)
    if kind == "relative":
        return drop / abs(fp32) if fp32 else (0.0 if drop <= 0 else float("inf"))
    return drop


def judge(candidate: Candidate, fp32_metrics: dict[str, float], metric: Metric, rules: Selection) -> Verdict:
    if candidate.error is not None:
        return Verdict(candidate.name, False, (f"failed: {candidate.error.splitlines()[0]}",))
    reasons = []
    drop = accuracy_drop(candidate.metrics[metric.name], fp32_metrics[metric.name], metric, rules.drop)
    if rules.max_drop is not None and drop > rules.max_drop:
        reasons.append(f"{metric.name} drop {drop:.4g} > max_drop {rules.max_drop:g} ({rules.drop})")
    if candidate.speedup is None:
        if not reasons:  # a variant that missed the accuracy constraint is not timed at all
            reasons.append("not profiled")
    elif candidate.speedup < rules.min_speedup:
        reasons.append(f"speed-up {candidate.speedup:.2f}x < min_speedup {rules.min_speedup:g}x")
    if rules.max_size_mb is not None and (candidate.size_bytes or 0) / 1e6 > rules.max_size_mb:
        reasons.append(f"size {(candidate.size_bytes or 0) / 1e6:.1f} MB > max_size_mb {rules.max_size_mb:g}")
    return Verdict(candidate.name, not reasons, tuple(reasons), accuracy_drop=drop)


def objective_key(candidate: Candidate, metric: Metric, objective: str, fastest_ms: float = 0.0, tolerance: float = 0.0) -> tuple:
    """Smaller is better. For latency, anything within `tolerance` of the fastest is a tie (timing
    noise would otherwise pick a different twin on every run), broken by accuracy, then size."""
    accuracy = candidate.metrics[metric.name] * (-1 if metric.higher_better else 1)
    if objective == "latency":
        latency = candidate.latency_ms or float("inf")
        tied = latency <= fastest_ms * (1 + tolerance)
        return (0.0 if tied else latency, accuracy, candidate.size_bytes or 0, latency)
    if objective == "size":
        return (candidate.size_bytes or 0, accuracy, candidate.latency_ms or float("inf"))
    return (accuracy, candidate.latency_ms or float("inf"), candidate.size_bytes or 0)


def pareto_front(candidates: Sequence[Candidate], metric: Metric) -> tuple[str, ...]:
    """Variants no other variant beats on both accuracy and latency."""
    ran = [c for c in candidates if c.error is None and c.latency_ms is not None]

    def better_or_equal(a: Candidate, b: Candidate) -> bool:
        accuracy_ok = (
            a.metrics[metric.name] >= b.metrics[metric.name]
            if metric.higher_better
            else a.metrics[metric.name] <= b.metrics[metric.name]
        )
        return accuracy_ok and a.latency_ms <= b.latency_ms  # type: ignore[operator]

    return tuple(
        c.name
        for c in ran
        if not any(other is not c and better_or_equal(other, c) and not better_or_equal(c, other) for other in ran)
    )


def select(
    candidates: Sequence[Candidate], fp32_metrics: dict[str, float], metric: Metric, rules: Selection
) -> SelectionResult:
    verdicts = tuple(judge(candidate, fp32_metrics, metric, rules) for candidate in candidates)
    eligible = [c for c, verdict in zip(candidates, verdicts) if verdict.eligible]
    pareto = pareto_front(candidates, metric)
    if eligible:
        fastest = min(c.latency_ms or float("inf") for c in eligible)
        best = min(eligible, key=lambda c: objective_key(c, metric, rules.objective, fastest, rules.latency_tolerance))
        summary = f"selected {best.name} (best {rules.objective} of {len(eligible)} variant(s) meeting the constraints)"
        return SelectionResult(best.name, verdicts, pareto, summary)
    if all(c.error is not None for c in candidates):
        summary = "no variant selected: every variant failed"
    else:
        summary = f"no variant selected: none meets the constraints ({_why_none(candidates, verdicts, rules)})"
    return SelectionResult(None, verdicts, pareto, summary)


def _why_none(candidates: Sequence[Candidate], verdicts: Sequence[Verdict], rules: Selection) -> str:
    """Which rule rejected how many variants, and the fastest accurate-enough one for scale."""
    failed = sum(c.error is not None for c in candidates)
    too_inaccurate = sum(any("max_drop" in reason for reason in v.reasons) for v in verdicts)
    accurate_but_slow = [
        c for c, v in zip(candidates, verdicts)
        if c.error is None and not any("max_drop" in r for r in v.reasons) and c.speedup is not None and c.speedup < rules.min_speedup
    ]
    too_large = sum(any("max_size_mb" in reason for reason in v.reasons) for v in verdicts)
    parts = []
    if too_inaccurate:
        parts.append(f"{too_inaccurate} over max_drop")
    if accurate_but_slow:
        fastest = max(accurate_but_slow, key=lambda c: c.speedup or 0.0)
        parts.append(
            f"{len(accurate_but_slow)} accurate enough but below min_speedup {rules.min_speedup:g}x "
            f"(fastest: {fastest.name} at {fastest.speedup:.2f}x)"
        )
    if too_large:
        parts.append(f"{too_large} over max_size_mb")
    if failed:
        parts.append(f"{failed} failed")
    return "; ".join(parts) or "see each variant's reasons"


@dataclass(frozen=True)
class AliasDecision:
    move: bool
    reason: str


def beats_holder(
    objective: str,
    metric: Metric,
    new_metrics: dict[str, float],
    new_size_bytes: int,
    holder_metrics: dict[str, float] | None,
    holder_size_bytes: int | None,
    new_vs_holder_speedup: float | None,
    latency_tolerance: float = 0.0,
) -> AliasDecision:
    """Whether the new version beats the current alias holder on the objective (both on the same data)."""
    if objective == "latency":
        if new_vs_holder_speedup is None:
            return AliasDecision(False, "the current holder could not be timed against the new version")
        return AliasDecision(
            new_vs_holder_speedup > 1.0 + latency_tolerance,
            f"new version is {new_vs_holder_speedup:.2f}x the holder's speed (timed interleaved, p50; "
            f"needs > {1 + latency_tolerance:.2f}x)",
        )
    if objective == "size":
        if holder_size_bytes is None:
            return AliasDecision(False, "the current holder has no recorded size")
        return AliasDecision(
            new_size_bytes < holder_size_bytes,
            f"new size {new_size_bytes / 1e6:.2f} MB vs holder {holder_size_bytes / 1e6:.2f} MB",
        )
    holder_value = (holder_metrics or {}).get(metric.name)
    if holder_value is None:
        return AliasDecision(False, f"the current holder has no recorded {metric.name}")
    new_value = new_metrics[metric.name]
    better = new_value > holder_value if metric.higher_better else new_value < holder_value
    return AliasDecision(better, f"new {metric.name} {new_value:.4g} vs holder {holder_value:.4g}")
