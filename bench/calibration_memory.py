"""Peak memory of calibration against the number of samples (issue 17: flat from 100 to 2,000 samples).

    .venv/bin/python bench/calibration_memory.py [--samples 100 2000] [--methods minmax percentile]

Each measurement runs `tasks.calibrate.calibrate` in a fresh process on the MNIST flagship's CNN
(exported once from its checkpoint; inputs [1, 28, 28], 3 KB a sample, so the data set itself stays
small and what grows is what calibration keeps) on random images (memory does not depend on what they
show), one sample per batch, and reports that process's peak RSS (`ru_maxrss`). `--ort` also runs ORT's
own way: one `collect_data` call over all samples, which holds every calibrated tensor of every sample
until it ends, in ORT's own session (default node order). Prints a markdown table.

    .venv/bin/python bench/calibration_memory.py --model minilm --samples 128 --methods minmax percentile --ort 128

`--model minilm`: the MiniLM flagship's graph as the pipeline makes it (exported, repaired: 209 calibrated
tensors) on the spec's own calibration sentences at its batch size (16), where ORT's node order is what
costs memory: its augmented model reduces each tensor to its range late, so every activation stays alive.
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


def export_mnist(out: Path) -> Path:
    """The MNIST flagship's CNN as ONNX, exported from its checkpoint as the pipeline does."""
    import numpy as np

    from int8flow.flows.specfile import load_spec
    from int8flow.tasks.data import Batch
    from int8flow.tasks.export import export_model

    spec = load_spec(ROOT / "pipelines" / "mnist-cnn-int8.yaml")
    batch = Batch(inputs={"images": np.zeros((2, 1, 28, 28), np.float32)})
    return export_model(spec.model, [batch], out).path


def export_minilm(out: Path) -> Path:
    """The MiniLM flagship's graph as the pipeline makes it: exported and repaired."""
    from int8flow.flows import steps
    from int8flow.flows.specfile import load_spec
    from int8flow.tasks.data import load_dataset
    from int8flow.tasks.export import declared_input_dtypes, export_model
    from int8flow.tasks.repair import repair_model

    spec = load_spec(ROOT / "pipelines" / "minilm-int8.yaml")
    data = load_dataset(spec.evaluation.data, declared_input_dtypes(spec.model), tokenize=steps.tokenizer(spec))
    exported = export_model(spec.model, data.batches[:1], out.parent / "exported" / "model.onnx")
    return repair_model(exported.path, out, spec.model.export.opset, {}).path


def one_minilm(model: Path, method: str, samples: int, ort_way: bool) -> None:
    from int8flow.flows import steps
    from int8flow.flows.specfile import load_spec
    from int8flow.tasks import calibrate as calibration
    from int8flow.tasks.data import load_dataset
    from int8flow.tasks.model import inspect_model

    spec = load_spec(ROOT / "pipelines" / "minilm-int8.yaml")
    assert spec.calibration is not None
    source = inspect_model(model)
    dataset = load_dataset(
        spec.calibration.data,
        source.input_dtypes,
        max_samples=samples,
        tokenize=steps.tokenizer(spec),
        ignore_extra_inputs=True,
        input_shapes=source.input_shapes,
    )
    if ort_way:
        calibration.FEEDS_PER_COLLECT = dict.fromkeys(calibration.FEEDS_PER_COLLECT, 10**9)
        calibration.LEAN_SESSION = False  # ORT's own session and node order
    options = spec.calibration.model_copy(update={"method": method})
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        calibration.calibrate(model, dataset, method, options, Path(folder) / "ranges.json")
        seconds = time.perf_counter() - started
    print(f"{seconds:.1f} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")


def one(model: Path, method: str, samples: int, ort_way: bool) -> None:
    """Calibrate once in this process and print `seconds peak_mb`."""
    import numpy as np

    from int8flow.tasks import calibrate as calibration
    from int8flow.tasks.data import DataSource, load_dataset

    if model.parent.name == "minilm":
        one_minilm(model, method, samples, ort_way)
        return
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "images.npz"
        rng = np.random.default_rng(0)
        np.savez(data, images=rng.random((samples, 1, 28, 28)).astype(np.float32))
        dataset = load_dataset(DataSource(path=data, batch_size=1), {"images": np.dtype(np.float32)})
        if ort_way:  # one collect_data call over every sample, as quantize_static does, in ORT's session
            calibration.FEEDS_PER_COLLECT = dict.fromkeys(calibration.FEEDS_PER_COLLECT, 10**9)
            calibration.LEAN_SESSION = False
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
    parser.add_argument("--model", choices=["mnist", "minilm"], default="mnist")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(Path(args.one[0]), args.one[1], int(args.one[2]), args.one[3] == "ort")
        return
    scratch = Path(tempfile.mkdtemp(prefix="calibration-memory-"))
    model = (
        export_minilm(scratch / "minilm" / "model.onnx")
        if args.model == "minilm"
        else export_mnist(scratch / "mnist.onnx")
    )
    print(f"`.venv/bin/python bench/calibration_memory.py {' '.join(sys.argv[1:])}` on {time.strftime('%Y-%m-%d')}\n")
    print("| method | samples | way | seconds | peak RSS MB |")
    print("|---|---|---|---|---|")
    runs = [(m, n, "int8flow") for m in args.methods for n in args.samples]
    runs += [(m, n, "ort") for m in args.methods for n in args.ort]
    for method, samples, way in runs:
        done = subprocess.run(
            [sys.executable, __file__, "--one", str(model), method, str(samples), way],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        seconds, peak = done.stdout.split()[-2:] if done.returncode == 0 else ("failed", done.stderr[-200:])
        print(f"| {method} | {samples} | {way} | {seconds} | {peak} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
