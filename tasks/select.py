"""Pick the best variant that meets the constraints, and decide whether it beats the alias holder.

Every rule is decided here and only here: the accuracy constraint (`AccuracyRule`, also used by the
fallback), the selection constraints and objective, and the alias decision. Rejections are values
(`Rejection(rule, text)`), so "why was nothing selected" is counted by rule, not found in strings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from pydantic import Field

from int8flow.tasks.evaluate import Metric
from int8flow.tasks.options import StrictModel
from int8flow.tasks.timing import Speedup

# How much faster one candidate ran than another in the decision's timing session (None: not timed together).
Faster = Callable[[str, str], Speedup | None]


class Selection(StrictModel):
    metric: str | None = Field(
        default=None, description="Accuracy metric the constraints use; default: the first metric."
    )
    max_drop: float | None = Field(
        default=None, ge=0, description="Largest accepted accuracy drop vs FP32 (see `drop`)."
    )
    drop: Literal["absolute", "relative"] = Field(
        default="absolute", description="`max_drop` in metric units, or as a fraction of FP32's value."
    )
    min_speedup: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Smallest accepted speed-up over FP32 (ratio of medians from one timing session), judged on "
        "the lower end of its 90 % interval: 1.0 rejects anything not clearly at least as fast as FP32.",
    )
    max_size_mb: float | None = Field(default=None, gt=0, description="Largest accepted model size.")
    objective: Literal["latency", "size", "accuracy"] = Field(
        default="latency", description="What `best` means among the variants that meet the constraints."
    )
    latency_tolerance: float = Field(
        default=0.03,
        ge=0,
        lt=1,
        description="Smallest speed-up worth a choice: a variant is faster than another only when the lower end "
        "of their speed-up interval is above 1 + this; otherwise they tie, and the tie is broken by accuracy, "
        "then size, then spec order. The alias moves by the same rule.",
    )
    batch_size: int | None = Field(
        default=None, ge=1, description="Profiled batch size that counts; default: the first."
    )
    threads: int | None = Field(
        default=None, ge=1, description="Profiled thread count that counts; default: the first."
    )

    def accuracy_rule(self, metric: Metric) -> AccuracyRule:
        return AccuracyRule(metric, self.max_drop, self.drop == "relative")


class Rule(StrEnum):
    """The rule that rejected a variant."""

    FAILED = "failed"
    MAX_DROP = "max_drop"
    GUARD = "guard"  # the user's metric passed, a fidelity guard (top-k agreement, SQNR) collapsed
    MIN_SPEEDUP = "min_speedup"
    MAX_SIZE = "max_size_mb"
    NOT_TIMED = "not_timed"


@dataclass(frozen=True)
class Rejection:
    rule: Rule
    text: str


@dataclass(frozen=True)
class AccuracyCheck:
    drop: float
    passed: bool
    text: str  # why it failed; empty when it passed


@dataclass(frozen=True)
class AccuracyRule:
    """The accuracy constraint: drop vs FP32 on the selection metric, at most `max_drop`."""

    metric: Metric
    max_drop: float | None
    relative: bool

    def drop(self, value: float, fp32: float) -> float:
        """How much worse than FP32 (positive = worse), absolute or as a fraction of FP32's value."""
        drop = (fp32 - value) if self.metric.higher_better else (value - fp32)
        if self.relative:
            return drop / abs(fp32) if fp32 else (0.0 if drop <= 0 else math.inf)
        return drop

    def check(self, metrics: Mapping[str, float], fp32: Mapping[str, float]) -> AccuracyCheck:
        drop = self.drop(metrics[self.metric.name], fp32[self.metric.name])
        if self.max_drop is None:
            return AccuracyCheck(drop, True, "")
        # NaN never passes: `not (nan <= x)`.
        if not drop <= self.max_drop:
            kind = "relative" if self.relative else "absolute"
            return AccuracyCheck(
                drop, False, f"{self.metric.name} drop {drop:.4g} > max_drop {self.max_drop:g} ({kind})"
            )
        return AccuracyCheck(drop, True, "")


@dataclass(frozen=True)
class Candidate:
    """What selection knows of one variant; `error` set means the variant failed."""

    name: str
    metrics: dict[str, float] = field(default_factory=dict)
    speedup: Speedup | None = None  # over FP32, from the decision's timing session
    latency_ms: float | None = None
    size_bytes: int | None = None
    error: str | None = None
    guard_failures: tuple[str, ...] = ()  # fidelity guards that collapsed (and are enforced)


@dataclass(frozen=True)
class Verdict:
    name: str
    rejections: tuple[Rejection, ...]  # empty when eligible
    accuracy_drop: float | None = None

    @property
    def eligible(self) -> bool:
        return not self.rejections

    @property
    def reasons(self) -> tuple[str, ...]:
        return tuple(rejection.text for rejection in self.rejections)

    def rejected_by(self, rule: Rule) -> bool:
        return any(rejection.rule is rule for rejection in self.rejections)

    def describe(self) -> str:
        return "eligible" if self.eligible else "; ".join(self.reasons)


