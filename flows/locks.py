"""A lock held across processes, which cannot outlive its holder, and says who holds it.

Used where two runs must not interleave a read-decide-write: the watcher's claims and the registry's
version and alias. Two implementations, chosen by where the processes meet:
- with a Prefect server (`PREFECT_API_URL`): a Prefect global concurrency limit of one slot, taken with
  a lease (60 s, renewed while held). The server's lease repossessor frees the slot of a holder that
  died, so a killed process blocks others for about a minute, not forever;
- without one (the embedded default, one machine): an `flock` on a file under `$PREFECT_HOME/int8flow-locks/`.
  The kernel releases it the moment its holder dies, however it dies.
Either way the holder writes who it is (host, pid, what for, since when) where a waiter can read it, and a
waiter says so while it waits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LEASE_SECONDS = 60  # Prefect's minimum; renewed every 45 s while held
POLL_SECONDS = 0.5
TELL_AFTER_SECONDS = 5.0


class LockTimeout(TimeoutError):
    """The lock stayed taken, by a live holder, for longer than the caller would wait."""


def _holder(purpose: str) -> dict[str, object]:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "for": purpose,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _describe(holder: object) -> str:
    if not isinstance(holder, dict) or not holder:
        return "an unknown holder"
    return f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('for')}, since {holder.get('since')})"


def _safe(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())[:100]


@contextlib.contextmanager
def exclusive(
    name: str, timeout_seconds: float = 900, purpose: str = "", on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold lock `name` for the block; `on_wait(text)` is told once who holds it if we have to wait."""
    from prefect.settings import PREFECT_API_URL

    lock = _server_lock if PREFECT_API_URL.value() else _file_lock
    with lock(_safe(name), timeout_seconds, _holder(purpose), on_wait or (lambda _text: None)):
        yield


def lock_folder() -> Path:
    from prefect.settings import get_current_settings

    folder = Path(get_current_settings().home) / "int8flow-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextlib.contextmanager
def _file_lock(
    name: str, timeout_seconds: float, holder: dict[str, object], on_wait: Callable[[str], None]
) -> Iterator[None]:
    path = lock_folder() / f"{name}.lock"
    with open(path, "a+") as handle:
        started, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                current = _read_holder(path)
                if not told and time.monotonic() - started > TELL_AFTER_SECONDS:
                    on_wait(f"waiting for lock {name!r}, held by {_describe(current)}")
                    told = True
                if time.monotonic() - started > timeout_seconds:
                    raise LockTimeout(
                        f"lock {name!r} stayed taken for {timeout_seconds:g} s by {_describe(current)}"
                    ) from None
                time.sleep(POLL_SECONDS)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(holder))
            handle.flush()
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_holder(path: Path) -> dict[str, object] | None:
    with contextlib.suppress(OSError, ValueError):
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    return None


@contextlib.contextmanager
def _server_lock(
    name: str, timeout_seconds: float, holder: dict[str, object], on_wait: Callable[[str], None]
) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency
    from prefect.variables import Variable

    limit = f"int8flow-{name}"
    ensure_limit(limit)
    started, told = time.monotonic(), False
    while True:
        held = contextlib.ExitStack()
        try:
            # short attempts, so that a waiter can say who it waits for and give up on its own clock
            held.enter_context(
                concurrency(limit, occupy=1, strict=True, lease_duration=LEASE_SECONDS, timeout_seconds=10)
            )
            break
        except TimeoutError:
            current = None
            with contextlib.suppress(Exception):
                current = Variable.get(limit)
            if not told and time.monotonic() - started > TELL_AFTER_SECONDS:
                on_wait(
                    f"waiting for lock {name!r}, held by {_describe(current)}; a dead holder's lease expires within {LEASE_SECONDS} s"
                )
                told = True
            if time.monotonic() - started > timeout_seconds:
                raise LockTimeout(
                    f"lock {name!r} stayed taken for {timeout_seconds:g} s by {_describe(current)}"
                ) from None
    with held:
        with contextlib.suppress(Exception):  # who holds it is for waiters' messages only
            Variable.set(limit, holder, overwrite=True)
        yield


def ensure_limit(name: str) -> None:
    """Create the global concurrency limit `name` with one slot, unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    # another process may create it meanwhile
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name=name, limit=1)
