"""Scheduled runs of a spec: a Prefect deployment on a server's work pool, or `flow.serve` in-process.

The server way: `int8flow deploy` registers a deployment of `quantization_pipeline` whose code is this
checkout (Prefect's `from_source` with a local folder) on a `process` work pool; a worker started with
`prefect worker start --pool <pool>` on a machine with the same checkout runs it, with that machine's
`MLFLOW_TRACKING_URI`. The single-process way: `int8flow serve` keeps one process polling for its own
scheduled runs (Prefect's `Flow.serve`), nothing else needed but the Prefect API.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from uuid import UUID

REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:quantization_pipeline"


def ensure_process_pool(name: str) -> None:
    """Create the work pool if it does not exist yet (type `process`: flow runs as local subprocesses)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # created by someone else meanwhile
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))


def deploy(spec_file: Path, name: str, pool: str, cron: str | None, interval: float | None) -> UUID:
    """Register (or update) deployment `int8flow/<name>` running `spec_file` on `pool`."""
    from prefect import Flow

    ensure_process_pool(pool)
    flow: Any = Flow.from_source(source=str(REPO_ROOT), entrypoint=ENTRYPOINT)  # sync call: a Flow, not a coroutine
    return flow.deploy(
        name=name,
        work_pool_name=pool,
        cron=cron,
        interval=interval,
        parameters={"spec_file": str(spec_file.resolve())},
        description=f"int8flow pipeline {spec_file.name}",
        tags=["int8flow"],
        build=False,
        push=False,
        print_next_steps=False,
    )


def serve(spec_file: Path, name: str, cron: str | None, interval: float | None) -> None:
    """Serve the pipeline on a schedule from this process until it is stopped."""
    from int8flow.flows.pipeline import quantization_pipeline

    quantization_pipeline.serve(
        name=name, cron=cron, interval=interval, parameters={"spec_file": str(spec_file.resolve())}
    )
