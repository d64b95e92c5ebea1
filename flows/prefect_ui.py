"""What the Prefect UI shows of a pipeline run besides its task runs: tags, a summary artifact, a link.

Stage messages reach the flow run's Logs tab through `flows.console.say`. At the end of a run the flow
run gets tags (`spec:<name>`, `model:<sha256 prefix>`, `preset:<target>`, `selected:<variant>`), a
markdown artifact with the verdict and the table of every variant, and a link to the MLflow run.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any

from int8flow.flows.run import PipelineOutcome


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI address of a run (the classic ML view, not MLflow 3's GenAI default)."""
    path = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path}"  # `mlflow ui` in the folder of the SQLite store


def show_in_prefect(pipeline: str, outcome: PipelineOutcome, tracking_uri: str, experiment_id: str) -> None:
    """Tags, the summary artifact and the MLflow link on the current flow run (no-op outside one)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    key = re.sub(r"[^a-z0-9-]+", "-", pipeline.lower()).strip("-") or "int8flow"
    url = mlflow_run_url(tracking_uri, experiment_id, outcome.parent_run_id)
    local = "" if tracking_uri.startswith("http") else " (start `mlflow ui` in the folder of the MLflow store)"
    markdown = f"{outcome.verdict}\n\n{outcome.table}\n\nMLflow run: [{outcome.parent_run_id}]({url}){local}\n"
    with contextlib.suppress(Exception):  # what the UI shows must never fail the run
        create_markdown_artifact(
            markdown=markdown, key=f"{key}-summary", description=f"int8flow verdict for {pipeline}"
        )
        create_link_artifact(url, link_text=f"MLflow run {outcome.parent_run_id}", key=f"{key}-mlflow-run")
        _add_tags(context.flow_run.id, outcome.tags)


def _add_tags(flow_run_id: Any, tags: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        current = client.read_flow_run(flow_run_id).tags
        client.update_flow_run(flow_run_id, tags=sorted(set(current) | set(tags)))
