"""What reviewers read, where they look: the MLflow parent run's description, the report files, the
registry's descriptions, and (through `flows.pipeline`) the Prefect run's summary artifact.

The verdict is one paragraph: which variant won, by how much (the speed-up with its 90 % interval, from
the timing session), at what accuracy drop and size, registered as which version, and whether the alias
moved and why. The table below it lists every variant with the rule that rejected it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from int8flow.flows.records import VariantRecord
from int8flow.flows.steps import Baseline, Job
from int8flow.tasks.report import markdown_table, plot, plot_node_errors, rows, write_csv, write_html
from int8flow.tasks.select import Candidate, SelectionResult
from int8flow.tasks.timing import TimingSession

MAX_DESCRIPTION = 8000  # MLflow refuses longer tag values


@dataclass(frozen=True)
class Review:
    verdict: str  # one paragraph
    description: str  # markdown: the verdict, the machine, warnings, the table (MLflow's run description)
    table: str  # the markdown table alone (Prefect's artifact)
    files: list[Path]  # report.html, variants.csv, the charts


def _numbers(
    candidate: Candidate, fp32: Candidate, metric: str, drop: float | None, session: TimingSession | None
) -> str:
    parts = []
    if candidate.speedup is not None and candidate.latency_ms is not None and fp32.latency_ms is not None:
        config = f"batch {session.batch_size}, {session.threads} thread(s)" if session else ""
        parts.append(
            f"**{candidate.speedup.value:.2f}x** FP32 (90 % interval {candidate.speedup.low:.2f}-{candidate.speedup.high:.2f}; "
            f"p50 {candidate.latency_ms:.3g} ms vs {fp32.latency_ms:.3g} ms, {config})"
        )
    value, reference = candidate.metrics.get(metric), fp32.metrics.get(metric)
    if value is not None and reference is not None:
        parts.append(f"{metric} {value:.4g} vs FP32 {reference:.4g} (drop {drop if drop is not None else 0:.3g})")
    if candidate.size_bytes and fp32.size_bytes:
        parts.append(f"{candidate.size_bytes / 1e6:.3g} MB vs {fp32.size_bytes / 1e6:.3g} MB")
    return ", ".join(parts)


def verdict(
    job: Job,
    result: SelectionResult,
    candidates: Sequence[Candidate],
    fp32: Candidate,
    session: TimingSession | None,
    registered: str | None,
    alias_reason: str | None,
) -> str:
    metric = job.spec.selection_metric.name
    if result.selected is None:
        return (
            f"**No variant selected**: {result.summary.removeprefix('no variant selected: ')}. Nothing was registered."
        )
    chosen = next(c for c in candidates if c.name == result.selected)
    drop = next((v.accuracy_drop for v in result.verdicts if v.name == chosen.name), None)
    text = f"**Selected `{chosen.name}`**: {_numbers(chosen, fp32, metric, drop, session)}."
    if registered:
        registry = job.spec.registry
        assert registry is not None
        text += f" Registered as `{registry.model_name}` v{registered}; {alias_reason}."
    return text


def describe_run(
    job: Job, verdict_text: str, table: str, session: TimingSession | None, warnings: Sequence[str]
) -> str:
    plan = job.plan
    machine = f"Measured on {plan.hardware.describe()} with the `{plan.preset.name}` preset"
    if session is not None:
        machine += f"; timing: {session.summary()}"
        if session.uncertain:
            machine += " (**uncertain**: close speed-ups were treated as ties)"
    lines = [verdict_text, "", machine + "."]
    lines += [f"- warning: {warning}" for warning in warnings]
    lines += ["", table, "", "The chart and the full report are under Artifacts: `summary/report.html`."]
    text = "\n".join(lines)
    if len(text) > MAX_DESCRIPTION:  # keep the verdict; cut the table, and say where the rest is
        head = "\n".join(lines[: lines.index(table)])
        room = MAX_DESCRIPTION - len(head) - 200
        kept = table[:room].rsplit("\n", 1)[0]
        text = f"{head}\n{kept}\n\n(table cut: every row is in `summary/variants.csv`)"
    return text


def write_report(
    job: Job,
    records: Mapping[str, VariantRecord],
    candidates: Sequence[Candidate],
    fp32: Candidate,
    result: SelectionResult,
    verdict_text: str,
) -> tuple[str, list[Path]]:
    """The table (markdown) and the report files: CSV, chart, fallback rankings, one HTML file."""
    metric = job.spec.selection_metric.name
    table_rows = rows(candidates, fp32, result, metric)
    table = markdown_table(table_rows, metric)
    csv_file = write_csv(table_rows, metric, job.work / "variants.csv")
    chart = plot(candidates, fp32, result, metric, job.work / "accuracy_vs_latency.png")
    rankings = []
    for name, record in records.items():
        if record.fallback is not None and record.fallback.ranking:
            errors = [(error.node, error.added_noise) for error in record.fallback.ranking]
            title = f"{name}: quantized nodes by the noise they add (the fallback keeps the worst in float)"
            rankings.append(plot_node_errors(errors, title, job.work / f"fallback-{name}.png"))
    html = write_html(verdict_text.replace("**", "").replace("`", ""), table, chart, rankings, job.work / "report.html")
    return table, [html, csv_file, chart, *rankings]


def describe_model(job: Job, baseline: Baseline) -> str:
    registry = job.spec.registry
    assert registry is not None
    return (
        f"Quantized variants of the FP32 model `{baseline.source.path.name}` (sha256 {baseline.source.sha256[:12]}), "
        f"made by the int8flow pipeline `{job.spec.name}`. `@{registry.alias}` is held by the version that beat the "
        f"previous holder on `{job.spec.selection.objective}` (same evaluation data, timed in one session); each version "
        "says what it is, how it was measured and why the alias did or did not move."
    )


def describe_version(
    job: Job,
    record: VariantRecord,
    chosen: Candidate,
    fp32: Candidate,
    baseline: Baseline,
    session: TimingSession | None,
) -> str:
    metric = job.spec.selection_metric.name
    drop = record.accuracy.drop if record.accuracy else None
    options = record.variant.model_dump(mode="json", exclude={"grid", "name"}, exclude_defaults=True)
    return (
        f"`{record.name}` ({record.variant.facts.summary}) of `{baseline.source.path.name}`: {_numbers(chosen, fp32, metric, drop, session)}. "
        f"Measured on {job.plan.hardware.describe()} (`{job.plan.preset.name}` preset). "
        f"Recipe: `{options}`; pipeline `{job.spec.name}` ({job.spec_path.name})."
    )


def version_tags(chosen: Candidate, fp32: Candidate, job: Job, drop: float | None) -> dict[str, str]:
    from int8flow.flows.tracking import Tag

    tags = {Tag.CPU: job.plan.hardware.cpu_model, Tag.TARGET_PRESET: job.plan.preset.name}
    tags[Tag.VERSION_CPU_FLAGS] = ",".join(flag for flag, present in job.plan.hardware.flags.items() if present)
    if chosen.speedup is not None:
        tags |= {
            Tag.VERSION_SPEEDUP: f"{chosen.speedup.value:.3f}",
            Tag.VERSION_SPEEDUP_INTERVAL: f"{chosen.speedup.low:.3f}-{chosen.speedup.high:.3f}",
        }
    if chosen.latency_ms is not None and fp32.latency_ms is not None:
        tags |= {
            Tag.VERSION_LATENCY_MS: f"{chosen.latency_ms:.4g}",
            Tag.VERSION_FP32_LATENCY_MS: f"{fp32.latency_ms:.4g}",
        }
    if drop is not None:
        tags[Tag.VERSION_DROP] = f"{drop:.4g}"
    if chosen.size_bytes:
        tags[Tag.VERSION_SIZE_MB] = f"{chosen.size_bytes / 1e6:.3f}"
    return tags
