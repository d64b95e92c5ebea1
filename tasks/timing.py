"""One timing session per decision: FP32 and every candidate, interleaved, with intervals and load.

Every model of a decision is timed in one process, in rounds: each round runs every model `per_round`
times, in a rotating order, on the same input feed with the same session options. A speed-up is the
ratio of the two models' medians over the session, and its 90 % interval comes from a bootstrap over
rounds (resampling whole rounds keeps what drifted within a round together). So every speed-up of a
decision, and the FP32 latency reported beside them, come from the same minutes of the same machine.

The machine's load is measured while timing: CPU time spent by other processes (`/proc/stat` busy time
minus this process's own CPU time). When others took more than `BUSY_CORES` or an interval is wider
than `WIDE`, rounds are added until both settle or the session's time budget is used; a session that
ends still busy or wide says so (`uncertain`), and selection then treats close results as ties.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from int8flow.tasks.evaluate import feed_for, session

BASELINE = "fp32"
PER_ROUND = 3  # runs of each model per round
MIN_ROUNDS = 5
BUSY_CORES = 0.25  # other processes using more than a quarter of a core on average: a busy machine
WIDE = 0.10  # an interval wider than +-10 % of its speed-up is not settled
BOOTSTRAP = 400
SEED = 0
MIN_SECONDS = 1.0  # shorter sessions measure the machine's load too coarsely (/proc/stat counts in 10 ms)
MAX_ROUNDS = 2000  # tiny models reach MIN_SECONDS in many rounds; the bootstrap's cost grows with them
CHECK_SECONDS = 0.25


@dataclass(frozen=True)
class Speedup:
    """How much faster one model ran than another in one session: ratio of medians, 90 % interval."""

    value: float
    low: float
    high: float

    def beats(self, margin: float = 0.0) -> bool:
        """Faster beyond the noise: the whole interval above 1 + margin."""
        return self.low > 1.0 + margin

    def text(self) -> str:
        return f"{self.value:.2f}x [{self.low:.2f}-{self.high:.2f}]"


@dataclass(frozen=True)
class MachineLoad:
    other_cores: float  # average cores used by other processes while timing
    steal_cores: float  # of which taken by the hypervisor (other VMs)

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_CORES

    def text(self) -> str:
        return f"other processes used {self.other_cores:.2f} cores on average" + (
            f" ({self.steal_cores:.2f} stolen by the hypervisor)" if self.steal_cores >= 0.01 else ""
        )


@dataclass(frozen=True)
class ModelTiming:
    rounds: np.ndarray  # [rounds, per_round] milliseconds
    batch_size: int

    @property
    def all_ms(self) -> np.ndarray:
        return self.rounds.reshape(-1)

    @property
    def p50_ms(self) -> float:
        return float(np.median(self.all_ms))

    def as_metrics(self, prefix: str) -> dict[str, float]:
        p50, p90, p99 = np.percentile(self.all_ms, [50, 90, 99])
        return {
            f"{prefix}_p50_ms": float(p50),
            f"{prefix}_p90_ms": float(p90),
            f"{prefix}_p99_ms": float(p99),
            f"{prefix}_throughput": float(self.batch_size * 1000.0 / self.all_ms.mean()),
        }


@dataclass(frozen=True)
class TimingSession:
    batch_size: int
    threads: int
    models: Mapping[str, ModelTiming]
    load: MachineLoad
    seconds: float
    planned_rounds: int
    baseline: str = BASELINE

    @property
    def key(self) -> str:
        return f"b{self.batch_size}_t{self.threads}"

    @property
    def rounds(self) -> int:
        return int(next(iter(self.models.values())).rounds.shape[0])

    def speedup(self, name: str, over: str | None = None) -> Speedup:
        """How much faster `name` ran than `over` (default: the baseline, FP32) in this session."""
        return _speedup(self.models[over or self.baseline].rounds, self.models[name].rounds)

    @property
    def uncertain(self) -> bool:
        """Busy or unsettled even after the extra rounds: close results are ties, not verdicts."""
        return self.load.busy or any(_wide(self.speedup(name)) for name in self.models if name != self.baseline)

    def summary(self) -> str:
        extra = self.rounds - self.planned_rounds
        rounds = f"{self.rounds} rounds" + (f" ({extra} added for noise)" if extra else "")
        return f"{self.key}: {len(self.models)} models, {rounds} x {PER_ROUND} runs each, {self.seconds:.2f} s; {self.load.text()}"


def _speedup(slow: np.ndarray, fast: np.ndarray) -> Speedup:
    value = float(np.median(slow) / np.median(fast))
    rng = np.random.default_rng(SEED)
    picks = rng.integers(0, slow.shape[0], size=(BOOTSTRAP, slow.shape[0]))
    ratios = np.median(slow[picks].reshape(BOOTSTRAP, -1), axis=1) / np.median(
        fast[picks].reshape(BOOTSTRAP, -1), axis=1
    )
    low, high = np.percentile(ratios, [5, 95])
    return Speedup(value, float(min(low, value)), float(max(high, value)))


def _wide(speedup: Speedup) -> bool:
    return (speedup.high - speedup.low) / 2 > WIDE * speedup.value


class _CpuMeter:
    """CPU time taken by other processes while we time, from /proc/stat versus our own CPU time."""

    def __init__(self) -> None:
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.busy, self.steal, self.own, self.wall = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        try:
            fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            fields = [0] * 8
        idle = fields[3] + fields[4]  # idle + iowait
        busy = (sum(fields[:8]) - idle) / self.ticks  # user..steal; guest time is already in user
        steal = fields[7] / self.ticks if len(fields) > 7 else 0.0
        return busy, steal, time.process_time(), time.perf_counter()

    def load(self) -> MachineLoad:
        busy, steal, own, wall = self._read()
        elapsed = max(wall - self.wall, 1e-9)
        others = max(0.0, (busy - self.busy) - (own - self.own)) / elapsed
        return MachineLoad(other_cores=others, steal_cores=max(0.0, steal - self.steal) / elapsed)


def time_session(
    models: Mapping[str, Path],
    feed: Mapping[str, np.ndarray],
    threads: int,
    warmup: int,
    runs: int,
    max_seconds: float = 120.0,
    baseline: str = BASELINE,
) -> TimingSession:
    """Time `models` against each other (and against `baseline`, one of them) on `feed`: at least `runs`
    runs each, in rounds, for at least `MIN_SECONDS`; more rounds while the machine is busy or the
    intervals are wide, up to four times the planned rounds (or `MAX_ROUNDS`) and `max_seconds`."""
    names = list(models)
    sessions = {name: session(models[name], threads) for name in names}
    feeds = {name: feed_for(sessions[name], dict(feed)) for name in names}
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    planned = max(MIN_ROUNDS, math.ceil(runs / PER_ROUND))
    timings: dict[str, list[list[float]]] = {name: [] for name in names}
    meter, started, checked = _CpuMeter(), time.perf_counter(), 0.0
    while True:
        done = len(timings[names[0]])
        shift = done % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].append(_run(sessions[name], feeds[name]))
        elapsed = time.perf_counter() - started
        if done + 1 < planned or (elapsed < MIN_SECONDS and done + 1 < MAX_ROUNDS):
            continue
        if elapsed > max_seconds or done + 1 >= min(4 * planned, MAX_ROUNDS):
            break
        if elapsed - checked < CHECK_SECONDS:  # the settledness test costs a bootstrap: not every round
            continue
        checked = elapsed
        arrays = {name: np.asarray(rounds) for name, rounds in timings.items()}
        wide = any(_wide(_speedup(arrays[baseline], arrays[name])) for name in names if name != baseline)
        if not wide and not meter.load().busy:
            break
    batch_size = len(next(iter(feed.values())))
    return TimingSession(
        batch_size=batch_size,
        threads=threads,
        models={name: ModelTiming(np.asarray(rounds), batch_size) for name, rounds in timings.items()},
        load=meter.load(),
        seconds=time.perf_counter() - started,
        planned_rounds=planned,
        baseline=baseline,
    )


def _run(runner: object, feed: dict[str, np.ndarray]) -> list[float]:
    times = []
    for _ in range(PER_ROUND):
        started = time.perf_counter_ns()
        runner.run(None, feed)  # type: ignore[attr-defined]
        times.append((time.perf_counter_ns() - started) / 1e6)
    return times
