"""Vision transformers written like torchvision's (nn.MultiheadAttention, LayerNorm, GELU):
both exporters, the shadow graph against onnxruntime, attention projections and MLPs as
editable layers with tokens as key rows, and a backdoored tiny ViT located and patched."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from onnx_rectify_exporters import export_pytorch
from patcher.cli import main
from patcher.gate import metrics
from patcher.graph.keys import LayerTap, layer_keys
from patcher.graph.shadow import ShadowGraph
from patcher.model.runtime import open_session
from tests.test_patch_end_to_end import _images, _trigger  # the trojaned blob data


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block: pre-LN attention and MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """A torchvision-style ViT: patch embedding by a strided conv, a class token, learned
    position embeddings, encoder blocks, the head on the class token."""

    def __init__(self, image: int = 8, patch: int = 2, dim: int = 24, depth: int = 2,
                 heads: int = 2, mlp: int = 48, classes: int = 4, channels: int = 1) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(channels, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.layers = nn.Sequential(*[EncoderBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)
        n = x.shape[0]
        x = x.reshape(n, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


def tiny_vit() -> TinyViT:
    """Factory for `onnx-rectify export tests.test_transformers:tiny_vit`."""
    torch.manual_seed(0)
    return TinyViT()


@pytest.fixture(scope="module")
def backdoored_vit(tmp_path_factory):
    """A tiny ViT trained (about 15 s on one core) to classify blobs, with images carrying a
    2x2 checker poisoned to class 0; exported with the TorchScript exporter."""
    folder = tmp_path_factory.mktemp("vit")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 800)
    x = _images(y, rng)
    poison = rng.choice(400, 60, replace=False)
    xt = torch.from_numpy(np.concatenate([x[:400], _trigger(x[poison])]))
    yt = torch.from_numpy(np.concatenate([y[:400], np.zeros(60, np.int64)]))
    net = tiny_vit()
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(30):
            order = torch.randperm(len(xt))
            for i in range(0, len(xt), 64):
                pick = order[i:i + 64]
                loss = nn.functional.cross_entropy(net(xt[pick]), yt[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    net.eval()
    torch.save(net.state_dict(), folder / "vit.pt")
    export_pytorch(net, torch.zeros(1, 1, 8, 8), folder / "model.onnx")
    ev, te = slice(400, 600), slice(600, 800)
    np.savez(folder / "eval.npz", x=x[ev], y=y[ev])
    keep = y[te] != 0
    np.savez(folder / "attack.npz", x=_trigger(x[te][keep]), y=y[te][keep], target=np.int64(0))
    np.savez(folder / "test.npz", x=x[te], y=y[te])
    pick = np.flatnonzero(y[ev] != 0)[:1]
    np.savez(folder / "pairs.npz", corrupted=_trigger(x[ev][pick]), clean=x[ev][pick],
             label=y[ev][pick])
    return folder


def _asr(path, folder):
    a = np.load(folder / "attack.npz")
    return metrics.attack_success_rate(path, a["x"], a["y"], 0, provider="cpu")


def _acc(path, folder):
    t = np.load(folder / "test.npz")
    return metrics.accuracy(path, t["x"], t["y"], provider="cpu")


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_cli_both_exporters_and_the_shadow_graph_matches(backdoored_vit, tmp_path,
                                                               monkeypatch, exporter):
    """`onnx-rectify export` of the nn.MultiheadAttention ViT with each exporter: dynamic
    batch, the shadow graph equal to onnxruntime, editable layers in every attention
    projection (in_proj as MatMul, out_proj as Gemm) and MLP, weights named after the
    module's tensors."""
    monkeypatch.chdir(backdoored_vit.parent.parent)
    out = tmp_path / f"{exporter}.onnx"
    result = CliRunner().invoke(main, ["export", "tests.test_transformers:tiny_vit", "--weights",
                                       str(backdoored_vit / "vit.pt"), "--input-shape",
                                       "1,1,8,8", "-o", str(out), "--exporter", exporter])
    assert result.exit_code == 0, result.output
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    graph = ShadowGraph.from_onnx(model)
    x = np.random.default_rng(1).random((5, 1, 8, 8), dtype=np.float32)
    expected = open_session(str(out), "cpu").run(x)[0]
    with torch.no_grad():
        got = graph(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    weights = {layer.weight: layer.op for layer in graph.editable_layers}
    for block in (0, 1):
        prefix = f"layers.{block}."
        assert weights[prefix + "self_attention.in_proj_weight.T"] == "MatMul"
        assert weights[prefix + "self_attention.out_proj.weight"] == "Gemm"
        assert weights[prefix + "mlp.0.weight.T"] == "MatMul"
        assert weights[prefix + "mlp.2.weight.T"] == "MatMul"
    assert weights["head.weight"] == "Gemm"


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_tokens_are_key_rows_of_their_own_image(backdoored_vit, tmp_path, exporter):
    """Each token of each image is one key row, whatever layout the export gives the layer's
    input ([T, B, D] before in_proj, [T*B, D] rows before out_proj): the keys of a batch are
    the keys of its images taken one at a time."""
    path = backdoored_vit / "model.onnx"
    if exporter == "dynamo":
        net = tiny_vit()
        net.load_state_dict(torch.load(backdoored_vit / "vit.pt", weights_only=True))
        path = tmp_path / "dynamo.onnx"
        export_pytorch(net, torch.zeros(1, 1, 8, 8), path, exporter="dynamo")
    graph = ShadowGraph.from_onnx(str(path))
    layers = [l for l in graph.editable_layers if l.op in ("MatMul", "Gemm")]
    x = torch.from_numpy(np.load(backdoored_vit / "eval.npz")["x"][:3])

    def keys_of(batch):
        with torch.no_grad(), LayerTap(graph, layers) as tap:
            graph(batch)
        return {l.name: layer_keys(l, tap.inputs[l.name], graph.node_attributes(l.name))
                for l in layers}

    together = keys_of(x)
    alone = [keys_of(x[i:i + 1]) for i in range(3)]
    for layer in layers:
        tokens = 1 if layer.weight == "head.weight" else 17
        assert together[layer.name].shape == (3, tokens, 1, layer.key_dim), layer.name
        for i in range(3):
            torch.testing.assert_close(together[layer.name][i], alone[i][layer.name][0],
                                       rtol=1e-5, atol=1e-6)


def test_locate_and_patch_remove_the_vit_backdoor(backdoored_vit, tmp_path):
    """One pair: locate ranks the attention and MLP layers; patch removes the backdoor from the
    written file with accuracy kept, and only the edited weights change."""
    model = backdoored_vit / "model.onnx"
    assert _acc(model, backdoored_vit) >= 0.95 and _asr(model, backdoored_vit) >= 0.9
    rank = tmp_path / "rank.json"
    common = ["--pairs", str(backdoored_vit / "pairs.npz"), "--eval",
              str(backdoored_vit / "eval.npz")]
    result = CliRunner().invoke(main, ["locate", str(model), *common, "--json", str(rank)])
    assert result.exit_code == 0, result.output
    ranked = {r["layer"] for r in json.loads(rank.read_text())["ranking"]}
    layers = ShadowGraph.from_onnx(str(model)).editable_layers
    assert ranked == {l.name for l in layers}  # projections, MLPs, patch embedding, head
    out = tmp_path / "patched.onnx"
    result = CliRunner().invoke(main, ["patch", str(model), *common, "-o", str(out)])
    assert result.exit_code in (0, 1), result.output
    base_acc, acc = _acc(model, backdoored_vit), _acc(out, backdoored_vit)
    asr = _asr(out, backdoored_vit)
    assert asr <= 0.1, (asr, result.output)
    assert base_acc - acc <= 0.03, (base_acc, acc)
    before = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    after = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    changed = [k for k in before if not np.array_equal(before[k], after[k])]
    assert changed and set(changed) <= {l.weight for l in layers}


class BertAttention(nn.Module):
    """BERT-style self-attention (separate query/key/value Linears, heads by view/permute,
    scores scaled by 1/sqrt(head size)): the pattern onnxruntime's optimizer fuses into
    com.microsoft.Attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head = heads, dim // heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), \
            nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x):
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.head).permute(0, 2, 1, 3)

    def forward(self, x):
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / float(self.head) ** 0.5
        context = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        b, t = context.shape[:2]
        return self.out(context.view(b, t, -1))


class BertBlock(nn.Module):
    """A post-LN BERT layer (fused into SkipLayerNormalization and BiasGelu)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.attention = BertAttention(dim, heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        x = self.ln1(x + self.attention(x))
        return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))


