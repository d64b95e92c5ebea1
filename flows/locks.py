"""A lock held across processes, through the Prefect API's global concurrency limits.

Used where two flow runs must not interleave a read-decide-write: the watcher's claims and the move of
a registry alias. The slot count lives in the Prefect server's database, so the lock holds for every
process that talks to the same server, and in the ephemeral default for processes that share a
`PREFECT_HOME` (each starts its own server on the same database). Processes with different homes and no
server share nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class LockTimeout(TimeoutError):
    """The lock stayed taken: almost always a slot leaked by a holder that was killed."""


def ensure_lock(name: str) -> None:
    """Create the global concurrency limit `name` with one slot, unless it exists."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    # another process may create it meanwhile
    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name=name, limit=1)


@contextlib.contextmanager
def exclusive(name: str, timeout_seconds: float = 300, lease_seconds: float = 60) -> Iterator[None]:
    """Hold the one slot of global concurrency limit `name` (created if missing)."""
    from prefect.concurrency.sync import concurrency

    ensure_lock(name)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(
                concurrency(name, occupy=1, strict=True, lease_duration=lease_seconds, timeout_seconds=timeout_seconds)
            )
        except TimeoutError as error:
            # Ephemeral Prefect servers run no lease repossessor: a holder killed (SIGKILL) inside the
            # lock leaves its slot taken in the shared PREFECT_HOME database until freed by hand.
            raise LockTimeout(
                f"the lock {name!r} stayed taken for {timeout_seconds:g} s; if a process was killed inside "
                f"it and no Prefect server expires leases, free it with `prefect gcl update {name} --active-slots 0`"
            ) from error
        yield
