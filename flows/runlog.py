"""The run's log file: everything the libraries say, and every traceback, off the console.

The console shows int8flow's own stage lines, progress bars and the verdict (`flows.console`). ORT's
quantizer warnings, Prefect's task-failure tracebacks and Python warnings go to a log file instead
(`<working dir>/.int8flow/logs/<pipeline>-<time>-<pid>.log`), which is also attached to the MLflow
parent run (`logs/`). `--verbose` (`INT8FLOW_VERBOSE=1`) puts the libraries' warnings back on the console.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOG_ENV = "INT8FLOW_LOG_FILE"
VERBOSE_ENV = "INT8FLOW_VERBOSE"
_FORMAT = "%(asctime)s %(levelname)-7s %(threadName)s %(name)s: %(message)s"


# loggers that print to the console on their own (root: Prefect's console handler; MLflow has its own)
_PRINTING_LOGGERS = ("", "mlflow")


def _console_handlers() -> list[logging.Handler]:
    return [
        handler
        for name in _PRINTING_LOGGERS
        for handler in logging.getLogger(name).handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


@contextlib.contextmanager
def run_log(name: str) -> Iterator[Path]:
    """The log file of this run, set up for the duration of the block (nested blocks share the outer one)."""
    existing = os.environ.get(LOG_ENV)
    if existing and any(getattr(h, "int8flow_log", False) for h in logging.getLogger().handlers):
        yield Path(existing)
        return
    path = Path.cwd() / ".int8flow" / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.int8flow_log = True  # type: ignore[attr-defined]
    root = logging.getLogger()
    saved = (root.level, [(h, h.level) for h in _console_handlers()])
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.WARNING, logging.INFO))
    quiet = os.environ.get(VERBOSE_ENV) != "1"
    # MLflow adds a console handler of its own when it is first imported, later than this: told not to,
    # its records (a new store's "Creating initial MLflow database tables") reach this file through root
    unconfigured = quiet and "mlflow" not in sys.modules and "MLFLOW_CONFIGURE_LOGGING" not in os.environ
    if unconfigured:
        os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    for console_handler, _ in saved[1]:
        console_handler.setLevel(logging.CRITICAL + 1 if quiet else logging.WARNING)
    logging.captureWarnings(True)
    _quiet_onnxruntime()
    os.environ[LOG_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(LOG_ENV, None)
        if unconfigured:
            os.environ.pop("MLFLOW_CONFIGURE_LOGGING", None)
        logging.captureWarnings(False)
        root.removeHandler(handler)
        handler.close()
        root.setLevel(saved[0])
        for console_handler, level in saved[1]:
            console_handler.setLevel(level)


def _quiet_onnxruntime() -> None:
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # errors only: ORT's C++ warnings go to stderr directly


def current_log() -> Path | None:
    path = os.environ.get(LOG_ENV)
    return Path(path) if path else None
