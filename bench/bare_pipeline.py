"""The same ONNX Runtime work as `int8flow run SPEC`, with no Prefect and no MLflow.

Used to measure the pipeline's overhead: it runs the flow's own steps (`flows.pipeline.run_pipeline`)
with the same plan (hardware detection, preset, resolved variants), the same stage functions, data and
profiling settings, on two worker threads like the flow's task runner, but as plain calls
(`InlineRunner`) and logging nothing (`NullPipelineRun`); nothing is registered. It imports neither
Prefect nor MLflow (`flows.run`, not `flows.pipeline`: importing Prefect alone is ~0.9 s that a bare
script would not pay).

    python bench/bare_pipeline.py pipelines/mnist-cnn-int8.yaml
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from int8flow.flows.run import run_pipeline
from int8flow.flows.runner import InlineRunner
from int8flow.flows.specfile import load_spec
from int8flow.flows.tracking import NullPipelineRun


def main(spec_file: str) -> None:
    started = time.perf_counter()
    spec_path = Path(spec_file).resolve()
    runner = InlineRunner()
    try:
        outcome = run_pipeline(load_spec(spec_path), spec_path, runner, NullPipelineRun(), register=False)
    finally:
        runner.close()
    print(f"{outcome.summary} in {time.perf_counter() - started:.1f} s")
    assert "prefect" not in sys.modules and "mlflow" not in sys.modules, "the bare pipeline imported an orchestrator"


if __name__ == "__main__":
    main(sys.argv[1])
