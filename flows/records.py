"""One typed record per variant: what has been made and measured of it, and where it stopped.

The flow fills a record stage by stage; `attempt` runs one stage for one variant and, if it fails,
records the failure on the record and says so, so no stage repeats the "record the error, print it"
lines. A failed record is skipped by every later stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

from int8flow.flows.console import fail
from int8flow.tasks.clipping import ClippingReport
from int8flow.tasks.coverage import OpCoverage
from int8flow.tasks.evaluate import Scores
from int8flow.tasks.fallback import FallbackResult
from int8flow.tasks.kinds import VariantBase
from int8flow.tasks.quantize import QuantizedModel
from int8flow.tasks.select import AccuracyCheck

T = TypeVar("T")


class Status(StrEnum):
    PLANNED = "planned"
    MADE = "made"  # quantized (or trained)
    EVALUATED = "evaluated"
    FAILED = "failed"


@dataclass(frozen=True)
class Failure:
    stage: str
    error: str

    def __str__(self) -> str:
        return f"{self.stage}: {self.error}"


@dataclass
class VariantRecord:
    variant: VariantBase
    made: QuantizedModel | None = None
    scores: Scores | None = None
    accuracy: AccuracyCheck | None = None
    guard_failures: list[str] = field(default_factory=list)  # fidelity guards that collapsed
    coverage: OpCoverage | None = None
    warnings: list[str] = field(default_factory=list)
    failure: Failure | None = None
    fallback_of: str | None = None  # the variant whose accuracy fallback made this one
    fallback: FallbackResult | None = None  # the fallback this variant started
    qat: object | None = None  # tasks.qat.QatResult of a qat variant (torch-free import here)
    clipping: ClippingReport | None = None  # how much of the evaluation data its calibration clips

    @property
    def name(self) -> str:
        return self.variant.label

    @property
    def status(self) -> Status:
        if self.failure is not None:
            return Status.FAILED
        if self.scores is not None:
            return Status.EVALUATED
        return Status.MADE if self.made is not None else Status.PLANNED

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def passed_accuracy(self) -> bool:
        return self.accuracy is None or self.accuracy.passed

    def fail(self, stage: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else describe(error)
        self.failure = Failure(stage, text)
        fail(stage, f"{self.name} failed: {text}")


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


def attempt(record: VariantRecord, stage: str, work: Callable[[], T]) -> T | None:
    """`work()`, or None with the failure recorded on `record` (and said) if it raises."""
    try:
        return work()
    except Exception as error:  # noqa: BLE001 - one variant's failure must not stop the others
        record.fail(stage, error)
        return None
