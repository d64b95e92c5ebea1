"""FP32 vs the pipeline's promoted variant vs plain ONNX Runtime defaults, measured side by side.

All models of one flagship are timed in one process, round-robin on the same inputs with the same
session options, at batch 1 and 32 and 1 and 2 threads, by a loop of its own over plain
`onnxruntime.InferenceSession`s (not the pipeline's timing code, so it checks the pipeline's claims
independently); p50/p90, the speed-up (ratio of medians) with a 90 % bootstrap interval over rounds,
size, and the flagship's accuracy metric. The promoted variant is read from the MLflow
registry (`models:/<name>@champion`), so run the pipeline first against the same store:

    int8flow run pipelines/minilm-int8.yaml
    python bench/compare.py pipelines/minilm-int8.yaml --runs 30 --runs-b32 10 > /tmp/minilm.md
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, quantize_static

from int8flow.flows.specfile import load_spec
from int8flow.flows.tracking import MlflowStore
from int8flow.tasks.calibrate import DatasetReader
from int8flow.tasks.data import load_dataset
from int8flow.tasks.evaluate import evaluate_model, run_model
from int8flow.tasks.model import inspect_model, model_size_bytes
from int8flow.tasks.profile import input_feed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("spec")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model at batch 1")
    parser.add_argument("--runs-b32", type=int, default=10, help="timed runs per model at batch 32")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per model at batch 1 (1 at batch 32)")
    parser.add_argument("--ops", action="store_true", help="also: where the time goes, by op type, at b1 t1")
    args = parser.parse_args()
    spec_path = Path(args.spec).resolve()
    spec = load_spec(spec_path)
    work = Path(tempfile.mkdtemp(prefix="bench-"))

    tokenize = None
    if spec.model.source == "onnx":
        fp32 = spec.model.path
    else:
        from int8flow.tasks.export import declared_input_dtypes, export_model, hf_tokenizer

        tokenize = hf_tokenizer(spec.model) if spec.model.source == "huggingface" else None
        data = load_dataset(spec.evaluation.data, declared_input_dtypes(spec.model), tokenize=tokenize)
        fp32 = export_model(spec.model, data.batches, work / "fp32.onnx").path
    info = inspect_model(fp32)
    extra = spec.model.source != "onnx"
    evaluation = load_dataset(spec.evaluation.data, info.input_dtypes, tokenize=tokenize, ignore_extra_inputs=extra)
    calibration = load_dataset(
        spec.calibration.data,
        info.input_dtypes,
        max_samples=spec.calibration.samples,
        tokenize=tokenize,
        ignore_extra_inputs=extra,
    )

    store = MlflowStore(os.environ.get("MLFLOW_TRACKING_URI"))
    holder = store.holder(spec.registry.model_name, spec.registry.alias)
    models = {"FP32": fp32}
    if spec.preprocess.transformer_fusion is not None:
        # the pipeline's fused graph without int8: shows how much of the gain is fusion alone
        from int8flow.tasks.preprocess import fuse_transformer

        models["FP32 fused (pipeline's graph edits, no int8)"] = fuse_transformer(
            fp32, spec.preprocess.transformer_fusion, work / "fused" / "model.onnx"
        ).path
    if holder is not None:
        models[f"int8flow promoted (v{holder.version})"] = store.download_version(
            spec.registry.model_name, holder.version, work / "promoted"
        )
    # what a user gets from ORT's defaults, straight on the FP32 model
    quantize_dynamic(fp32, work / "plain_dynamic.onnx")
    models["plain quantize_dynamic (defaults)"] = work / "plain_dynamic.onnx"
    quantize_dynamic(fp32, work / "plain_dynamic_pc.onnx", per_channel=True)
    models["plain quantize_dynamic per_channel"] = work / "plain_dynamic_pc.onnx"
    quantize_static(fp32, work / "plain_static.onnx", DatasetReader(calibration))
    models["plain quantize_static (defaults, QDQ)"] = work / "plain_static.onnx"

    metric = spec.selection_metric
    reference = run_model(fp32, evaluation, spec.evaluation.output)
    scores = {
        name: evaluate_model(path, evaluation, reference, spec.evaluation.metrics, spec.evaluation.output).metrics
        for name, path in models.items()
    }
    configs = [(1, 1), (1, 2), (32, 1), (32, 2)]
    latency = {}
    for batch_size, threads in configs:
        runs, warmup = (args.runs, args.warmup) if batch_size == 1 else (args.runs_b32, 1)
        latency[(batch_size, threads)] = _interleaved(models, input_feed(evaluation, batch_size), threads, warmup, runs)

    shape = " x ".join(str(d) for d in next(iter(input_feed(evaluation, 1).values())).shape[1:])
    print(f"### {spec.name} (input per sample: {shape}; {metric.name} on {evaluation.samples} evaluation samples)\n")
    header = ["model", "MB", metric.name] + [f"b{b} t{t} p50 / p90 ms (speed-up)" for b, t in configs]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, path in models.items():
        cells = [name, f"{model_size_bytes(Path(path)) / 1e6:.1f}", _accuracy(scores[name], metric.name)]
        for config in configs:
            ms, base = latency[config][name], latency[config]["FP32"]
            low, high = _interval(base, ms)
            p50, p90 = np.percentile(ms, [50, 90])
            cells.append(f"{p50:.2f} / {p90:.2f} ({np.median(base) / p50:.2f}x [{low:.2f}-{high:.2f}])")
        print("| " + " | ".join(cells) + " |")
    if args.ops:
        _time_by_op({name: Path(path) for name, path in models.items() if "plain" not in name}, evaluation)


def _time_by_op(models: dict[str, Path], evaluation) -> None:
    """ORT's node profile of each model at batch 1, 1 thread: ms per run by op type (kernel time only)."""
    from int8flow.tasks.coverage import op_coverage

    coverages = {
        name: op_coverage(path, input_feed(evaluation, 1), threads=1, runs=20) for name, path in models.items()
    }
    ms = {
        name: {op: share * cov.node_ms_per_run for op, share in cov.op_time_share.items()}
        for name, cov in coverages.items()
    }
    ops = sorted(
        {op for times in ms.values() for op in times}, key=lambda op: -max(t.get(op, 0.0) for t in ms.values())
    )
    print("\nWhere the time goes at b1 t1 (ORT's node profile, ms per run by op type; kernels only):\n")
    print("| op type | " + " | ".join(models) + " |")
    print("|---|" + "---|" * len(models))
    for op in ops[:14]:
        print(f"| {op} | " + " | ".join(f"{ms[name].get(op, 0.0):.2f}" for name in models) + " |")
    print("| **all nodes** | " + " | ".join(f"**{coverages[name].node_ms_per_run:.2f}**" for name in models) + " |")