@dataclass(frozen=True)
class SelectionResult:
    selected: str | None
    verdicts: tuple[Verdict, ...]
    pareto: tuple[str, ...]  # accuracy-vs-latency front among the variants that ran
    summary: str


def judge(candidate: Candidate, fp32_metrics: Mapping[str, float], accuracy: AccuracyRule, rules: Selection) -> Verdict:
    if candidate.error is not None:
        return Verdict(candidate.name, (Rejection(Rule.FAILED, f"failed: {candidate.error.splitlines()[0]}"),))
    rejections = []
    check = accuracy.check(candidate.metrics, fp32_metrics)
    if not check.passed:
        rejections.append(Rejection(Rule.MAX_DROP, check.text))
    rejections += [Rejection(Rule.GUARD, f"guard: {failure}") for failure in candidate.guard_failures]
    if candidate.speedup is None:
        if check.passed:  # a variant that missed the accuracy constraint is not timed at all
            rejections.append(Rejection(Rule.NOT_TIMED, "not profiled"))
    elif candidate.speedup.low < rules.min_speedup:
        text = f"speed-up {candidate.speedup.text()} < min_speedup {rules.min_speedup:g}x at the interval's lower end"
        rejections.append(Rejection(Rule.MIN_SPEEDUP, text))
    size_mb = (candidate.size_bytes or 0) / 1e6
    if rules.max_size_mb is not None and size_mb > rules.max_size_mb:
        rejections.append(Rejection(Rule.MAX_SIZE, f"size {size_mb:.1f} MB > max_size_mb {rules.max_size_mb:g}"))
    return Verdict(candidate.name, tuple(rejections), accuracy_drop=check.drop)


def _accuracy_key(candidate: Candidate, metric: Metric) -> float:
    return candidate.metrics[metric.name] * (-1 if metric.higher_better else 1)


def best_of(eligible: Sequence[Candidate], metric: Metric, rules: Selection, faster: Faster | None = None) -> Candidate:
    """The objective's best. Latency: the fastest, and every candidate it does not clearly beat (the lower
    end of their speed-up interval at most 1 + `latency_tolerance`) ties with it; a tie goes to accuracy,
    then size, then spec order, so timing noise cannot flip the choice."""
    order = {candidate.name: index for index, candidate in enumerate(eligible)}
    if rules.objective == "size":
        return min(
            eligible,
            key=lambda c: (c.size_bytes or 0, _accuracy_key(c, metric), c.latency_ms or math.inf, order[c.name]),
        )
    if rules.objective == "accuracy":
        return min(
            eligible,
            key=lambda c: (_accuracy_key(c, metric), c.latency_ms or math.inf, c.size_bytes or 0, order[c.name]),
        )
    fastest = min(eligible, key=lambda c: (c.latency_ms or math.inf, order[c.name]))

    def clearly_slower(candidate: Candidate) -> bool:
        if candidate is fastest:
            return False
        speedup = faster(fastest.name, candidate.name) if faster is not None else None
        if speedup is not None:
            return speedup.beats(rules.latency_tolerance)
        return (candidate.latency_ms or math.inf) > (fastest.latency_ms or math.inf) * (1 + rules.latency_tolerance)

    tied = [candidate for candidate in eligible if not clearly_slower(candidate)]
    return min(tied, key=lambda c: (_accuracy_key(c, metric), c.size_bytes or 0, order[c.name]))


def pareto_front(candidates: Sequence[Candidate], metric: Metric) -> tuple[str, ...]:
    """Variants no other variant beats on both accuracy and latency."""
    ran = [c for c in candidates if c.error is None and c.latency_ms is not None]

    def better_or_equal(a: Candidate, b: Candidate) -> bool:
        accuracy_ok = (
            a.metrics[metric.name] >= b.metrics[metric.name]
            if metric.higher_better
            else a.metrics[metric.name] <= b.metrics[metric.name]
        )
        return accuracy_ok and (a.latency_ms or math.inf) <= (b.latency_ms or math.inf)

    return tuple(
        c.name
        for c in ran
        if not any(other is not c and better_or_equal(other, c) and not better_or_equal(c, other) for other in ran)
    )


def select(
    candidates: Sequence[Candidate],
    fp32_metrics: Mapping[str, float],
    accuracy: AccuracyRule,
    rules: Selection,
    faster: Faster | None = None,
) -> SelectionResult:
    """Judge every candidate, then pick the objective's best among the eligible (`best_of`)."""
    metric = accuracy.metric
    verdicts = tuple(judge(candidate, fp32_metrics, accuracy, rules) for candidate in candidates)
    eligible = [c for c, verdict in zip(candidates, verdicts, strict=True) if verdict.eligible]
    pareto = pareto_front(candidates, metric)
    if eligible:
        best = best_of(eligible, metric, rules, faster)
        speed = f" at {best.speedup.text()} FP32" if best.speedup is not None else ""
        summary = f"selected {best.name}{speed} (best {rules.objective} of {len(eligible)} variant(s) meeting the constraints)"
        return SelectionResult(best.name, verdicts, pareto, summary)
    if all(c.error is not None for c in candidates):
        summary = "no variant selected: every variant failed"
    else:
        summary = f"no variant selected: none meets the constraints ({_why_none(candidates, verdicts, rules)})"
    return SelectionResult(None, verdicts, pareto, summary)