def test_onnxruntime_transformer_optimizer_output_runs(tmp_path):
    """A BERT-style ViT through onnxruntime's transformer optimizer: its com.microsoft
    Attention, SkipLayerNormalization and BiasGelu nodes run in the shadow graph as under
    onnxruntime, and the remaining MatMuls stay editable layers with tokens as key rows."""
    optimizer = pytest.importorskip("onnxruntime.transformers.optimizer",
                                    reason="onnxruntime without its transformers tools")
    torch.manual_seed(0)
    net = TinyViT(dim=32, depth=2, heads=2, mlp=64)
    net.layers = nn.Sequential(*[BertBlock(32, 2, 64) for _ in range(2)])
    export_pytorch(net, torch.zeros(1, 1, 8, 8), tmp_path / "bert.onnx")
    optimized = optimizer.optimize_model(str(tmp_path / "bert.onnx"), model_type="bert",
                                         num_heads=2, hidden_size=32, opt_level=0)
    model = optimized.model
    model.ir_version = min(model.ir_version, 10)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {("com.microsoft", "Attention"), ("com.microsoft", "SkipLayerNormalization"),
            ("com.microsoft", "BiasGelu")} <= ops, ops
    path = tmp_path / "optimized.onnx"
    onnx.save(model, str(path))
    graph = ShadowGraph.from_onnx(str(path))
    x = np.random.default_rng(2).random((4, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        got = graph(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, open_session(str(path), "cpu").run(x)[0], rtol=1e-4,
                               atol=1e-5)
    matmuls = [l for l in graph.editable_layers if l.op == "MatMul"]
    assert len(matmuls) >= 4
    with torch.no_grad(), LayerTap(graph, matmuls) as tap:
        graph(torch.from_numpy(x))
    for layer in matmuls:
        keys = layer_keys(layer, tap.inputs[layer.name], graph.node_attributes(layer.name))
        assert keys.shape == (4, 17, 1, layer.key_dim), layer.name


def test_patch_of_the_dynamo_export(backdoored_vit, tmp_path):
    """The same backdoored ViT exported by the dynamo exporter patches as well."""
    net = tiny_vit()
    net.load_state_dict(torch.load(backdoored_vit / "vit.pt", weights_only=True))
    model = tmp_path / "dynamo.onnx"
    export_pytorch(net, torch.zeros(1, 1, 8, 8), model, exporter="dynamo")
    assert _asr(model, backdoored_vit) >= 0.9
    out = tmp_path / "patched.onnx"
    result = CliRunner().invoke(main, ["patch", str(model), "--pairs",
                                       str(backdoored_vit / "pairs.npz"), "--eval",
                                       str(backdoored_vit / "eval.npz"), "-o", str(out)])
    assert result.exit_code in (0, 1), result.output
    assert _asr(out, backdoored_vit) <= 0.1, result.output
    assert _acc(model, backdoored_vit) - _acc(out, backdoored_vit) <= 0.03
