"""The run's report: one table of every variant (CSV, markdown), a chart, and one HTML file with both.

The rows are built once (`rows`): FP32 first, then the selected variant, then the others by status;
each says the rule that rejected it. The markdown table is what the MLflow parent run shows as its
description; the HTML report (an artifact MLflow's viewer renders) adds the chart and, for variants
the accuracy fallback retried, the ranking of the nodes it kept in float.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from int8flow.tasks.select import Candidate, SelectionResult, Verdict

FP32 = "fp32"


@dataclass(frozen=True)
class Row:
    variant: str
    accuracy: float | None
    drop: float | None
    latency_ms: float | None
    speedup: str  # "1.52x [1.48-1.57]", or "" when not timed
    size_mb: float | None
    status: str  # selected | eligible | baseline | the rejection
    pareto: bool


def rows(candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str) -> list[Row]:
    verdicts = {verdict.name: verdict for verdict in result.verdicts}

    def row(candidate: Candidate) -> Row:
        verdict: Verdict | None = verdicts.get(candidate.name)
        if verdict is None:
            status = "baseline"
        elif candidate.name == result.selected:
            status = "selected"
        else:
            status = "eligible" if verdict.eligible else "; ".join(verdict.reasons)
        return Row(
            candidate.name,
            candidate.metrics.get(metric),
            verdict.accuracy_drop if verdict else 0.0,
            candidate.latency_ms,
            candidate.speedup.text() if candidate.speedup and verdict else ("1.00x" if candidate.speedup else ""),
            candidate.size_bytes / 1e6 if candidate.size_bytes else None,
            status,
            candidate.name in result.pareto,
        )

    order = {"baseline": 0, "selected": 1, "eligible": 2}
    ranked = sorted((row(c) for c in candidates), key=lambda r: (order.get(r.status, 3), r.latency_ms or math.inf))
    return [row(fp32), *ranked]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def write_csv(table: Sequence[Row], metric: str, out: Path) -> Path:
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", metric, "drop", "p50_ms", "speedup_90pct", "size_mb", "pareto", "status"])
        for row in table:
            writer.writerow(
                [
                    row.variant,
                    _fmt(row.accuracy),
                    _fmt(row.drop),
                    _fmt(row.latency_ms),
                    row.speedup,
                    _fmt(row.size_mb),
                    "yes" if row.pareto else "",
                    row.status,
                ]
            )
    return out


def markdown_table(table: Sequence[Row], metric: str) -> str:
    lines = [
        f"| variant | {metric} | drop | p50 ms | speed-up (90 % interval) | MB | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        name = f"**{row.variant}**" if row.status == "selected" else row.variant
        status = row.status.replace("|", "/")
        lines.append(
            f"| {name} | {_fmt(row.accuracy)} | {_fmt(row.drop, 3)} | {_fmt(row.latency_ms, 3)} | {row.speedup} | {_fmt(row.size_mb, 3)} | {status} |"
        )
    return "\n".join(lines)


def plot(candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str, out: Path) -> Path:
    """Accuracy vs latency: log latency axis when the spread needs it, labels that do not overlap, FP32
    as a reference, the Pareto front when it has two points or more, the selected variant starred."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    ran = [c for c in candidates if c.error is None and c.latency_ms is not None]
    points = ([fp32] if fp32.latency_ms is not None else []) + ran
    figure, axes = plt.subplots(figsize=(8, 5))
    latencies = [p.latency_ms or 0.0 for p in points]
    if latencies and max(latencies) / max(min(latencies), 1e-9) > 5:
        axes.set_xscale("log")
    for point in ran:
        selected = point.name == result.selected
        axes.scatter(
            point.latency_ms or 0.0,
            point.metrics[metric],
            marker="*" if selected else "o",
            s=200 if selected else 45,
            color="tab:red" if point.name in result.pareto else "tab:gray",
            zorder=3,
        )
    if fp32.latency_ms is not None:
        axes.scatter(fp32.latency_ms, fp32.metrics[metric], marker="s", s=60, color="tab:blue", label="FP32", zorder=3)
        axes.axhline(fp32.metrics[metric], color="tab:blue", linewidth=0.8, linestyle=":")
    front = sorted((c for c in ran if c.name in result.pareto), key=lambda c: c.latency_ms or 0.0)
    if len(front) >= 2:
        axes.plot(
            [c.latency_ms or 0.0 for c in front],
            [c.metrics[metric] for c in front],
            color="tab:red",
            linewidth=1,
            label="Pareto front",
        )
    _label(axes, points, metric)
    values = [p.metrics[metric] for p in points]
    if values:
        low, high = min(values), max(values)
        pad = max((high - low) * 0.15, abs(high) * 1e-4, 1e-6)
        axes.set_ylim(low - pad, high + pad)
    axes.set_xlabel("p50 latency, ms (one timing session; selection batch size and threads)")
    axes.set_ylabel(metric)
    axes.set_title("accuracy vs latency (star: selected; red: Pareto front)")
    axes.legend(loc="best", fontsize=8)
    axes.grid(True, which="both", linewidth=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def _label(axes: object, points: Sequence[Candidate], metric: str) -> None:
    """Names beside their points, pushed apart vertically (in screen space) until none overlap."""
    figure = axes.figure  # type: ignore[attr-defined]
    figure.canvas.draw()
    transform = axes.transData  # type: ignore[attr-defined]
    placed: list[tuple[float, float]] = []
    height = 11.0  # pixels per label line at fontsize 7
    for point in sorted(points, key=lambda p: (p.latency_ms or 0.0, p.metrics[metric])):
        x, y = transform.transform((point.latency_ms, point.metrics[metric]))
        offset = 0.0
        while any(abs(px - x) < 140 and abs(py - (y + offset)) < height for px, py in placed):
            offset += height
        placed.append((x, y + offset))
        axes.annotate(  # type: ignore[attr-defined]
            point.name,
            (point.latency_ms, point.metrics[metric]),
            xytext=(6, offset),
            textcoords="offset pixels",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "linewidth": 0.4, "color": "0.6"} if offset else None,
        )


