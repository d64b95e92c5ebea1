"""`int8flow` console command: run, validate, schema, deploy, serve, watch."""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from int8flow.flows.runlog import VERBOSE_ENV, run_log
from int8flow.flows.specfile import SpecError, load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Quantize an FP32 ONNX model into the best INT8/int4/fp16 variant, and prove it.",
)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # file:line stays on one line
out = Console(highlight=False, soft_wrap=True)
EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def _version(value: bool) -> None:
    if value:
        from int8flow import __version__

        typer.echo(f"int8flow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Quantize an FP32 model into the best INT8/int4/fp16 ONNX variant for this CPU, and prove it."""


def _validated(spec_file: Path, import_code: bool = False) -> Any:
    try:
        return load_spec(spec_file, import_code=import_code)
    except SpecError as error:
        for problem in sorted(error.problems, key=lambda p: p.line or 0):
            err.print(f"[red]error[/] {problem}")
        err.print(f"[red]{len(error.problems)} problem(s) in {spec_file}; nothing was run[/]")
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def validate(
    spec_files: list[Path] = typer.Argument(..., help="Pipeline spec(s) (YAML)."),
    import_code: bool = typer.Option(
        False, "--import", help="Also import the spec's own modules (callable/factory/function) to check them."
    ),
) -> None:
    """Check specs and report every error at once (exit 2 on error).

    Runs no code of the spec's: a `module:function` reference is only looked up as a file (`--import` imports it, and so runs its top-level code). A spec is trusted like code: `int8flow run` calls its functions.

    The ONNX model's inputs and outputs and the data files' array headers are read and checked against each other (not the weights, not the arrays).
    """
    failed = False
    for spec_file in spec_files:
        try:
            spec = _validated(spec_file, import_code)
        except typer.Exit:
            failed = True
            continue
        from int8flow.flows.plan import make_plan
        from int8flow.tasks.hardware import detect

        plan = make_plan(spec, detect())
        names = ", ".join(variant.label for variant in plan.variants)
        out.print(f"[green]ok[/] {spec_file}: pipeline {spec.name!r}, variants: {names}")
        for warning in plan.warnings:  # true of this CPU; the run says it again and records it
            err.print(f"[yellow]warning[/] {spec_file}: on this CPU ({plan.detected}): {warning}")
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def schema(
    output: Path | None = typer.Option(None, "--output", "-o", help="Write to this file instead of stdout."),
) -> None:
    """Print the JSON Schema of the spec, generated from the spec models."""
    from int8flow.flows.spec import PipelineSpec

    text = json.dumps(PipelineSpec.model_json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        out.print(f"wrote {output}")


@app.command()
def run(
    spec_file: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show the libraries' warnings (ORT, Prefect) on the console."
    ),
    dask_address: str | None = typer.Option(
        None, "--dask-address", help="Fan variants out over an existing Dask cluster (scheduler address)."
    ),
    dask_workers: int | None = typer.Option(
        None, "--dask-workers", min=1, help="Fan variants out over a local Dask cluster of this many worker processes."
    ),
) -> None:
    """Run the whole pipeline: quantize, evaluate, time, select, register.

    Exit codes: 0 a variant was promoted or nothing better was found; 2 bad input (the spec, model, data, checkpoint or the spec's own code: one line says what, nothing is registered); 1 a failure of int8flow or of the machine (the traceback is in the run's log file, also attached to the MLflow run).
    """
    spec = _validated(spec_file)  # bad input stops here, before any run is created
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    _use_kept_server()
    from int8flow.flows.tracking import configure_environment

    configure_environment()
    with run_log(spec.name) as log:
        code = _guarded(spec_file, log, lambda: _run_flow(spec, spec_file, dask_address, dask_workers))
    if code:
        raise typer.Exit(code)


def _run_flow(spec: Any, spec_file: Path, dask_address: str | None, dask_workers: int | None) -> None:
    _overlapped_startup(spec)
    from int8flow.flows.pipeline import dask_task_runner, quantization_pipeline

    if dask_address or dask_workers:
        quantization_pipeline = quantization_pipeline.with_options(
            task_runner=dask_task_runner(dask_address, dask_workers)
        )
        out.print(f"fan-out: Dask {dask_address or f'local cluster of {dask_workers} worker process(es)'}")
    outcome = quantization_pipeline(str(spec_file.resolve()))
    if outcome["selected"] is None:
        out.print(f"[yellow]{outcome['summary']}; nothing promoted[/]")


def _guarded(spec_file: Path, log: Path, work: Callable[[], None]) -> int:
    """Run `work`; turn what it raises into one line on the console (and its traceback into the log)."""
    from int8flow.flows.prefect_local import Terminated
    from int8flow.tasks.errors import InputError

    logger = logging.getLogger("int8flow")
    try:
        work()
    except InputError as error:
        # the model, the data or the user's code does not fit the spec: reported like a spec error; the
        # MLflow run was already ended FAILED with this error, and nothing was registered
        logger.error("bad input", exc_info=True)
        err.print(f"[red]error[/] {spec_file}: {error}")
        return EXIT_BAD_INPUT
    except SpecError as error:  # the spec changed on disk since it was validated
        for problem in error.problems:
            err.print(f"[red]error[/] {problem}")
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Terminated):
        logger.error("interrupted", exc_info=True)
        err.print("[red]interrupted[/]: the MLflow runs were ended KILLED")
        return 130
    except Exception as error:
        logger.error("failed", exc_info=True)
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        err.print(f"[red]failed[/] {type(error).__name__}: {first}\n  the traceback is in {log}")
        return EXIT_FAILURE
    return 0


