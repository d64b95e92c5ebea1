"""The spec: strict models, grids, defaults, golden error messages, and the committed JSON Schema."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from int8flow.flows.cli import app
from int8flow.flows.spec import PipelineSpec
from int8flow.flows.specfile import SpecError, load_spec
from int8flow.tasks.kinds import StaticVariant

SPECS = Path(__file__).parent / "specs"
REPO = Path(__file__).parent.parent
EXPECTED = yaml.safe_load((SPECS / "invalid" / "expected.yaml").read_text())
runner = CliRunner()


@pytest.fixture
def spec_dir(tmp_path, digits_model) -> Path:
    """The golden specs copied beside a real model, data file and callable module."""
    shutil.copytree(SPECS / "invalid", tmp_path / "specs" / "invalid")
    shutil.copy(digits_model.model, tmp_path / "specs" / "model.onnx")
    shutil.copy(digits_model.evaluation, tmp_path / "specs" / "data.npz")
    (tmp_path / "specs" / "invalid" / "specdata.py").write_text("def batches():\n    return []\n")
    return tmp_path / "specs"


def write_spec(directory: Path, text: str) -> Path:
    path = directory / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_every_golden_case_is_listed():
    files = {path.name for path in (SPECS / "invalid").glob("*.yaml")} - {"expected.yaml"}
    assert files == set(EXPECTED), "each invalid spec needs its expected fragments (and vice versa)"
    assert len(files) >= 10


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_invalid_spec_reports_file_line_path_and_reason(spec_dir, case):
    # given a malformed spec, when validated through the CLI
    result = runner.invoke(app, ["validate", str(spec_dir / "invalid" / case)])
    # then it exits 2 and names the file, line, field and what was expected
    assert result.exit_code == 2, result.output
    output = result.output
    for fragment in EXPECTED[case]:
        assert fragment in output, f"{fragment!r} missing from:\n{result.output}"


def test_all_errors_reported_at_once(spec_dir):
    with pytest.raises(SpecError) as raised:
        load_spec(spec_dir / "invalid" / "out_of_range.yaml")
    assert len(raised.value.problems) >= 4


def test_valid_spec_resolves_grid_names_and_calibration_defaults(tmp_path, digits_model):
    spec = load_spec(
        write_spec(
            tmp_path,
            f"""
            name: ok
            model: {{source: onnx, path: {digits_model.model}}}
            calibration: {{data: {{path: {digits_model.calibration}}}, method: entropy}}
            evaluation: {{data: {{path: {digits_model.evaluation}}}, metrics: [top1, cosine]}}
            variants:
              - kind: static
                grid: {{per_channel: [false, true], calibration_method: [minmax, percentile]}}
              - kind: static
                name: mine
              - kind: dynamic
                grid: {{reduce_range: [true]}}
                name: dyn
            """,
        )
    )
    variants = spec.resolved_variants()
    names = [variant.name for variant in variants]
    assert names == [
        "static-pt-minmax",
        "static-pt-percentile",
        "static-pc-minmax",
        "static-pc-percentile",
        "mine",
        "dyn-reduce_range=true",
    ]
    assert variants[4].calibration_method == "entropy"  # filled in from calibration.method
    assert all(isinstance(v, StaticVariant) for v in variants[:5])
    assert variants[5].reduce_range is True and variants[5].grid is None
    assert spec.selection_metric.name == "top1"


def test_spec_models_are_strict_and_frozen(digits_model):
    from pydantic import ValidationError

    valid = {
        "name": "x",
        "model": {"source": "onnx", "path": str(digits_model.model)},
        "evaluation": {"data": {"path": str(digits_model.evaluation)}},
        "variants": [{"kind": "fp16"}],
    }
    spec = PipelineSpec.model_validate(valid)
    # an extra key anywhere is the one and only error (the rest of the spec is valid)
    for extra in ({**valid, "surprise": 1}, {**valid, "variants": [{"kind": "fp16", "surprise": 1}]}):
        with pytest.raises(ValidationError) as raised:
            PipelineSpec.model_validate(extra)
        assert [error["type"] for error in raised.value.errors()] == ["extra_forbidden"]
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "y"  # type: ignore[misc]


def test_committed_schema_matches_the_models():
    committed = json.loads((REPO / "pipelines" / "schema.json").read_text())
    assert committed == PipelineSpec.model_json_schema(), "run `int8flow schema -o pipelines/schema.json`"


def test_schema_command_prints_generated_schema():
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == PipelineSpec.model_json_schema()


def test_every_pipeline_in_repo_validates_and_points_at_the_schema():
    specs = sorted((REPO / "pipelines").glob("*.yaml"))
    assert specs, "pipelines/ holds the example specs"
    for path in specs:
        assert path.read_text().startswith("# yaml-language-server: $schema=schema.json"), path
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output


def test_npz_folder_and_callable_sources(tmp_path, digits_model):
    from int8flow.tasks.data import DataError, DataSource, load_dataset

    dtypes = {"pixels": np.dtype("float32")}
    from_npz = load_dataset(DataSource(path=digits_model.evaluation, batch_size=50, limit=120), dtypes)
    assert [batch.size for batch in from_npz.batches] == [50, 50, 20] and from_npz.has_labels

    folder = tmp_path / "folder"
    folder.mkdir()
    pixels = np.load(digits_model.evaluation)["pixels"]
    np.save(folder / "a.npy", pixels[:10].astype(np.float64))  # cast to the model's float32
    np.savez(folder / "b.npz", pixels=pixels[10:15])
    from_folder = load_dataset(DataSource(path=folder, batch_size=8), dtypes)
    assert [batch.size for batch in from_folder.batches] == [8, 2, 5]
    assert from_folder.batches[0].inputs["pixels"].dtype == np.float32 and not from_folder.has_labels

    (tmp_path / "mydata.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for i in range(3):\n"
        "        yield {'pixels': np.full((4, 64), i, np.float32)}, np.arange(4)\n"
    )
    source = DataSource.model_validate({"callable": "mydata:batches"}, context={"base_dir": tmp_path})
    from_callable = load_dataset(source, dtypes)
    assert from_callable.samples == 12 and from_callable.labels().tolist() == [0, 1, 2, 3] * 3
    assert from_callable.fingerprint != from_npz.fingerprint

    with pytest.raises(DataError, match=r"missing \['image'\], unknown \['pixels'\]"):
        load_dataset(DataSource(path=digits_model.evaluation), {"image": np.dtype("float32")})