def plot_node_errors(node_errors: Sequence[tuple[str, float]], title: str, out: Path, top: int = 25) -> Path:
    """The accuracy fallback's ranking: the noise each quantized node adds, worst first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = list(node_errors)[:top]
    figure, axes = plt.subplots(figsize=(8, 0.28 * len(shown) + 1.2))
    axes.barh([name for name, _ in shown][::-1], [noise for _, noise in shown][::-1], color="tab:orange")
    axes.set_xlabel("noise-to-signal power the node adds (0: none, 1: the signal is gone)")
    axes.set_title(title, fontsize=9)
    axes.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def write_html(verdict: str, table_markdown: str, chart: Path, extra_charts: Sequence[Path], out: Path) -> Path:
    """One self-contained HTML file: the verdict, the table, the chart(s) inlined."""
    images = "".join(
        f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"></figure>'
        for path in [chart, *extra_charts]
    )
    table = _markdown_to_html(table_markdown)
    out.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>int8flow report</title><style>"
        "body{font-family:sans-serif;margin:1.5em;max-width:1100px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        f"</style></head><body><h2>int8flow report</h2><p>{html.escape(verdict)}</p>{table}{images}</body></html>\n",
        encoding="utf-8",
    )
    return out


def _markdown_to_html(markdown: str) -> str:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return ""
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    header, body = cells[0], cells[2:]

    def cell(text: str, tag: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        content = html.escape(text.strip("*"))
        return f"<{tag}>{'<b>' + content + '</b>' if bold else content}</{tag}>"

    head = "".join(cell(text, "th") for text in header)
    rows_html = "".join("<tr>" + "".join(cell(text, "td") for text in row) + "</tr>" for row in body)
    return f"<table><tr>{head}</tr>{rows_html}</table>"


def png_bytes(path: Path) -> bytes:
    return io.BytesIO(path.read_bytes()).getvalue()


def write_table(
    candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str, out: Path
) -> Path:
    return write_csv(rows(candidates, fp32, result, metric), metric, out)


def plot_pareto(
    candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str, out: Path
) -> Path:
    return plot(candidates, fp32, result, metric, out)
