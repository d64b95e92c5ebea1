"""Wall time and memory of one command, over time: the command's own process and its whole process tree.

    .venv/bin/python bench/watch_rss.py OUT_DIR -- .venv/bin/int8flow run pipelines/minilm-int8.yaml

`/usr/bin/time` reports the largest single process; a run's memory also lives in its children (the
export's child process, the ephemeral Prefect server). This samples the resident set of the command's
process and of its whole tree (psutil, every 0.25 s), writes `OUT_DIR/rss.log` (seconds, main MB, tree
MB) and `OUT_DIR/out.log` (the command's output lines with the second each appeared, to tell which stage
a peak belongs to), and prints one line: exit code, wall seconds, peak main and peak tree with when.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def _sample(pid: int, started: float, samples: list[tuple[float, float, float]], done: threading.Event) -> None:
    root = psutil.Process(pid)
    while not done.is_set():
        try:
            sizes = {}
            for process in [root, *root.children(recursive=True)]:
                try:
                    sizes[process.pid] = process.memory_info().rss / 2**20
                except psutil.Error:
                    continue
            samples.append((time.time() - started, sizes.get(pid, 0.0), sum(sizes.values())))
        except psutil.Error:
            return
        time.sleep(0.25)


def main(out: Path, command: list[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    samples: list[tuple[float, float, float]] = []
    done = threading.Event()
    sampler = threading.Thread(target=_sample, args=(process.pid, started, samples, done), daemon=True)
    sampler.start()
    assert process.stdout is not None
    with open(out / "out.log", "w") as lines:
        for line in process.stdout:
            lines.write(f"{time.time() - started:7.1f} {line}")
    process.wait()
    wall = time.time() - started
    done.set()
    sampler.join()
    (out / "rss.log").write_text("".join(f"{t:.1f} {main:.0f} {tree:.0f}\n" for t, main, tree in samples))
    main_peak = max(samples, key=lambda s: s[1], default=(0.0, 0.0, 0.0))
    tree_peak = max(samples, key=lambda s: s[2], default=(0.0, 0.0, 0.0))
    print(
        f"exit {process.returncode}, wall {wall:.1f} s, peak RSS: the command's process {main_peak[1]:.0f} MB "
        f"(at {main_peak[0]:.0f} s), its process tree {tree_peak[2]:.0f} MB (at {tree_peak[0]:.0f} s)"
    )
    return process.returncode


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if len(arguments) < 3 or arguments[1] != "--":
        sys.exit(__doc__)
    sys.exit(main(Path(arguments[0]), arguments[2:]))
