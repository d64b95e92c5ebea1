"""Post-training vs quantization-aware training, on the QAT specs, tabulated from MLflow.

    .venv/bin/python bench/qat.py [minilm-qat mnist-cnn-qat]

Each spec runs as shipped through `int8flow run` (bench/devset.py's runner: a fresh folder, MLflow
store and ephemeral Prefect server each, one after the other). The `qat` variant's untrained twin is
the same fake quantization with calibrated ranges and no training, i.e. post-training quantization of
exactly the same layers; ORT's own static/dynamic variants stand beside them. Accuracy is the spec's
selection metric vs FP32 on its evaluation data; latency is p50 at the selection's batch size and
threads, timed interleaved with FP32 (same session options, threads and inputs). Paste into
docs/benchmarks.md.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devset import pipeline_runs, run

DEFAULT = ["minilm-qat", "mnist-cnn-qat"]


def table(client: MlflowClient, spec: str, seconds: float, peak_mb: float) -> str:
    parent, runs, metric = pipeline_runs(client, spec)
    params = parent.data.params

    def chosen(field: str, listed: str) -> str:  # the selection's, else the first profiled
        value = params[f"spec.selection.{field}"]
        return value if value != "null" else params[f"spec.profiling.{listed}"].strip("[]").split(",")[0].strip()

    key = f"b{chosen('batch_size', 'batch_sizes')}_t{chosen('threads', 'threads')}"
    tags = parent.data.tags
    lines = [
        f"### {spec}",
        "",
        f"{tags['int8flow.cpu']} (target `{tags['int8flow.target_preset']}`); FP32 {metric} "
        f"{parent.data.metrics[f'fp32.{metric}']:.4f}, p50 {parent.data.metrics[f'fp32.{key}_p50_ms']:.3g} ms at {key}; "
        f"whole run {seconds:.0f} s, peak RSS {peak_mb:.0f} MB. Outcome: **{tags['int8flow.summary']}**.",
        "",
        f"| variant | kind | {metric} | {metric} drop | p50 ms ({key}) | speed-up | MB | training | integer ops (share of time) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_ in sorted(runs, key=lambda r: r.info.start_time):
        m, t = run_.data.metrics, run_.data.tags
        training = "—"
        if t.get("int8flow.kind") == "qat":
            training = (
                f"{m['qat.steps']:.0f} steps, {m['qat.train_seconds']:.0f} s" if m.get("qat.steps") else "none (PTQ)"
            )
        latency = f"{m[f'{key}_p50_ms']:.3g}" if f"{key}_p50_ms" in m else "not timed"
        speedup = f"{m['speedup']:.2f}×" if m.get("speedup") else "—"
        integer = (
            f"{m['ops.count.integer']:.0f} ({m['ops.time_share.integer']:.0%})" if "ops.count.integer" in m else "—"
        )
        verdict = "**selected**" if t.get("int8flow.selected") == "true" else t.get("int8flow.verdict", "")
        value = f"{m[metric]:.4f}" if metric in m else "failed"
        drop = f"{m[f'{metric}_drop']:.4f}" if f"{metric}_drop" in m else "—"
        size = f"{m['size_mb']:.1f}" if "size_mb" in m else "—"
        lines.append(
            f"| {run_.info.run_name} | {t.get('int8flow.kind')} | {value} | {drop} | {latency} | {speedup} | {size} | {training} | {integer} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(specs: list[str]) -> None:
    print(f"`.venv/bin/python bench/qat.py {' '.join(specs)}` on {time.strftime('%Y-%m-%d')}\n")
    for spec in specs:
        print(run(spec, table))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
