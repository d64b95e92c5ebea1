"""`int8flow` console command: run, validate, schema."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console

from flows.specfile import SpecError, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False, help="Quantize an FP32 ONNX model into the best INT8/int4/fp16 variant, and prove it.")
err = Console(stderr=True, highlight=False, soft_wrap=True)  # file:line stays on one line
out = Console(highlight=False, soft_wrap=True)
EXIT_BAD_INPUT = 2


def _validated(spec_file: Path):
    try:
        return load_spec(spec_file)
    except SpecError as error:
        for problem in sorted(error.problems, key=lambda p: p.line or 0):
            err.print(f"[red]error[/] {problem}")
        err.print(f"[red]{len(error.problems)} problem(s) in {spec_file}; nothing was run[/]")
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def validate(spec_files: list[Path] = typer.Argument(..., help="Pipeline spec(s) (YAML).")) -> None:
    """Check specs and report every error at once (exit 2 on error); runs nothing."""
    failed = False
    for spec_file in spec_files:
        try:
            spec = _validated(spec_file)
        except typer.Exit:
            failed = True
            continue
        names = ", ".join(str(v.name) for v in spec.resolved_variants())
        out.print(f"[green]ok[/] {spec_file}: pipeline {spec.name!r}, variants: {names}")
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the JSON Schema of the spec, generated from the spec models."""
    from flows.spec import PipelineSpec

    text = json.dumps(PipelineSpec.model_json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        out.print(f"wrote {output}")


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's own task-run logs."),
) -> None:
    """Run the whole pipeline: quantize, evaluate, profile, select, register."""
    spec = _validated(spec_file)  # bad input stops here, before any run is created
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    from flows.tracking import configure_environment

    configure_environment()
    _overlapped_startup(spec)
    from flows.pipeline import quantization_pipeline

    from tasks.data import DataError
    from tasks.export import ExportError

    try:
        outcome = quantization_pipeline(str(spec_file.resolve()))
    except (DataError, ExportError) as error:
        # the data or the model does not fit the spec: bad input, reported like a spec error;
        # the MLflow run was already ended FAILED with this error, and nothing was registered
        err.print(f"[red]error[/] {spec_file}: {type(error).__name__}: {error}")
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if outcome["selected"] is None:
        out.print(f"[yellow]{outcome['summary']}; nothing promoted[/]")


def _overlapped_startup(spec) -> None:
    """Start Prefect's ephemeral server while this process opens the MLflow store and imports the
    exporter's libraries: three fixed costs of several seconds each, paid side by side.

    Only in the embedded default (no `PREFECT_API_URL`); the flow would start the same server itself.
    """
    import contextlib
    import threading

    from prefect.server.api.server import SubprocessASGIServer  # imported here, not in the thread
    from prefect.settings import PREFECT_API_URL

    def start_server() -> None:
        with contextlib.suppress(Exception):  # if it fails, the flow starts it and reports the error
            SubprocessASGIServer().start()

    starter = None
    if not PREFECT_API_URL.value():
        starter = threading.Thread(target=start_server, name="prefect-ephemeral-start", daemon=True)
        starter.start()
    from flows.tracking import Tracker

    Tracker().experiment_id(spec.name)  # creates the SQLite schema on a fresh store
    if spec.model.source != "onnx":
        import torch  # noqa: F401

        if spec.model.source == "huggingface":
            import transformers  # noqa: F401
    if starter is not None:
        starter.join()


if __name__ == "__main__":
    app()
