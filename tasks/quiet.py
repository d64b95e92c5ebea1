"""Third-party prints off the console: what a library `print()`s inside `quiet_prints()` goes to logging.

ORT's calibrators print progress lines straight to stdout; stages wrap such calls. Only the thread
inside the block is redirected (a proxy decides per thread), so console lines from other threads
(the flow's progress) still reach the console while two calibrations run at once.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

_state = threading.local()
_logger = logging.getLogger("int8flow.stdout")


class _PerThreadStdout:
    def __init__(self, stream: Any):
        self.stream = stream

    def write(self, text: str) -> int:
        if getattr(_state, "quiet", False):
            if text.strip():
                _logger.info(text.rstrip())
            return len(text)
        return int(self.stream.write(text))

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    if not isinstance(sys.stdout, _PerThreadStdout):
        sys.stdout = _PerThreadStdout(sys.stdout)
    _state.quiet = True
    try:
        yield
    finally:
        _state.quiet = False
