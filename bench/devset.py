"""Run issue 4's development set through `int8flow run` and tabulate what the pipeline decided.

    .venv/bin/python bench/devset.py [magika-int8 silero-vad-int8 orientation-int8]

Each spec runs as shipped, in its own temp folder with a fresh MLflow SQLite store and Prefect's
ephemeral server, one after the other (never two timings at once). The table is read back from MLflow:
every variant and fallback step with its accuracy drop, its speed-up over FP32 (p50, interleaved, the
selection's batch size and threads) and the verdict. Paste the output into docs/benchmarks.md.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["magika-int8", "silero-vad-int8", "silero-vad-stateful-int8", "ocr-rec-int8", "orientation-int8"]


def run(spec: str, tabulate=None) -> str:
    """Run `pipelines/<spec>.yaml` in a fresh folder and store; return `tabulate(client, spec, seconds)`."""
    tabulate = tabulate or table
    with tempfile.TemporaryDirectory(prefix=f"devset-{spec}-") as folder:
        uri = f"sqlite:///{folder}/mlflow.db"
        env = os.environ | {"MLFLOW_TRACKING_URI": uri}
        started = time.perf_counter()
        peak_file = Path(folder) / "peak_rss_kb"
        done = subprocess.run(
            # GNU time's %M: the peak resident set of the int8flow process itself (its Prefect server
            # is a separate, smaller process)
            [
                "/usr/bin/time",
                "-f",
                "%M",
                "-o",
                str(peak_file),
                str(ROOT / ".venv" / "bin" / "int8flow"),
                "run",
                str(ROOT / "pipelines" / f"{spec}.yaml"),
            ],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        peak_mb = int(peak_file.read_text().split()[-1]) / 1024 if peak_file.exists() else float("nan")
        if done.returncode != 0:
            return f"### {spec}\n\nfailed with exit code {done.returncode}:\n\n```\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n```\n"
        return tabulate(MlflowClient(uri), spec, seconds, peak_mb)


def pipeline_runs(client: MlflowClient, spec: str):
    """The pipeline's parent run, every other run of its experiment, and its selection metric."""
    experiment = client.get_experiment_by_name(spec)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return parent, [r for r in runs if r is not parent], parent.data.params["spec.selection.metric"]


def table(client: MlflowClient, spec: str, seconds: float, peak_mb: float) -> str:
    parent, runs, metric = pipeline_runs(client, spec)
    tags = parent.data.tags
    children = sorted(
        runs,
        key=lambda r: (
            r.data.tags.get("int8flow.fallback_of", r.info.run_name),
            "int8flow.fallback_of" in r.data.tags,
            r.info.start_time,
        ),
    )
    fp32 = parent.data.metrics[f"fp32.{metric}"]
    lines = [
        f"### {spec}",
        "",
        f"Target `{tags['int8flow.target_preset']}` on {tags['int8flow.cpu']}; FP32 {metric} {fp32:.4f}; "
        f"whole run {seconds:.0f} s, peak RSS {peak_mb:.0f} MB.",
        f"Repairs: {tags['int8flow.repairs']}.",
        f"Outcome: **{tags['int8flow.summary']}**"
        + (f", registered v{tags['int8flow.registered_version']}" if "int8flow.registered_version" in tags else "")
        + ".",
        f"ORT's plain quantize_dynamic: {tags.get('int8flow.ort_default', 'not run (no dynamic variant)')}.",
        "",
        f"| variant | float nodes | {metric} drop | speed-up vs FP32 | integer ops (share of time) | verdict | fallback step |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in children:
        m, t = run.data.metrics, run.data.tags
        name = run.info.run_name if "int8flow.fallback_of" not in t else f"↳ {run.info.run_name}"
        kept = len(t["int8flow.kept_in_float"].split(",")) if t.get("int8flow.kept_in_float") else 0
        drop = f"{m[f'{metric}_drop']:.4f}" if f"{metric}_drop" in m else "—"
        speedup = f"{m['speedup']:.2f}×" if m.get("speedup") else "not timed"
        integer = (
            f"{m['ops.count.integer']:.0f} ({m['ops.time_share.integer']:.0%})" if "ops.count.integer" in m else "—"
        )
        verdict = "**selected**" if t.get("int8flow.selected") == "true" else t.get("int8flow.verdict", "")
        verdict += f" ({t['int8flow.vs_ort_default']})" if "int8flow.vs_ort_default" in t else ""
        step = t.get("int8flow.fallback_step", "")
        lines.append(f"| {name} | {kept} | {drop} | {speedup} | {integer} | {verdict} | {step} |")
    return "\n".join(lines) + "\n"


def main(specs: list[str]) -> None:
    print(f"`.venv/bin/python bench/devset.py {' '.join(specs)}` on {time.strftime('%Y-%m-%d')}\n")
    for spec in specs:
        print(run(spec))
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
