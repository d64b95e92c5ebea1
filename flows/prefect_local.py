"""Prefect's ephemeral API server for local runs, started so that it cannot outlive this process.

Without `PREFECT_API_URL`, Prefect starts a temporary API server (`uvicorn`, ~250 MB) in a subprocess
and stops it at interpreter exit (`atexit`). A process killed by a signal never runs `atexit`, and the
server was left running with parent 1. Here:
- the server process is started with the kernel's parent-death signal (`PR_SET_PDEATHSIG`): when this
  process dies, however it dies, the server gets SIGTERM;
- SIGTERM and SIGHUP to this process become a clean exit (runs are ended KILLED, `atexit` runs);
- the first start on a fresh Prefect home (database creation) is serialised across processes with a
  file lock, so two first runs at once do not both migrate the same database.
Linux only (`prctl`); elsewhere Prefect's own start is used unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


class Terminated(SystemExit):
    """SIGTERM/SIGHUP, raised in the main thread so that `finally` blocks and `atexit` run."""


def exit_cleanly_on_signals() -> None:
    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, handler)


def die_with_parent(parent_pid: int, libc: Any = None) -> None:
    """In a child process: get SIGTERM when the parent (the thread that started it) dies, however it
    dies; exit now if it already has. Linux only (`prctl`)."""
    (libc or ctypes.CDLL(None, use_errno=True)).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _dies_with(parent_pid: int) -> Callable[[], None]:
    """`die_with_parent` as a Popen `preexec_fn` (between fork and exec: libc is loaded beforehand)."""
    return partial(die_with_parent, parent_pid, ctypes.CDLL(None, use_errno=True))


@contextlib.contextmanager
def _first_start_lock(home: Path) -> Iterator[None]:
    """Held while the first server on `home` creates its database; the kernel frees it if we die."""
    import prefect

    marker = home / f".int8flow-ephemeral-ready-{prefect.__version__}"
    if marker.exists():
        yield
        return
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".int8flow-ephemeral.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
            marker.touch()
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_ephemeral_server() -> Callable[[], None]:
    """Start the ephemeral server now (from the main thread: the parent-death signal is tied to the
    thread that forks) and return `wait()`, which blocks until it answers. No-op with a server URL."""
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        return lambda: None
    import prefect.server.api.server as server_module
    from prefect.server.api.server import SubprocessASGIServer

    class DiesWithParent(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            original = server_module.subprocess
            server_module.subprocess = _PopenWith(partial(subprocess.Popen, preexec_fn=_dies_with(os.getpid())))  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = original

    if SubprocessASGIServer._instances.get(None) is not None:
        return lambda: None  # already started in this process
    server = DiesWithParent()  # takes the ephemeral server's slot: Prefect's get_client() finds it there
    held = contextlib.ExitStack()
    held.enter_context(_first_start_lock(Path(get_current_settings().home)))
    server.port = server.find_available_port()
    server.server_process = server._run_uvicorn_command()  # forked from this thread, the main one
    atexit.register(server.stop)
    failure: list[BaseException] = []
    answered = threading.Event()
    threading.Thread(target=_poll_health, args=(server, answered, failure), daemon=True, name="prefect-health").start()

    def wait() -> None:
        answered.wait()
        held.close()
        if failure:
            raise failure[0]

    return wait


def _poll_health(server: Any, answered: threading.Event, failure: list[BaseException]) -> None:
    """Wait for the server's /health; mark it running (Prefect's client then uses it as is)."""
    import time

    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    try:
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if server.server_process.poll() is not None:
                    raise RuntimeError(
                        f"Prefect's ephemeral server exited with code {server.server_process.returncode}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                        server.running = True
                        return
                time.sleep(0.2)
        raise RuntimeError(
            f"Prefect's ephemeral server did not answer within {PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s "
            "(raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS on a busy machine, or run `prefect server start`)"
        )
    except BaseException as error:  # noqa: BLE001 - handed to wait()
        failure.append(error)
    finally:
        answered.set()


class _PopenWith:
    """Stands in for the `subprocess` module inside Prefect's server module, with our Popen."""

    def __init__(self, popen: Callable[..., subprocess.Popen[Any]]):
        self.Popen = popen

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


