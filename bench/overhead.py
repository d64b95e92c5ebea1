"""Wall time of `int8flow run SPEC` against a bare script doing the same ONNX Runtime work.

Runs the two alternately, `--repeats` times each, each `int8flow run` against a fresh temp MLflow
store (embedded default: SQLite + local artifacts, ephemeral Prefect), and prints the medians and
their ratio as a markdown row.

    python bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3
    python bench/overhead.py pipelines/mnist-cnn-int8.yaml --repeats 3 --local-server

`--local-server`: the design for local runs (issue 17): a Prefect server kept between runs
(`int8flow server start`, started once before the timed runs) and an MLflow store that already exists
(one untimed run first), as on a user's second run. The bare script is the same in both modes.
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


def _env(scratch: Path) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "MLFLOW_TRACKING_URI": f"sqlite:///{scratch}/mlflow.db",
        "PREFECT_HOME": f"{scratch}/prefect",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--local-server", action="store_true", help="a kept Prefect server and an existing store")
    args = parser.parse_args()
    spec = str(Path(args.spec).resolve())
    int8flow = str(Path(sys.executable).parent / "int8flow")
    pipeline, bare = [], []
    with tempfile.TemporaryDirectory(prefix="overhead-") as kept:
        server_env = _env(Path(kept))
        if args.local_server:
            subprocess.run([int8flow, "server", "start", "--port", "4299"], env=server_env, check=True)
            timed([int8flow, "run", spec], Path(kept), server_env)  # creates the store; not counted
        try:
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(prefix="overhead-") as fresh:
                    scratch = Path(kept) if args.local_server else Path(fresh)
                    env = server_env if args.local_server else _env(scratch)
                    pipeline.append(timed([int8flow, "run", spec], scratch, env))
                    bare.append(timed([sys.executable, str(REPO / "bench" / "bare_pipeline.py"), spec], scratch, env))
        finally:
            if args.local_server:
                subprocess.run([int8flow, "server", "stop"], env=server_env, check=True)
    ratio = statistics.median(pipeline) / statistics.median(bare)
    print("| spec | int8flow run median s | bare script median s | ratio | target | runs |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {Path(spec).name}{' (local server, existing store)' if args.local_server else ''} | {statistics.median(pipeline):.1f} ({', '.join(f'{t:.1f}' for t in pipeline)}) "
        f"| {statistics.median(bare):.1f} ({', '.join(f'{t:.1f}' for t in bare)}) | {ratio:.2f}x "
        f"| <= 1.10x: {'met' if ratio <= 1.10 else f'missed by {(ratio - 1.10) * 100:.0f} points'} | {args.repeats} |"
    )


if __name__ == "__main__":
    main()
