"""The parent run's summary: a table of every variant and an accuracy-vs-latency plot."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from int8flow.tasks.select import Candidate, SelectionResult

FP32 = "fp32"


def write_table(
    candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str, out: Path
) -> Path:
    verdicts = {verdict.name: verdict for verdict in result.verdicts}
    rows = []
    for candidate in [fp32, *candidates]:
        verdict = verdicts.get(candidate.name)
        rows.append(
            {
                "variant": candidate.name,
                metric: _fmt(candidate.metrics.get(metric)),
                "drop": _fmt(verdict.accuracy_drop if verdict else 0.0),
                "p50_ms": _fmt(candidate.latency_ms),
                "speedup": _fmt(candidate.speedup.value if candidate.speedup else None),
                "speedup_90pct": candidate.speedup.text().split(" ", 1)[1] if candidate.speedup else "",
                "size_mb": _fmt(candidate.size_bytes / 1e6 if candidate.size_bytes else None),
                "pareto": "yes" if candidate.name in result.pareto else "",
                "selected": "yes" if candidate.name == result.selected else "",
                "status": "baseline"
                if verdict is None
                else ("eligible" if verdict.eligible else "; ".join(verdict.reasons)),
            }
        )
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


def plot_pareto(
    candidates: Sequence[Candidate], fp32: Candidate, result: SelectionResult, metric: str, out: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    ran = [c for c in candidates if c.error is None and c.latency_ms is not None]
    for candidate in ran:
        assert candidate.latency_ms is not None
        on_front = candidate.name in result.pareto
        axes.scatter(
            candidate.latency_ms,
            candidate.metrics[metric],
            marker="*" if candidate.name == result.selected else "o",
            s=160 if candidate.name == result.selected else 40,
            color="tab:red" if on_front else "tab:gray",
        )
        axes.annotate(
            candidate.name,
            (candidate.latency_ms, candidate.metrics[metric]),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    front = sorted((c for c in ran if c.name in result.pareto), key=lambda c: c.latency_ms or 0.0)
    if front:
        axes.plot(
            [c.latency_ms or 0.0 for c in front],
            [c.metrics[metric] for c in front],
            color="tab:red",
            linewidth=1,
            label="Pareto front",
        )
    if fp32.latency_ms is not None:
        axes.scatter(fp32.latency_ms, fp32.metrics[metric], marker="s", color="tab:blue", label="FP32")
    axes.set_xlabel("p50 latency (ms), selection batch size and threads")
    axes.set_ylabel(metric)
    axes.set_title("accuracy vs latency (star: selected)")
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out
