"""Named points where the fault tests end the process the hard way, as a kill -9 would.

`INT8FLOW_FAULT_AT=<point>` makes the process SIGKILL itself when it reaches `point(<point>)`: the
tests use it to stop a real run at a known place (before the variants, inside a variant, inside
registration) and then check that the next run finds a consistent store. Nothing happens without it.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "INT8FLOW_FAULT_AT"


def point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