def _interleaved(models: dict, feed: dict, threads: int, warmup: int, runs: int) -> dict[str, np.ndarray]:
    """Milliseconds per run of each model, [rounds] each: one run of every model per round, in a rotating
    order, same session options (threads, sequential, all graph optimizations) and the same feed."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in models.items()
    }
    feeds = {name: {i.name: feed[i.name] for i in s.get_inputs()} for name, s in sessions.items()}
    names = list(models)
    for _ in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            sessions[name].run(None, feeds[name])
            times[name].append((time.perf_counter() - started) * 1000)
    return {name: np.array(values) for name, values in times.items()}


def _interval(base: np.ndarray, other: np.ndarray, draws: int = 1000) -> tuple[float, float]:
    """90 % bootstrap interval of median(base) / median(other), resampling whole rounds together."""
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(base), (draws, len(base)))
    ratios = np.median(base[picks], axis=1) / np.median(other[picks], axis=1)
    low, high = np.percentile(ratios, [5, 95])
    return float(low), float(high)


def _accuracy(scores: dict[str, float], name: str) -> str:
    text = f"{scores[name]:.4f}"
    if name == "cosine" and "cosine_min" in scores:
        text += f" (min {scores['cosine_min']:.3f})"
    return text


if __name__ == "__main__":
    main()