def _why_none(candidates: Sequence[Candidate], verdicts: Sequence[Verdict], rules: Selection) -> str:
    """Which rule rejected how many variants, and the fastest accurate-enough one for scale."""
    pairs = list(zip(candidates, verdicts, strict=True))
    too_inaccurate = sum(verdict.rejected_by(Rule.MAX_DROP) for verdict in verdicts)
    accurate_but_slow = [
        c for c, verdict in pairs if verdict.rejected_by(Rule.MIN_SPEEDUP) and not verdict.rejected_by(Rule.MAX_DROP)
    ]
    too_large = sum(verdict.rejected_by(Rule.MAX_SIZE) for verdict in verdicts)
    failed = sum(verdict.rejected_by(Rule.FAILED) for verdict in verdicts)
    guarded = sum(verdict.rejected_by(Rule.GUARD) and not verdict.rejected_by(Rule.MAX_DROP) for verdict in verdicts)
    parts = []
    if too_inaccurate:
        parts.append(f"{too_inaccurate} over max_drop")
    if guarded:
        parts.append(f"{guarded} within max_drop but with a collapsed fidelity guard")
    if accurate_but_slow:
        fastest = max(accurate_but_slow, key=lambda c: c.speedup.value if c.speedup else 0.0)
        parts.append(
            f"{len(accurate_but_slow)} accurate enough but below min_speedup {rules.min_speedup:g}x "
            f"(fastest: {fastest.name} at {fastest.speedup.text() if fastest.speedup else '?'})"
        )
    if too_large:
        parts.append(f"{too_large} over max_size_mb")
    if failed:
        parts.append(f"{failed} failed")
    return "; ".join(parts) or "see each variant's reasons"


# -- the alias --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """A registered version as the alias decision sees it."""

    version: str
    metrics: Mapping[str, float]
    size_bytes: int | None
    eval_fingerprint: str | None


@dataclass(frozen=True)
class AliasDecision:
    move: bool
    reason: str


def holder_needs_timing(newcomer: Contender, holder: Contender | None, objective: str) -> bool:
    """Whether deciding needs the holder timed against the newcomer (latency, comparable versions)."""
    return objective == "latency" and holder is not None and _comparable(newcomer, holder) is None


def _comparable(newcomer: Contender, holder: Contender) -> AliasDecision | None:
    """A decision reached without comparing the two models, or None when they must be compared."""
    if holder.version == newcomer.version:
        return AliasDecision(False, f"v{newcomer.version} already holds the alias")
    if holder.eval_fingerprint != newcomer.eval_fingerprint:
        return AliasDecision(
            False,
            f"v{holder.version} was evaluated on different data (evaluation fingerprints differ); not compared, alias left where it is",
        )
    return None


def decide_alias(
    newcomer: Contender,
    holder: Contender | None,
    objective: str,
    metric: Metric,
    speedup_vs_holder: Speedup | None = None,
    latency_tolerance: float = 0.0,
) -> AliasDecision:
    """Whether the newcomer takes the alias from `holder` (None: nobody holds it)."""
    if holder is None:
        return AliasDecision(True, "no version held the alias yet")
    decided = _comparable(newcomer, holder)
    if decided is not None:
        return decided
    against = f"vs v{holder.version}: "
    if objective == "latency":
        if speedup_vs_holder is None:
            return AliasDecision(False, against + "the current holder could not be timed against the new version")
        return AliasDecision(
            speedup_vs_holder.beats(latency_tolerance),
            against + f"new version runs {speedup_vs_holder.text()} the holder's speed (one timing session; "
            f"the alias moves only if the interval's lower end is above {1 + latency_tolerance:.2f}x)",
        )
    if objective == "size":
        if holder.size_bytes is None or newcomer.size_bytes is None:
            return AliasDecision(False, against + "the current holder has no recorded size")
        return AliasDecision(
            newcomer.size_bytes < holder.size_bytes,
            against + f"new size {newcomer.size_bytes / 1e6:.2f} MB vs holder {holder.size_bytes / 1e6:.2f} MB",
        )
    holder_value = holder.metrics.get(metric.name)
    if holder_value is None:
        return AliasDecision(False, against + f"the current holder has no recorded {metric.name}")
    new_value = newcomer.metrics[metric.name]
    better = new_value > holder_value if metric.higher_better else new_value < holder_value
    return AliasDecision(better, against + f"new {metric.name} {new_value:.4g} vs holder {holder_value:.4g}")
