"""How the pipeline's stages are run: as Prefect tasks (the flow), or as plain calls (the bare benchmark).

The pipeline (`flows.pipeline.run_pipeline`) names each stage and hands it to a runner; this is the one
place where stage functions become Prefect tasks (names, no caching, task-run names), so `tasks/`
stays free of Prefect and the bare pipeline runs exactly the same plan and code without it.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Outcome(Protocol[T]):  # type: ignore[misc]
    """A submitted stage: Prefect's PrefectFuture or a concurrent.futures.Future."""

    def result(self) -> T: ...


class Runner(Protocol):
    def call(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> T:
        """Run `function` now, as stage `stage` (`label` tells runs of one stage apart)."""
        ...

    def submit(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> Outcome[T]:
        """Run `function` concurrently with other submitted stages (two at a time on two cores)."""
        ...


class PrefectRunner:
    """Stages as Prefect tasks of the running flow (its task runner decides where submitted ones go)."""

    def __init__(self) -> None:
        self._tasks: dict[tuple[str, Callable[..., Any]], Any] = {}

    def _task(self, stage: str, function: Callable[..., Any], label: str) -> Any:
        from prefect import task
        from prefect.cache_policies import NO_CACHE

        key = (stage, function)
        if key not in self._tasks:
            # Inputs hold numpy arrays and paths in temp dirs: caching them would only log hashing errors.
            self._tasks[key] = task(name=stage, cache_policy=NO_CACHE, persist_result=False)(function)
        return self._tasks[key].with_options(task_run_name=f"{stage}[{label}]" if label else stage)

    def call(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> T:
        return self._task(stage, function, label)(*args, **kwargs)

    def submit(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> Outcome[T]:
        return self._task(stage, function, label).submit(*args, **kwargs)


class InlineRunner:
    """Plain calls, submitted ones on two worker threads: the pipeline without any orchestrator."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="int8flow-stage")

    def call(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> T:
        return function(*args, **kwargs)

    def submit(self, stage: str, function: Callable[..., T], *args: Any, label: str = "", **kwargs: Any) -> Outcome[T]:
        return self._pool.submit(function, *args, **kwargs)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
