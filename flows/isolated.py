"""Run one stage in a child process that ends with it, so that the stage's memory goes back to the OS.

Exporting a PyTorch model holds the model, the traced graph and the exporter's buffers (MiniLM: ~0.5 GB
that Python and glibc keep after the stage returns). The pipeline process lives for the whole run, so
every later stage would be measured on top of that. In a child process the memory ends with the stage
(docs/benchmarks.md, issue 17). The child:
- is a fresh interpreter (`python -m int8flow.flows.isolated`), not `multiprocessing`: spawn re-runs the
  caller's `__main__` (a user's script without a main guard would start its pipeline again) and leaves a
  resource-tracker process behind; the call and its result travel as pickles in a temporary folder;
- writes what the libraries say (warnings, progress bars) to the run's log file, not to the console;
- gets SIGTERM if the thread that started it dies, however it dies (`PR_SET_PDEATHSIG`), so it cannot
  outlive the run;
- hands back the stage's result or its exception (an `InputError` stays one: exit code 2); its
  traceback is in the run's log.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from int8flow.flows.runlog import LOG_ENV

P = ParamSpec("P")
R = TypeVar("R")

_CALL, _RESULT = "call.pickle", "result.pickle"


def in_child_process(function: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`function(*args, **kwargs)` in a fresh child process; the function is pickled by reference, its
    arguments and result by value."""
    log = os.environ.get(LOG_ENV)
    with tempfile.TemporaryDirectory(prefix="int8flow-child-") as folder:
        # the import path first, so that the child can import what the call refers to
        (Path(folder) / _CALL).write_bytes(pickle.dumps((sys.path, pickle.dumps((function, args, kwargs)))))
        command = [sys.executable, "-m", "int8flow.flows.isolated", folder, str(os.getpid())]
        with open(log, "ab") if log else contextlib.nullcontext() as output:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output)
            try:
                code = process.wait()
            finally:  # interrupted while waiting: the child goes too
                if process.poll() is None:
                    process.kill()
                    process.wait()
        result = Path(folder) / _RESULT
        if not result.exists():
            raise RuntimeError(f"the child process running {function.__name__} ended with code {code} and no result")
        succeeded, value = pickle.loads(result.read_bytes())
    if succeeded:
        return value
    raise value


def _child(folder: Path) -> None:
    import logging
    import traceback

    log = os.environ.get(LOG_ENV)
    if log:
        logging.basicConfig(filename=log, level=logging.INFO)
        logging.captureWarnings(True)
    import_path, call = pickle.loads((folder / _CALL).read_bytes())
    sys.path[:] = list(dict.fromkeys([*import_path, *sys.path]))
    function, args, kwargs = pickle.loads(call)
    outcome: tuple[bool, Any]
    try:
        outcome = (True, function(*args, **kwargs))
    except Exception as error:  # noqa: BLE001 - handed back to the caller, which raises it
        traceback.print_exc()  # into the run's log
        outcome = (False, error)
    try:
        data = pickle.dumps(outcome)
    except Exception:  # noqa: BLE001 - an exception that does not pickle: its text still does
        data = pickle.dumps((False, RuntimeError(f"{type(outcome[1]).__name__}: {outcome[1]}")))
    (folder / _RESULT).write_bytes(data)


if __name__ == "__main__":
    if sys.platform.startswith("linux"):
        from int8flow.flows.prefect_local import die_with_parent

        die_with_parent(int(sys.argv[2]))
    _child(Path(sys.argv[1]))
