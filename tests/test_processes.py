"""The suite's own guard against processes left behind, shown to see what it must see."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import SESSION_MARK, end_processes, marked_processes


def test_processes_started_by_the_suite_carry_its_mark_and_are_ended():
    # given a process started the way tests start servers and workers (inheriting the environment),
    # and one started with a scrubbed environment (not ours to end)
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    theirs = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={k: v for k, v in os.environ.items() if k != "INT8FLOW_TEST_SESSION"},
    )
    try:
        assert os.environ["INT8FLOW_TEST_SESSION"] == SESSION_MARK
        found = marked_processes()
        # then the guard sees the first, with its parent, and not the second
        assert found[ours.pid][0] == os.getpid()
        assert theirs.pid not in found
        end_processes([ours.pid], grace_seconds=5)
        assert ours.wait(timeout=30) is not None
        assert ours.pid not in marked_processes()
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait(timeout=30)