# A local Prefect server that outlives runs (`int8flow server start`).
#
# The ephemeral server costs every `int8flow run` 8-11 s before its first task (docs/benchmarks.md,
# "Pipeline overhead"), and its run history is only visible while it runs. A server started once and
# kept, like `prefect server start` in Prefect's own local set-up, takes that cost off every later run,
# and its UI shows every run since. `int8flow run` uses it when it answers; otherwise it starts the
# ephemeral one as before. The state file records the server's address and process group; it lives in
# Prefect's home, beside the database the server writes. PREFECT_HOME is read from the environment, not
# from Prefect's settings: Prefect fixes its settings at import, and this runs before that.
SERVER_STATE = "int8flow-server.json"
SERVER_START_SECONDS = 300.0  # a first start migrates Prefect's database: slow on a busy 2-core machine


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _read_state() -> dict[str, Any] | None:
    import json

    path = prefect_home() / SERVER_STATE
    try:
        state = json.loads(path.read_text())
        return state if isinstance(state, dict) and {"url", "pid"} <= state.keys() else None
    except (OSError, ValueError):
        return None


def _answers(url: str, timeout: float) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def local_server() -> str | None:
    """The API URL of the local server `int8flow server start` left running, if it answers; a state
    file whose server is gone is removed."""
    state = _read_state()
    if state is None:
        return None
    alive = _alive(int(state["pid"]))
    if alive and _answers(str(state["url"]), timeout=5):
        return str(state["url"])
    if not alive:
        (prefect_home() / SERVER_STATE).unlink(missing_ok=True)
    return None


def use_local_server() -> str | None:
    """Point this process at the local server if one answers and no server was chosen already
    (PREFECT_API_URL wins). Call before Prefect is imported."""
    if os.environ.get("PREFECT_API_URL"):
        return None
    url = local_server()
    if url is not None:
        os.environ["PREFECT_API_URL"] = url
    return url


def start_local_server(port: int, timeout: float = SERVER_START_SECONDS) -> str:
    """Start Prefect's server on 127.0.0.1:`port` in a session of its own (it outlives this process),
    wait until it answers, and record it. Returns its API URL; an answering one is reused."""
    import json
    import time

    existing = local_server()
    if existing is not None:
        return existing
    if not _port_free(port):
        # Another server there would answer our health check while ours fails to bind and exits.
        raise RuntimeError(f"127.0.0.1:{port} is already in use; choose another port with --port")
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect = Path(sys.executable).parent / "prefect"
    command = [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with open(home / "int8flow-server.log", "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    (home / SERVER_STATE).write_text(json.dumps({"url": url, "pid": process.pid, "port": port}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            (home / SERVER_STATE).unlink(missing_ok=True)
            raise RuntimeError(
                f"Prefect's server exited with code {process.returncode}; see {home / 'int8flow-server.log'}"
            )
        if _answers(url, timeout=5):
            return url
        time.sleep(0.5)
    stop_local_server()
    raise RuntimeError(f"Prefect's server did not answer on {url} within {timeout:.0f} s")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # as uvicorn binds: connections of a server stopped a moment ago (TIME_WAIT) do not hold the port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_local_server(grace: float = 60.0) -> bool:
    """Stop the recorded server and everything it started (SIGTERM, SIGKILL after `grace`). False if
    none was recorded."""
    import time

    state = _read_state()
    if state is None:
        return False
    pid = int(state["pid"])
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)
        deadline = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child (tests)
            time.sleep(0.2)
        if not _alive(pid):
            break
    (prefect_home() / SERVER_STATE).unlink(missing_ok=True)
    return True
