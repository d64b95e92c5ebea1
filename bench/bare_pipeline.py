"""The same ONNX Runtime work as `int8flow run SPEC`, with no Prefect and no MLflow.

Used to measure the pipeline's overhead: export, pre-process, fusion, FP32 evaluation and profile,
calibration once per method, quantize + evaluate every variant on two worker threads (as the flow
does), profile one at a time, select. Same stage functions, data, variants and profiling settings;
nothing is logged or registered.

    python bench/bare_pipeline.py pipelines/mnist-cnn-int8.yaml
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
import tempfile
import time
from pathlib import Path

from flows.spec import StaticVariant
from flows.specfile import load_spec
from tasks.calibrate import calibrate, calibration_key
from tasks.data import load_dataset
from tasks.evaluate import evaluate, evaluate_model, run_model
from tasks.model import inspect_model
from tasks.preprocess import fuse_transformer, preprocess
from tasks.profile import input_feed, profile_pair, profile_single
from tasks.quantize import QUANTIZERS, quantize
from tasks.select import Candidate, select


def main(spec_file: str) -> None:
    started = time.perf_counter()
    spec_path = Path(spec_file).resolve()
    spec = load_spec(spec_path)
    base_dir = spec_path.parent
    with tempfile.TemporaryDirectory(prefix="bare-") as scratch:
        work = Path(scratch)
        tokenize = None
        model_path = spec.model.path if spec.model.source == "onnx" else None
        if spec.model.source != "onnx":
            from tasks.export import declared_input_dtypes, export_model, hf_tokenizer

            tokenize = hf_tokenizer(spec.model) if spec.model.source == "huggingface" else None
            data = load_dataset(spec.evaluation.data, declared_input_dtypes(spec.model), base_dir=base_dir, tokenize=tokenize)
            model_path = export_model(spec.model, data.batches, work / "exported.onnx", base_dir).path
        source = inspect_model(model_path)
        exported = spec.model.source != "onnx"
        pre = preprocess(source.path, spec.preprocess, work / "pre" / "model.onnx")
        eval_data = load_dataset(spec.evaluation.data, source.input_dtypes, base_dir=base_dir, tokenize=tokenize, ignore_extra_inputs=exported)
        reference = run_model(source.path, eval_data, spec.evaluation.output)
        fp32 = evaluate(reference, reference, eval_data, spec.evaluation.metrics)
        for batch_size in spec.profiling.batch_sizes:
            for threads in spec.profiling.threads:
                profile_single(source.path, input_feed(eval_data, batch_size), threads, spec.profiling.warmup, spec.profiling.runs)
        variants = spec.resolved_variants()
        graphs = {(False, False): source.path, (False, True): pre.path}
        if any(v.fused for v in variants):
            fused = fuse_transformer(source.path, spec.preprocess.transformer_fusion, work / "fused" / "model.onnx")
            graphs[(True, False)] = graphs[(True, True)] = fused.path
        ranges = {}
        keys = {calibration_key(v): v.fused for v in variants if isinstance(v, StaticVariant)}
        if keys and spec.calibration:
            calib = load_dataset(spec.calibration.data, source.input_dtypes, max_samples=spec.calibration.samples, base_dir=base_dir, tokenize=tokenize, ignore_extra_inputs=exported)
            ranges = {
                key: calibrate(graphs[(fused, True)], calib, key.split("@")[0], spec.calibration, work / f"{key}.json")
                for key, fused in keys.items()
            }
        def quantize_and_evaluate(variant):
            start = graphs[(variant.fused, QUANTIZERS[variant.kind].wants_preprocessed)]
            quantized = quantize(start, variant, ranges, work / str(variant.name) / "model.onnx", spec.preprocess.transformer_fusion)
            return quantized, evaluate_model(quantized.path, eval_data, reference, spec.evaluation.metrics, spec.evaluation.output)

        # two workers, as the flow's task runner: the comparison is orchestration, not concurrency
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {variant.name: pool.submit(quantize_and_evaluate, variant) for variant in variants}
        candidates = []
        for variant in variants:
            try:
                quantized, scores = futures[variant.name].result()
                pairs = [
                    profile_pair(source.path, quantized.path, input_feed(eval_data, b), t, spec.profiling.warmup, spec.profiling.runs)
                    for b in spec.profiling.batch_sizes
                    for t in spec.profiling.threads
                ]
                chosen = next(p for p in pairs if (p.batch_size, p.threads) == (spec.selection_batch_size, spec.selection_threads))
                candidates.append(Candidate(str(variant.name), scores.metrics, chosen.speedup, chosen.candidate.p50_ms, quantized.size_bytes))
            except Exception as error:  # same policy as the flow: a failed variant does not stop the others
                candidates.append(Candidate(str(variant.name), error=str(error)))
        result = select(candidates, fp32.metrics, spec.selection_metric, spec.selection)
    print(f"{result.summary}; wall {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