server_app = typer.Typer(
    no_args_is_help=True,
    help="A local Prefect server kept between runs: `int8flow run` uses it instead of starting an ephemeral one "
    "(saves its start, 8-11 s a run) and its UI keeps every run.",
)
app.add_typer(server_app, name="server")


@server_app.command("start")
def server_start(port: int = typer.Option(4200, "--port", help="Port on 127.0.0.1.")) -> None:
    """Start Prefect's server on 127.0.0.1 in the background (or say where the running one is)."""
    from int8flow.flows.prefect_local import start_local_server

    try:
        url = start_local_server(port)
    except RuntimeError as error:
        err.print(f"[red]failed[/] {error}")
        raise typer.Exit(EXIT_FAILURE) from None
    out.print(f"Prefect server at {url.removesuffix('/api')}; `int8flow run` uses it until `int8flow server stop`")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server `int8flow server start` started."""
    from int8flow.flows.prefect_local import stop_local_server

    out.print("stopped the local Prefect server" if stop_local_server() else "no local Prefect server was running")


@server_app.command("status")
def server_status() -> None:
    """Where the local Prefect server answers; exit code 1 if none does."""
    from int8flow.flows.prefect_local import local_server

    url = local_server()
    if url is None:
        out.print("no local Prefect server answers; `int8flow run` starts an ephemeral one")
        raise typer.Exit(EXIT_FAILURE)
    out.print(f"Prefect server at {url.removesuffix('/api')}")


@app.command()
def deploy(
    spec_file: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    name: str | None = typer.Option(None, "--name", help="Deployment name; default: the spec's name."),
    pool: str = typer.Option("int8flow", "--pool", help="Prefect work pool (created as type `process` if missing)."),
    cron: str | None = typer.Option(None, "--cron", help="Cron schedule, e.g. '0 3 * * *'."),
    interval: float | None = typer.Option(None, "--interval", help="Or: run every this many seconds."),
) -> None:
    """Register a Prefect deployment of the spec on a server's work pool (PREFECT_API_URL's, or the local
    server `int8flow server start` keeps)."""
    spec = _validated(spec_file)
    kept = _use_kept_server()
    _needs_server("deploy")
    from int8flow.flows.deploy import deploy as deploy_spec

    deployment_id = deploy_spec(spec_file, name or spec.name, pool, cron, interval)
    out.print(
        f"deployment int8flow/{name or spec.name} ({deployment_id}) on pool {pool!r}; "
        f"schedule: {cron or (f'every {interval:g} s' if interval else 'none (run on demand)')}"
    )
    out.print(f"start a worker: {f'PREFECT_API_URL={kept} ' if kept else ''}prefect worker start --pool {pool}")


@app.command()
def serve(
    spec_file: Path = typer.Argument(..., help="Pipeline spec (YAML)."),
    name: str | None = typer.Option(None, "--name", help="Deployment name; default: the spec's name."),
    cron: str | None = typer.Option(None, "--cron", help="Cron schedule, e.g. '0 3 * * *'."),
    interval: float | None = typer.Option(None, "--interval", help="Or: run every this many seconds."),
) -> None:
    """Run the spec on a schedule from this one process (Prefect `flow.serve`) until stopped."""
    spec = _validated(spec_file)
    _use_kept_server()
    from int8flow.flows.deploy import serve as serve_spec
    from int8flow.flows.tracking import configure_environment

    configure_environment()
    _local_prefect()
    serve_spec(spec_file, name or spec.name, cron, interval)


@app.command()
def watch(
    spec_file: Path = typer.Argument(..., help="Pipeline spec (YAML) applied to every new model."),
    folder: Path | None = typer.Option(
        None, "--folder", help="Quantize new *.onnx files in this folder (not recursive)."
    ),
    registry_model: str | None = typer.Option(
        None, "--registry-model", help="Quantize new versions of this registered model."
    ),
    registry_tag: str | None = typer.Option(
        None, "--registry-tag", help="Only versions with this tag, key=value (alone: any model's)."
    ),
    deployment: str | None = typer.Option(
        None, "--deployment", help="Trigger this deployment (int8flow/<name>) per model instead of running here."
    ),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Where registry versions are downloaded."),
) -> None:
    """Quantize each new model (a file in a folder, a registry version) once, by content."""
    _validated(spec_file)
    if folder is None and registry_model is None and registry_tag is None:
        err.print("[red]error[/] give --folder, --registry-model or --registry-tag")
        raise typer.Exit(EXIT_BAD_INPUT)
    if registry_tag is not None:
        from int8flow.tasks.discover import parse_tag

        try:
            parse_tag(registry_tag)
        except ValueError as error:
            err.print(f"[red]error[/] --registry-tag: {error}")
            raise typer.Exit(EXIT_BAD_INPUT) from None
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    _use_kept_server()
    from int8flow.flows.tracking import configure_environment

    configure_environment()
    if deployment:
        _needs_server("watch --deployment")
    _local_prefect()
    from int8flow.flows.watch import watch_models

    report = watch_models(
        str(spec_file.resolve()),
        folder=str(folder.resolve()) if folder else None,
        registry_model=registry_model,
        registry_tag=registry_tag,
        deployment=deployment,
        cache_dir=str(cache_dir.resolve()) if cache_dir else None,
    )
    out.print(
        f"{len(report['new'])} new, {len(report['skipped'])} already claimed, "
        f"{len(report['waiting'])} not ready, {len(report['unusable'])} unusable"
    )
    if any(started["status"] == "failed" for started in report["triggered"]):
        raise typer.Exit(1)  # so a scheduler notices; the claims record the errors


def _use_kept_server() -> str | None:
    """The local server `int8flow server start` keeps, if it answers and PREFECT_API_URL names no other:
    every command that talks to Prefect uses it then (before Prefect is imported)."""
    from int8flow.flows.prefect_local import use_local_server

    if (server := use_local_server()) is not None:
        out.print(f"Prefect: the local server at {server.removesuffix('/api')} (`int8flow server stop` ends it)")
    return server


def _needs_server(command: str) -> None:
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        err.print(
            f"[red]error[/] `int8flow {command}` needs a Prefect server: set PREFECT_API_URL "
            '(see infra/README.md; `eval "$(bash infra/servers.sh env)"`)'
        )
        raise typer.Exit(EXIT_BAD_INPUT)


def _local_prefect() -> None:
    """Prefect's ephemeral server (without PREFECT_API_URL), made to die with this process."""
    from int8flow.flows.prefect_local import exit_cleanly_on_signals, start_ephemeral_server

    exit_cleanly_on_signals()
    start_ephemeral_server()()


