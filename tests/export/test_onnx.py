import numpy as np
import onnx
import torch

from compress.export.onnx import export_onnx, onnx_size_bytes, slim_onnx
from compress.export.ort import make_session
from compress.models import ModelHandle
from compress.passes.weight_only import make_nbits, quantize_weight
from compress.quant.modules import ActQuantizer
from tests.helpers import make_tiny_vit


def _quantized_tiny_vit():
    """A tiny ViT with the graph pieces our exports contain: MatMulNBits with and without an
    activation Q/DQ in front, beside float layers."""
    m = make_tiny_vit()
    for i, name in enumerate(["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.mlp.fc2"]):
        layer = m.get_submodule(name)
        aq = None
        if i != 1:
            aq = ActQuantizer(8, symmetric=False)
            aq.set_range(torch.tensor(-4.0), torch.tensor(4.0))
        gq = quantize_weight(layer.weight, 4, 16, symmetric=i == 2, method="rtn")
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent), child, make_nbits(layer, gq, aq))
    return ModelHandle(task="image-classification", source="timm", name="t", module=m,
                       data_config={"input_size": (3, 32, 32)})


def _graph_bytes(path):
    proto = onnx.load(str(path))
    return onnx_size_bytes(path) - sum(t.ByteSize() for t in proto.graph.initializer)


def test_slim_export_keeps_outputs_bit_identical_and_is_smaller(tmp_path):
    h = _quantized_tiny_vit()
    full = export_onnx(h, tmp_path / "full.onnx", slim=False)
    slim = tmp_path / "slim.onnx"
    slim.write_bytes(full.read_bytes())
    slim_onnx(slim)

    proto = onnx.load(str(slim))
    constants = {t.name for t in proto.graph.initializer}
    assert not any(n.metadata_props for n in proto.graph.node)
    assert not any(v.metadata_props or v.name in constants for v in proto.graph.value_info)
    assert any(p.key.startswith("pkg.torch.export.")
               for p in onnx.load(str(full)).graph.metadata_props)
    assert not any(p.key.startswith("pkg.torch.export.") for p in proto.graph.metadata_props)
    # The symmetric layer's zero points equal MatMulNBits' default: dropped; the others kept.
    has_zp = sorted(len(n.input) > 3 and bool(n.input[3]) for n in proto.graph.node
                    if n.op_type == "MatMulNBits")
    assert has_zp == [False, True, True]
    ops = {n.op_type for n in proto.graph.node}
    assert {"MatMulNBits", "QuantizeLinear"} <= ops
    # Node names stay (ort_quantize's nodes_to_exclude addresses them).
    assert [n.name for n in proto.graph.node] == [n.name for n in onnx.load(str(full)).graph.node]
    # Graph bytes (file less tensor data) shrink by over a third; the data is untouched.
    assert _graph_bytes(slim) < 0.65 * _graph_bytes(full)

    a, b = make_session(full, threads=1), make_session(slim, threads=1)
    for bs in (1, 3):
        x = torch.randn(bs, 3, 32, 32, generator=torch.Generator().manual_seed(bs)).numpy()
        feed = {a.get_inputs()[0].name: x}
        ya, yb = a.run(None, feed)[0], b.run(None, feed)[0]
        assert np.array_equal(ya, yb)
        with torch.no_grad():
            ref = h.module(torch.from_numpy(x)).numpy()
        # MatMulNBits at accuracy level 4 rounds its inputs to int8: close, not equal.
        cos = (yb * ref).sum(1) / np.linalg.norm(yb, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.999


def test_slim_export_of_a_text_model_runs_bit_identical(tmp_path, tiny_bert_dir):
    from compress.models.loaders import load_model
    from compress.specs import ModelSpec

    h = load_model(ModelSpec(source="hf", path=str(tiny_bert_dir)), tiny_bert_dir)
    full = export_onnx(h, tmp_path / "full.onnx", slim=False)
    slim = export_onnx(h, tmp_path / "slim.onnx")
    assert onnx_size_bytes(slim) < onnx_size_bytes(full)
    a, b = make_session(full, threads=1), make_session(slim, threads=1)
    ids = np.random.default_rng(0).integers(0, 1000, (2, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    feed = {a.get_inputs()[0].name: ids, a.get_inputs()[1].name: mask}
    assert np.array_equal(a.run(None, feed)[0], b.run(None, feed)[0])


def test_default_zero_points_with_a_padded_last_byte_are_dropped():
    # K = 96 at block 32: three 4-bit zero points per column take two bytes, the last nibble is
    # padding (0). Symmetric codes (8) in every real block: dropped, ORT output unchanged.
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from compress.export.onnx import drop_default_zero_points

    n, k, block = 5, 96, 32
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(n, k // block, block // 2), dtype=np.uint8)
    scales = rng.uniform(0.01, 0.1, size=n * (k // block)).astype(np.float32)

    def model(zp):
        inits = [helper.make_tensor("w", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
                 helper.make_tensor("s", TensorProto.FLOAT, scales.shape, scales)]
        inputs = ["x", "w", "s"]
        if zp is not None:
            inits.append(helper.make_tensor("zp", TensorProto.UINT8, zp.shape, zp.tobytes(),
                                            raw=True))
            inputs.append("zp")
        node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=k, N=n,
                                bits=4, block_size=block)
        g = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                              inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21),
                                                   helper.make_opsetid("com.microsoft", 1)])

    sym = np.tile(np.array([0x88, 0x08], np.uint8), n)            # 8, 8, 8 + padding 0
    asym = sym.copy()
    asym[2] = 0x87                                                # one real block is not 8
    x = {"x": rng.standard_normal((2, k)).astype(np.float32)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(),  # noqa: E731
                                         providers=["CPUExecutionProvider"]).run(None, x)[0]
    m = model(sym)
    ref = run(m)
    assert drop_default_zero_points(m) == 1 and len(m.graph.initializer) == 2
    np.testing.assert_array_equal(run(m), ref)
    np.testing.assert_array_equal(run(model(None)), ref)
    assert drop_default_zero_points(model(asym)) == 0


def test_export_falls_back_to_torchscript_when_torch_export_fails(tmp_path):
    """Data-dependent control flow stops torch.export; the TorchScript tracer records the path
    taken for the example input, which is this model's behaviour on every input it gets here.
    Which exporter wrote the file, and why dynamo did not, is kept for the report."""
    from compress.export.onnx import exporter_used

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(12, 4)

        def forward(self, x):
            y = self.fc(x.flatten(1))
            if (y.sum() > -1e9).item():  # always true, but torch.export cannot know that
                return y * 2
            return y

    handle = ModelHandle(task="image-classification", source="timm", name="dd",
                         module=DataDependent().eval(), data_config={"input_size": (3, 2, 2)})
    path = export_onnx(handle, tmp_path / "model.onnx")
    used = exporter_used(handle, path)
    assert used["exporter"] == "torchscript"
    assert used["failed"] and used["failed"][0].startswith("dynamo: ")
    x = torch.randn(5, 3, 2, 2)  # another batch size than the traced one
    got = make_session(path).run(None, {"pixel_values": x.numpy()})[0]
    np.testing.assert_allclose(got, handle.module(x).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_export_records_dynamo_when_it_works(tmp_path):
    from compress.export.onnx import exporter_used

    handle = ModelHandle(task="image-classification", source="timm", name="t",
                         module=make_tiny_vit(), data_config={"input_size": (3, 32, 32)})
    path = export_onnx(handle, tmp_path / "model.onnx")
    assert exporter_used(handle, path) == {"exporter": "dynamo", "failed": []}
