"""The timing step: FP32 and every candidate worth timing, in one interleaved session per configuration.

One session per (batch size, threads) of `profiling`; the one at the selection's configuration decides.
Every speed-up logged, tabled, plotted and registered comes from these sessions, each against the FP32
latency of the same session (`tasks.timing`).
"""

from __future__ import annotations

from collections.abc import Mapping

from int8flow.flows.console import say, waiting, warn
from int8flow.flows.records import VariantRecord, describe
from int8flow.flows.steps import Baseline, Job
from int8flow.tasks.select import Candidate, Faster
from int8flow.tasks.timing import BASELINE, Speedup, TimingSession, time_session


def time_candidates(job: Job, records: Mapping[str, VariantRecord], baseline: Baseline) -> dict[str, TimingSession]:
    """Sessions by key (`b1_t1`); a session that fails fails the variants it was timing."""
    profiling = job.spec.profiling
    timed = [
        r for r in records.values() if r.ok and r.made is not None and (r.passed_accuracy or profiling.all_variants)
    ]
    models = {BASELINE: baseline.source.path} | {r.name: r.made.path for r in timed if r.made is not None}
    sessions: dict[str, TimingSession] = {}
    for batch_size in profiling.batch_sizes:
        for threads in profiling.threads:
            key = f"b{batch_size}_t{threads}"
            try:
                with waiting("time", f"{key}: FP32 and {len(models) - 1} variant(s), interleaved"):
                    feed = job.feed(baseline.data, batch_size)
                    arguments = (models, feed, threads, profiling.warmup, profiling.runs, profiling.max_seconds)
                    session = job.runner.call("time", time_session, *arguments, label=key)
            except Exception as error:  # noqa: BLE001 - FP32 itself could not be timed at this configuration
                for record in timed:
                    record.fail("time", f"{key}: {describe(error)}")
                continue
            sessions[key] = session
            _report(job, session, timed)
    return sessions


def _report(job: Job, session: TimingSession, timed: list[VariantRecord]) -> None:
    say("time", session.summary())
    if session.load.busy:
        warn(
            "time", f"{session.key}: the machine was busy while timing ({session.load.text()}); close results are ties"
        )
    fp32 = session.models[BASELINE]
    for record in timed:
        speedup = session.speedup(record.name)
        say(
            "time",
            f"{record.name} {session.key}: p50 {session.models[record.name].p50_ms:.3g} ms vs FP32 {fp32.p50_ms:.3g} ms = {speedup.text()}",
        )
        job.run.variant_timed(record.name, _variant_metrics(session, record.name, speedup))
    job.run.timing(
        session.key, fp32.as_metrics(f"fp32.{session.key}"), session.rounds, session.load.other_cores, session.uncertain
    )


def _variant_metrics(session: TimingSession, name: str, speedup: Speedup) -> dict[str, float]:
    key = session.key
    return session.models[name].as_metrics(key) | {
        f"{key}_speedup": speedup.value,
        f"{key}_speedup_low": speedup.low,
        f"{key}_speedup_high": speedup.high,
        f"{key}_fp32_p50_ms": session.models[BASELINE].p50_ms,
    }


def deciding(job: Job, sessions: Mapping[str, TimingSession]) -> TimingSession | None:
    return sessions.get(f"b{job.spec.selection_batch_size}_t{job.spec.selection_threads}")


def candidate(job: Job, record: VariantRecord, session: TimingSession | None) -> Candidate:
    if record.failure is not None or record.made is None or record.scores is None:
        return Candidate(record.name, error=str(record.failure))
    if session is None or record.name not in session.models:  # missed the accuracy constraint: not timed
        guards = tuple(record.guard_failures)
        return Candidate(
            record.name, metrics=record.scores.metrics, size_bytes=record.made.size_bytes, guard_failures=guards
        )
    latency = session.models[record.name].p50_ms
    return Candidate(
        record.name,
        record.scores.metrics,
        session.speedup(record.name),
        latency,
        record.made.size_bytes,
        guard_failures=tuple(record.guard_failures),
    )


def fp32_candidate(baseline: Baseline, session: TimingSession | None) -> Candidate:
    latency = session.models[BASELINE].p50_ms if session is not None else None
    one = Speedup(1.0, 1.0, 1.0)
    return Candidate("fp32", baseline.scores.metrics, one if session else None, latency, baseline.source.size_bytes)


def faster_in(session: TimingSession | None) -> Faster | None:
    """`faster(a, b)`: how much faster a ran than b in the deciding session, for selection's ties."""
    if session is None:
        return None
    return lambda a, b: session.speedup(a, over=b) if a in session.models and b in session.models else None
