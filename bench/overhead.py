"""Wall time of `int8flow run SPEC` against a bare script doing the same ONNX Runtime work.

Runs the two alternately, `--repeats` times each, each `int8flow run` against a fresh temp MLflow
store (embedded default: SQLite + local artifacts, ephemeral Prefect), and prints the medians and
their ratio as a markdown row.

    python bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = str(Path(args.spec).resolve())
    pipeline, bare = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="overhead-") as scratch:
            env = os.environ | {
                "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db",
                "PREFECT_HOME": f"{scratch}/prefect",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true",
            }
            pipeline.append(timed([str(Path(sys.executable).parent / "int8flow"), "run", spec], Path(scratch), env))
            bare.append(timed([sys.executable, str(REPO / "bench" / "bare_pipeline.py"), spec], Path(scratch), env))
    ratio = statistics.median(pipeline) / statistics.median(bare)
    print("| spec | int8flow run median s | bare script median s | ratio | target | runs |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {Path(spec).name} | {statistics.median(pipeline):.1f} ({', '.join(f'{t:.1f}' for t in pipeline)}) "
        f"| {statistics.median(bare):.1f} ({', '.join(f'{t:.1f}' for t in bare)}) | {ratio:.2f}x "
        f"| <= 1.10x: {'met' if ratio <= 1.10 else f'missed by {(ratio - 1.10) * 100:.0f} points'} | {args.repeats} |"
    )


if __name__ == "__main__":
    main()
