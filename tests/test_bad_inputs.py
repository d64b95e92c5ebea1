"""A corpus of malformed specs and inputs, each checked for one clear error: exit code 2, the problem
named (file, line and field where it comes from the spec), no traceback, nothing registered, no run left
RUNNING, and no hang (the cases that used to hang run in a subprocess with a time limit).

The corpus is generated from one valid spec beside a real model and real data; each case changes one
thing, the way a new (or careless) user would.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from int8flow.flows.cli import app

runner = CliRunner()
BIN = Path(sys.executable).parent
VALID = {
    "name": "bad-inputs",
    "model": {"source": "onnx", "path": "model.onnx"},
    "calibration": {"data": {"path": "calibration.npz"}, "samples": 32},
    "evaluation": {"data": {"path": "evaluation.npz", "batch_size": 64}, "metrics": ["top1", "cosine"]},
    "variants": [{"kind": "dynamic"}],
    "selection": {"metric": "top1", "max_drop": 0.05, "min_speedup": 0.0},
    "profiling": {"warmup": 1, "runs": 3},
    "registry": {"model_name": "bad-inputs"},
}

Edit = Callable[[dict], dict]


def _set(path: str, value: object) -> Edit:
    def edit(spec: dict) -> dict:
        node = spec
        keys = path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(keys[-1])] = value
        else:
            node[keys[-1]] = value
        return spec

    return edit


def _drop(path: str) -> Edit:
    def edit(spec: dict) -> dict:
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[key]
        del node[last]
        return spec

    return edit


# name -> (how to change the valid spec, fragments the one error must contain)
SPEC_CASES: dict[str, tuple[Edit, list[str]]] = {
    "unknown_top_key": (_set("evaluaton", {}), ["evaluaton", "did you mean 'evaluation'"]),
    "unknown_nested_key": (
        _set("variants.0.per_chanel", True),
        ["variants[0].per_chanel", "did you mean 'per_channel'"],
    ),
    "wrong_type_bool": (_set("variants.0.per_channel", "sometimes"), ["variants[0].per_channel", "valid boolean"]),
    "wrong_type_int": (_set("profiling.runs", "many"), ["profiling.runs", "valid integer"]),
    "negative_batch": (
        _set("evaluation.data.batch_size", -4),
        ["evaluation.data.batch_size", "greater than or equal to 1"],
    ),
    "huge_batch": (
        _set("profiling.batch_sizes", [300_000_000]),
        ["profiling.batch_sizes[0]", "less than or equal to 4096"],
    ),
    "huge_warmup": (_set("profiling.warmup", 10**12), ["profiling.warmup", "less than or equal to 1000"]),
    "huge_runs": (_set("profiling.runs", 10**9), ["profiling.runs", "less than or equal to 10000"]),
    "huge_threads": (_set("profiling.threads", [10_000]), ["profiling.threads[0]", "less than or equal to 256"]),
    "huge_timing_budget": (
        _set("profiling.max_seconds", 10**7),
        ["profiling.max_seconds", "less than or equal to 3600"],
    ),
    "huge_samples": (_set("calibration.samples", 10**9), ["calibration.samples", "less than or equal to 1000000"]),
    "huge_fallback_steps": (_set("fallback", {"max_steps": 10**6}), ["fallback.max_steps", "less than or equal to 64"]),
    "huge_fallback_seconds": (
        _set("fallback", {"max_seconds": 10**9}),
        ["fallback.max_seconds", "less than or equal to 86400"],
    ),
    "big_grid": (
        _set(
            "variants.0.grid",
            {"per_channel": [True, False] * 5, "reduce_range": [True, False] * 5, "op_types": [["MatMul"]] * 10},
        ),
        ["variants[0]", "this grid makes 1000 variants; at most 64"],
    ),
    "too_many_variants": (
        _set("variants", [{"kind": "fp32", "name": f"v{i}"} for i in range(200)]),
        ["variants", "at most 128"],
    ),
    "grid_key_unknown": (
        _set("variants.0.grid", {"block_size": [32]}),
        ["grid key 'block_size' is not an option of kind 'dynamic'"],
    ),
    "grid_empty": (_set("variants.0.grid", {"per_channel": []}), ["grid key 'per_channel' needs at least one value"]),
    "registry_slash": (_set("registry.model_name", "team/model"), ["registry.model_name", "should match pattern"]),
    "registry_quote": (_set("registry.model_name", "o'brien"), ["registry.model_name", "should match pattern"]),
    "alias_latest": (_set("registry.alias", "latest"), ["registry.alias", "reserved by MLflow"]),
    "alias_version": (_set("registry.alias", "v1"), ["registry.alias", "reserved by MLflow"]),
    "alias_version_upper": (_set("registry.alias", "V12"), ["registry.alias", "reserved by MLflow"]),
    "alias_space": (_set("registry.alias", "my alias"), ["registry.alias", "should match pattern"]),
    "model_missing": (_set("model.path", "nope.onnx"), ["model.path", "no such file or folder"]),
    "model_folder": (_set("model.path", "folder.onnx"), ["model.path", "is a folder"]),
    "model_suffix": (_set("model.path", "evaluation.npz"), ["model.path", "expected an .onnx file"]),
    "model_empty": (_set("model.path", "empty.onnx"), ["model.path", "is empty, not an ONNX model"]),
    "model_text": (_set("model.path", "text.onnx"), ["model.path", "is not an ONNX model"]),
    "model_random": (_set("model.path", "random.onnx"), ["model.path", "is not an ONNX model"]),
    "model_truncated": (_set("model.path", "truncated.onnx"), ["model.path", "not an ONNX model"]),
    "data_missing": (_set("evaluation.data.path", "nope.npz"), ["evaluation.data.path", "no such file or folder"]),
    "data_two_sources": (
        _set("evaluation.data.callable", "baddata:batches"),
        ["evaluation.data", "give exactly one of"],
    ),
    "data_wrong_names": (
        _set("evaluation.data.path", "wrong_names.npz"),
        ["evaluation.data.path", "do not match the model inputs"],
    ),
    "data_wrong_rank": (
        _set("evaluation.data.path", "wrong_rank.npz"),
        ["evaluation.data.path", "the model's input 'pixels' is rank 2"],
    ),
    "data_strings": (_set("evaluation.data.path", "strings.npz"), ["evaluation.data.path", "holds <U"]),
    "data_complex": (_set("evaluation.data.path", "complex.npz"), ["evaluation.data.path", "holds complex64"]),
    "data_pickled_npy": (_set("evaluation.data.path", "pickled"), ["evaluation.data.path", "pickled Python objects"]),
    "data_not_numpy": (_set("evaluation.data.path", "notnumpy"), ["evaluation.data.path", "is not a NumPy"]),
    "top1_without_labels": (
        _set("evaluation.data.path", "no_labels.npz"),
        ["evaluation.metrics[0]", "top1 needs labels"],
    ),
    "calibration_wrong_names": (
        _set("calibration.data.path", "wrong_names.npz"),
        ["calibration.data.path", "do not match the model inputs"],
    ),
    "output_unknown": (
        _set("evaluation.output", "no_such_output"),
        ["evaluation.output", "the model has no output 'no_such_output'"],
    ),
    "callable_module_missing": (
        _set("evaluation.data", {"callable": "no_such_module:batches"}),
        ["evaluation.data.callable", "cannot find module"],
    ),
    "callable_bad_syntax": (
        _set("evaluation.data", {"callable": "baddata.batches"}),
        ["evaluation.data.callable", "should match pattern"],
    ),
    "metric_unknown": (_set("evaluation.metrics", ["top5"]), ["evaluation.metrics[0]", "unknown metric 'top5'"]),
    "metric_duplicate": (_set("evaluation.metrics", ["cosine", "cosine"]), ["metric names must be unique"]),
    "metric_builtin_with_function": (
        _set("evaluation.metrics", [{"name": "cosine", "function": "baddata:score"}]),
        ["is a built-in metric"],
    ),
    "selection_metric_unknown": (
        _set("selection.metric", "mae"),
        ["selection.metric", "'mae' is not an evaluation metric"],
    ),
    "selection_batch_unprofiled": (
        _set("selection.batch_size", 8),
        ["selection.batch_size", "8 is not in profiling.batch_sizes"],
    ),
    "static_without_calibration": (
        lambda s: _set("variants", [{"kind": "static"}])(_drop("calibration")(s)),
        ["variants[0].kind", "need a `calibration:` section"],
    ),
    "fused_without_fusion": (
        _set("variants.0.fused", True),
        ["variants[0].fused", "need `preprocess.transformer_fusion`"],
    ),
    "qat_on_onnx": (_set("variants", [{"kind": "qat"}]), ["variants[0].kind", "qat variants train the PyTorch model"]),
    "duplicate_names": (
        _set("variants", [{"kind": "dynamic"}, {"kind": "dynamic", "reduce_range": True}]),
        ["variants[1].name", "is also variants[0]'s"],
    ),
    "kind_unknown": (_set("variants.0.kind", "statik"), ["unknown kind 'statik'", "did you mean 'static'"]),
    "kind_missing": (_set("variants", [{"per_channel": True}]), ["variants[0]", "kind"]),
    "saturating_on_avx2": (
        lambda s: _set("target", {"preset": "avx2"})(_set("variants.0.reduce_range", False)(s)),
        ["variants[0].reduce_range", "saturate on avx2"],
    ),
    "preset_unknown": (
        _set("target", {"preset": "avx1024"}),
        ["target.preset", "'auto', 'avx2', 'avx512_vnni' or 'arm64'"],
    ),
    "percentile_out_of_range": (_set("calibration.percentile", 30), ["calibration.percentile", "greater than 50"]),
    "max_drop_negative": (_set("selection.max_drop", -0.1), ["selection.max_drop", "greater than or equal to 0"]),
    "tolerance_too_big": (_set("selection.latency_tolerance", 1.5), ["selection.latency_tolerance", "less than 1"]),
    "name_invalid": (_set("name", "my pipeline!"), ["name", "should match pattern"]),
    "description_too_long": (_set("description", "x" * 6000), ["description", "at most 5000 characters"]),
    "variants_empty": (_set("variants", []), ["variants", "at least 1 item"]),
    "texts_without_tokenizer": (
        _set("evaluation.data", {"texts": "evaluation.npz"}),
        ["evaluation.data.texts", "texts need a `source: huggingface` model"],
    ),
    "package_missing": (
        _set("model", {"source": "onnx", "package": "no_such_package_xyz", "path": "model.onnx"}),
        ["model.package", "no_such_package_xyz"],
    ),
    "hf_folder_without_config": (
        _set("model", {"source": "huggingface", "path": "."}),
        ["model.path", "has no config.json"],
    ),
    "source_unknown": (_set("model.source", "tensorflow"), ["unknown source 'tensorflow'"]),
    "model_missing_field": (_drop("model"), ["model: required field is missing"]),
}

# raw file contents -> fragments (what YAML itself, or reading the file, must refuse)
RAW_CASES: dict[str, tuple[bytes, list[str]]] = {
    "not_utf8": (b"name: caf\xe9\n", ["not UTF-8 text"]),
    "empty_file": (b"", ["the file is empty"]),
    "top_level_list": (b"- name: x\n", ["expected a mapping of spec fields"]),
    "top_level_scalar": (b"just a string\n", ["expected a mapping of spec fields"]),
    "bad_indentation": (b"name: x\n  model: y\n", ["invalid YAML"]),
    "duplicate_key": (yaml.safe_dump(VALID, sort_keys=False).encode() + b"name: again\n", ["name", "duplicate key"]),
}

# cases that hung or ran out of memory before limits existed: a subprocess, so that a regression fails
# the test instead of hanging the suite
LAUGHS = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(9)
)
HANG_CASES: dict[str, tuple[bytes, list[str]]] = {
    "billion_laughs": (LAUGHS.encode(), ["anchors and aliases expand to more than"]),
    "fifty_megabytes": (b"# " + b"x" * 50_000_000 + b"\nname: x\n", ["a spec is at most 1,000,000"]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, digits_model) -> Path:
    """A folder with the real model and data, the broken model and data files the cases point at, and a
    module of user code."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    model_bytes = digits_model.model.read_bytes()
    (folder / "model.onnx").write_bytes(model_bytes)
    (folder / "folder.onnx").mkdir()
    (folder / "empty.onnx").write_bytes(b"")
    (folder / "text.onnx").write_text("this is not a model\n" * 20)
    (folder / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "truncated.onnx").write_bytes(model_bytes[: len(model_bytes) // 2])
    real = np.load(digits_model.evaluation)
    pixels, labels = real["pixels"], real["labels"]
    np.savez(folder / "evaluation.npz", pixels=pixels, labels=labels)
    np.savez(folder / "calibration.npz", pixels=pixels[:64])
    np.savez(folder / "no_labels.npz", pixels=pixels)
    np.savez(folder / "wrong_names.npz", image=pixels, labels=labels)
    np.savez(folder / "wrong_rank.npz", pixels=pixels[:448].reshape(448, 8, 8), labels=labels[:448])
    np.savez(folder / "strings.npz", pixels=pixels.astype(str), labels=labels)
    np.savez(folder / "complex.npz", pixels=pixels.astype(np.complex64), labels=labels)
    (folder / "pickled").mkdir()
    np.save(folder / "pickled" / "part.npy", np.array([{"pixels": 1}], dtype=object), allow_pickle=True)
    (folder / "notnumpy").mkdir()
    (folder / "notnumpy" / "part.npz").write_bytes(pickle.dumps({"pixels": pixels}))
    np.savez(folder / "fraction_labels.npz", pixels=pixels, labels=labels / 10.0)
    np.savez(folder / "string_labels.npz", pixels=pixels, labels=labels.astype(str))
    np.savez(folder / "nan.npz", pixels=np.full_like(pixels, np.nan), labels=labels)
    (folder / "baddata.py").write_text(
        "import sys\nimport numpy as np\n"
        "def batches():\n    return []\n"
        "def exits():\n    sys.exit(0)\n"
        "def raises():\n    raise RuntimeError('the data server is down')\n"
        "def not_dicts():\n    yield [1, 2, 3]\n"
        "def score(outputs, reference, labels):\n    return 'excellent'\n"
        f"def good():\n    data = np.load({str(folder / 'evaluation.npz')!r})\n"
        "    yield {'pixels': data['pixels'][:64]}, data['labels'][:64]\n"
    )
    return folder


def _write(folder: Path, name: str, spec: dict) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _one_clear_error(output: str, fragments: list[str], spec_name: str) -> None:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error ")]
    assert len(errors) == 1, output  # one problem, said once
    assert spec_name in errors[0], output  # the file is named
    for fragment in fragments:
        assert fragment in output, f"{fragment!r} missing from:\n{output}"


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_a_malformed_spec_gets_one_clear_error_at_validate(corpus, case):
    edit, fragments = SPEC_CASES[case]
    path = _write(corpus, case, edit(yaml.safe_load(yaml.safe_dump(VALID))))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    _one_clear_error(result.output, fragments, f"{case}.yaml")


@pytest.mark.parametrize("case", sorted(RAW_CASES))
def test_an_unreadable_spec_file_gets_one_clear_error(corpus, case):
    content, fragments = RAW_CASES[case]
    path = corpus / f"{case}.yaml"
    path.write_bytes(content)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    _one_clear_error(result.output, fragments, f"{case}.yaml")


@pytest.mark.parametrize("case", sorted(HANG_CASES))
def test_a_spec_that_used_to_hang_is_refused_promptly(corpus, case):
    content, fragments = HANG_CASES[case]
    path = corpus / f"{case}.yaml"
    path.write_bytes(content)
    # a generous limit: a regression shows as a failure here, never as a suite that does not end
    result = subprocess.run([str(BIN / "int8flow"), "validate", str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    _one_clear_error(result.stdout + result.stderr, fragments, f"{case}.yaml")


def test_validate_runs_no_user_code_unless_asked(corpus):
    (corpus / "sideeffect.py").write_text(
        "from pathlib import Path\nPath(__file__).with_name('imported.txt').write_text('ran')\ndef batches():\n    return []\n"
    )
    spec = yaml.safe_load(yaml.safe_dump(VALID)) | {
        "evaluation": {"data": {"callable": "sideeffect:batches"}, "metrics": ["cosine"]}
    }
    spec["selection"] = {"metric": "cosine"}
    path = _write(corpus, "sideeffect", spec)
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0
    assert not (corpus / "imported.txt").exists(), "validate imported the spec's module"
    spec["evaluation"]["metrics"] = [{"name": "mine", "function": "sideeffect:not_there"}]
    spec["selection"] = {"metric": "mine"}
    missing = _write(corpus, "sideeffect_missing", spec)
    assert runner.invoke(app, ["validate", str(missing)]).exit_code == 0, "a missing function is only seen by --import"
    result = runner.invoke(app, ["validate", "--import", str(missing)])
    assert result.exit_code == 2 and "has no callable 'not_there'" in result.output, result.output
    assert (corpus / "imported.txt").exists()
    assert str(corpus) not in sys.path, "the spec's folder does not stay on the import path"


# run-time cases: what only shows when the data is read or the user's code runs
RUN_CASES: dict[str, tuple[Edit, list[str]]] = {
    "nan_data": (_set("evaluation.data.path", "nan.npz"), ["input 'pixels' contains NaN or Inf"]),
    "string_labels": (_set("evaluation.data.path", "string_labels.npz"), ["labels are <U", "class indices"]),
    "fraction_labels": (_set("evaluation.data.path", "fraction_labels.npz"), ["top1 needs integer class indices"]),
    "callable_exits": (_set("evaluation.data", {"callable": "baddata:exits"}), ["baddata:exits raised SystemExit"]),
    "callable_raises": (_set("evaluation.data", {"callable": "baddata:raises"}), ["the data server is down"]),
    "callable_not_dicts": (_set("evaluation.data", {"callable": "baddata:not_dicts"}), ["must yield input dicts"]),
    "callable_empty": (_set("evaluation.data", {"callable": "baddata:batches"}), ["the data source gave no samples"]),
    "metric_not_a_number": (
        lambda s: _set("selection.metric", "mine")(
            _set(
                "evaluation",
                {"data": {"callable": "baddata:good"}, "metrics": [{"name": "mine", "function": "baddata:score"}]},
            )(s)
        ),
        ["metric mine (baddata:score) returned str, not a number"],
    ),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_bad_input_found_at_run_time_exits_2_and_leaves_nothing_behind(corpus, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    edit, fragments = RUN_CASES[case]
    path = _write(corpus, f"run_{case}", edit(yaml.safe_load(yaml.safe_dump(VALID))))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    _one_clear_error(result.output, fragments, f"run_{case}.yaml")
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(run.info.status == "FAILED" for run in runs), [r.info.status for r in runs]
    assert client.search_registered_models() == []
    logs = list((tmp_path / ".int8flow" / "logs").glob("*.log"))
    assert logs and "Traceback" in logs[0].read_text(), "the full traceback is kept in the run's log file"


def test_the_corpus_is_large_enough():
    assert len(SPEC_CASES) + len(RAW_CASES) + len(HANG_CASES) + len(RUN_CASES) >= 60
    assert os.environ.get("INT8FLOW_TEST_SESSION")