def _overlapped_startup(spec: Any) -> None:
    """Start Prefect's ephemeral server (embedded default) while this process opens the MLflow store and
    imports the tokenizer's libraries: three fixed costs of several seconds each, paid side by side.
    The server dies with this process, whatever ends it (`flows.prefect_local`)."""
    from int8flow.flows.prefect_local import exit_cleanly_on_signals, start_ephemeral_server
    from int8flow.flows.tracking import MlflowStore

    exit_cleanly_on_signals()
    server_ready = start_ephemeral_server()
    MlflowStore().experiment_id(spec.name)  # creates the SQLite schema on a fresh store
    if spec.model.source == "huggingface":
        import transformers  # noqa: F401  - the tokenizer's; torch itself is imported by the export's child process
    server_ready()


def console_script() -> None:
    """The `int8flow` command: the app, then an exit without the interpreter's teardown.

    After a run the process holds ~3,400 modules (MLflow, Prefect, SQLAlchemy, ORT); Python frees them
    one by one at exit, 1.2 s measured on the MNIST flagship (issue 17), and writes nothing doing it.
    What an exit must do still happens, in Python's order: other threads' work is waited for, the exit
    handlers run (Prefect's log and event workers drain, an ephemeral server stops), the log file and
    the console are flushed. Tests call `app` itself, in their own process."""
    try:
        app()
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    # What the interpreter's own exit does first, in its order: the threading module's exit hooks (Prefect's
    # log and event workers drain there; skipped, the log handler's final flush waits 5 s for them), then
    # every other non-daemon thread, then the exit handlers (logging's shutdown among them).
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    console_script()
