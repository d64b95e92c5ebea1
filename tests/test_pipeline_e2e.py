"""The real flow end to end: ephemeral Prefect, MLflow on a temp SQLite store, real ORT sessions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from int8flow.flows.cli import app

pytestmark = pytest.mark.e2e
runner = CliRunner()


def spec_file(directory: Path, digits_model, **overrides: str) -> Path:
    sections = {
        "selection": "selection: {metric: top1, max_drop: 0.02, min_speedup: 0.0, objective: size}",
        "registry": "registry: {model_name: digits-mlp}",
        "profiling": "profiling: {batch_sizes: [1, 16], threads: [1], warmup: 2, runs: 10}",
    } | overrides
    text = (
        textwrap.dedent(
            f"""\
        name: digits-e2e
        model: {{source: onnx, path: {digits_model.model}}}
        calibration: {{data: {{path: {digits_model.calibration}}}, method: minmax, samples: 64}}
        evaluation:
          data: {{path: {digits_model.evaluation}, batch_size: 64}}
          metrics: [top1, cosine, mae]
        variants:
          - kind: dynamic
            grid: {{per_channel: [false, true]}}
          - kind: static
            per_channel: true
          - kind: fp16
          - kind: static
            name: deliberately-broken
            format: QOperator
            activation_type: QInt8
            weight_type: QUInt8
        """
        )
        + "\n".join(sections.values())
        + "\n"
    )
    path = directory / "digits.yaml"
    path.write_text(text)
    return path


def runs_of(client: MlflowClient, experiment_name: str):
    experiment = client.get_experiment_by_name(experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_pipeline_logs_every_variant_registers_and_promotes_once(tmp_path, digits_model, mlflow_store):
    path = spec_file(tmp_path, digits_model)

    # when the pipeline runs through the CLI
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_store)

    # then one parent run with the baseline, the environment and the summary
    parents, children = runs_of(client, "digits-e2e")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["fp32.top1"] == pytest.approx(digits_model.fp32_top1)
    assert {"fp32.b1_t1_p50_ms", "fp32.b16_t1_p99_ms", "variants_failed"} <= set(parent.data.metrics)
    assert parent.data.metrics["variants_failed"] == 1
    tags = parent.data.tags
    assert len(tags["int8flow.source_sha256"]) == 64 and tags["int8flow.onnxruntime_version"]
    assert tags["int8flow.cpu.avx2"] in ("true", "false")
    assert parent.data.params["spec.variants.0.name"] == "dynamic-pt"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert artifacts == {"summary/variants.csv", "summary/accuracy_vs_latency.png", "summary/report.html"}
    # the parent run's description is the report: the verdict, then every variant with its verdict
    description = tags["mlflow.note.content"]
    assert (
        description.startswith(f"**Selected `{tags['int8flow.selected']}`**")
        and "x** FP32 (90 % interval" in description
    )
    assert "| variant | top1 | drop |" in description and "deliberately-broken" in description

    # and one nested run per variant; the broken one FAILED with its error, the rest finished
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {
        "dynamic-pt",
        "dynamic-pc",
        "static-pc-minmax",
        "fp16",
        "deliberately-broken",
    }
    broken = by_name.pop("deliberately-broken")
    assert broken.info.status == "FAILED"
    assert "doesn't support data format" in broken.data.tags["int8flow.error"]
    for name, run in by_name.items():
        assert run.info.status == "FINISHED", name
        metrics = run.data.metrics
        assert {
            "top1",
            "top1_drop",
            "cosine",
            "mae",
            "b1_t1_p50_ms",
            "b16_t1_p90_ms",
            "b1_t1_speedup",
            "size_mb",
            "compression_ratio",
        } <= set(metrics)
        assert client.list_artifacts(run.info.run_id, "quantized")
    assert by_name["static-pc-minmax"].data.metrics["ops.count.integer"] >= 2
    assert by_name["dynamic-pc"].data.params["per_channel"] == "true"

    # the smallest eligible variant is selected (objective: size), registered, and holds the alias
    selected = [run for run in by_name.values() if run.data.tags["int8flow.selected"] == "true"]
    assert len(selected) == 1
    eligible = [run for run in by_name.values() if run.data.tags["int8flow.eligible"] == "true"]
    assert len(eligible) >= 2, "the choice must be between several variants"
    assert selected[0].data.metrics["size_mb"] == min(run.data.metrics["size_mb"] for run in eligible)
    assert tags["int8flow.selected"] == selected[0].info.run_name
    versions = client.search_model_versions("name='digits-mlp'")
    assert len(versions) == 1 and versions[0].run_id == selected[0].info.run_id
    champion = client.get_model_version_by_alias("digits-mlp", "champion")
    assert champion.version == versions[0].version

    # when the same spec runs again on the same model, no identical version is added
    again = runner.invoke(app, ["run", str(path)])
    assert again.exit_code == 0, again.output
    assert len(client.search_model_versions("name='digits-mlp'")) == 1
    assert client.get_model_version_by_alias("digits-mlp", "champion").version == champion.version
    parents, _ = runs_of(client, "digits-e2e")
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)


def test_nothing_promoted_when_no_variant_meets_constraints(tmp_path, digits_model, mlflow_store):
    impossible = "selection: {metric: top1, max_drop: 0.0, min_speedup: 50.0}"
    # every variant timed, also those that miss max_drop (which ones do depends on the CPU's int8 kernels)
    timed = "profiling: {batch_sizes: [1, 16], threads: [1], warmup: 2, runs: 10, all_variants: true}"
    result = runner.invoke(app, ["run", str(spec_file(tmp_path, digits_model, selection=impossible, profiling=timed))])
    assert result.exit_code == 0, result.output
    assert "none meets the constraints" in result.output and "nothing promoted" in result.output
    client = MlflowClient(mlflow_store)
    parents, children = runs_of(client, "digits-e2e")
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["int8flow.selected"] == "none"
    assert all(run.data.tags["int8flow.selected"] == "false" for run in children)
    verdicts = {run.info.run_name: run.data.tags["int8flow.verdict"] for run in children}
    assert verdicts.pop("deliberately-broken").startswith("failed: quantize")
    assert all("speed-up" in verdict and "< min_speedup 50x" in verdict for verdict in verdicts.values())
    assert client.search_registered_models() == []


def test_bad_spec_exits_2_and_writes_nothing(tmp_path, digits_model, mlflow_store):
    path = spec_file(tmp_path, digits_model)
    path.write_text(path.read_text().replace("per_channel: true", "per_channel: sometimes"))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert f"{path}:11: variants[1].per_channel" in result.output
    assert not (tmp_path / "mlflow.db").exists()


def test_data_that_does_not_fit_the_model_exits_2_before_any_run(tmp_path, digits_model, mlflow_store):
    import numpy as np

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, image=np.zeros((4, 64), np.float32))  # the model's input is called `pixels`
    path = spec_file(tmp_path, digits_model)
    path.write_text(path.read_text().replace(str(digits_model.evaluation), str(wrong)))
    # the data file's array headers are checked against the model's inputs before anything is created
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert (
        f"{path}:5: evaluation.data.path: wrong.npz: arrays ['image'] do not match the model inputs ['pixels']"
        in result.output
    )
    assert (
        not (tmp_path / "mlflow.db").exists() or MlflowClient(mlflow_store).get_experiment_by_name("digits-e2e") is None
    )


def test_data_that_only_the_run_can_read_exits_2_with_a_failed_run(tmp_path, digits_model, mlflow_store):
    (tmp_path / "wrongdata.py").write_text(
        "import numpy as np\ndef batches():\n    yield {'image': np.zeros((4, 64), np.float32)}, np.zeros(4, np.int64)\n"
    )
    path = spec_file(tmp_path, digits_model)
    path.write_text(path.read_text().replace(f"path: {digits_model.evaluation}", "callable: wrongdata:batches"))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "wrongdata:batches: data does not match the model inputs ['pixels']" in result.output
    client = MlflowClient(mlflow_store)
    parents, children = runs_of(client, "digits-e2e")
    assert [p.info.status for p in parents] == ["FAILED"] and not children
    assert "DataError" in parents[0].data.tags["int8flow.error"]
    assert client.search_registered_models() == []


def test_alias_stays_with_a_better_holder_and_is_not_compared_across_evaluation_sets(
    tmp_path, digits_model, mlflow_store
):
    client = MlflowClient(mlflow_store)
    # given a champion: the smallest variant (dynamic int8) of a first run
    first = runner.invoke(app, ["run", str(spec_file(tmp_path, digits_model))])
    assert first.exit_code == 0, first.output
    champion = client.get_model_version_by_alias("digits-mlp", "champion")

    # when a later run can only offer fp16 (bigger) on the same evaluation data
    only_fp16 = spec_file(tmp_path, digits_model)
    text = only_fp16.read_text()
    variants = text[text.index("variants:") : text.index("selection:")]
    only_fp16.write_text(text.replace(variants, "variants:\n  - kind: fp16\n"))
    second = runner.invoke(app, ["run", str(only_fp16)])
    # then fp16 is registered as its own version, but the alias stays with the better holder
    assert second.exit_code == 0, second.output
    assert "@champion unchanged" in second.output and "new size" in second.output
    assert len(client.search_model_versions("name='digits-mlp'")) == 2
    assert client.get_model_version_by_alias("digits-mlp", "champion").version == champion.version

    # when the evaluation data differs, the versions are not compared at all
    fewer = only_fp16.read_text().replace("batch_size: 64}", "batch_size: 64, limit: 200}")
    only_fp16.write_text(fewer)
    third = runner.invoke(app, ["run", str(only_fp16)])
    assert third.exit_code == 0, third.output
    assert "evaluated on different data" in third.output and "not compared" in third.output
    assert client.get_model_version_by_alias("digits-mlp", "champion").version == champion.version
