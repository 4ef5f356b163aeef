"""Backends behind one interface: torch and ONNX Runtime agree; dispatch; clear errors."""

from __future__ import annotations

import json
import sys

import onnx
import onnxruntime as ort
import pytest
import torch

from spleen_utils.backends import (
    OnnxBackend,
    TensorRTBackend,
    TorchBackend,
    available_backends,
    open_backend,
)
from spleen_utils.config import Recipe
from spleen_utils.errors import SpleenError
from spleen_utils.export import export_onnx
from spleen_utils.model import build_network, save_checkpoint


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A random-weights checkpoint (non-trivial batch-norm statistics) and its default ONNX export."""
    d = tmp_path_factory.mktemp("backends")
    torch.manual_seed(0)
    net = build_network(Recipe())
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    pt = save_checkpoint(net, Recipe(), d / "m.pt")
    onnx_path = d / "m.onnx"
    export_onnx(pt, onnx_path, opset=17, validate=False)  # the tests below compare the two runtimes themselves (TorchScript exporter: seconds)
    return pt, onnx_path


@pytest.fixture(scope="module")
def backends(artifacts):
    pt, onnx_path = artifacts
    return open_backend(pt, backend="torch", device="cpu"), open_backend(onnx_path, device="cpu")


def test_auto_dispatch_by_suffix(backends, artifacts, tmp_path):
    tb, ob = backends
    assert isinstance(tb, TorchBackend) and tb.name == "torch"
    alone = tmp_path / "alone.pt"  # no ONNX export beside it: .pt opens with torch
    alone.write_bytes(artifacts[0].read_bytes())
    assert isinstance(open_backend(alone, device="cpu"), TorchBackend)
    assert isinstance(ob, OnnxBackend) and ob.name == "onnx"
    assert ob.device == torch.device("cpu") and ob.precision == "fp32"
    assert ob.providers == ["CPUExecutionProvider"]
    assert ob.recipe == tb.recipe == Recipe()
    assert ob.meta["format"] == "spleen_utils.onnx/1" and ob.meta["labels"] == ["background", "spleen"]


@pytest.mark.parametrize("shape", [(2, 1, 32, 48, 64), (1, 1, 16, 16, 32)])
def test_onnx_and_torch_give_the_same_logits(backends, shape):
    tb, ob = backends
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    yt, yo = tb(x), ob(x)
    assert yo.shape == yt.shape == (shape[0], 2, *shape[2:])
    assert yo.dtype == torch.float32 and yo.device == x.device
    torch.testing.assert_close(yo, yt, atol=1e-4, rtol=0)
    assert yt.abs().max() > 1e-2  # not a trivially zero output


def test_onnx_backend_checks_its_input(backends):
    _, ob = backends
    with pytest.raises(SpleenError, match="multiple of 16"):
        ob(torch.zeros(1, 1, 16, 16, 20))
    with pytest.raises(SpleenError, match=r"\(N, 1, X, Y, Z\)"):
        ob(torch.zeros(1, 2, 16, 16, 16))


def test_onnx_backend_precision_and_device(artifacts):
    _, onnx_path = artifacts
    assert OnnxBackend(onnx_path, device="cpu", precision="amp").precision == "fp32"
    with pytest.raises(SpleenError, match="precision"):
        OnnxBackend(onnx_path, precision="fp16")
    with pytest.raises(SpleenError, match="unknown device"):
        OnnxBackend(onnx_path, device="tpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SpleenError, match="no CUDA execution provider"):
            OnnxBackend(onnx_path, device="cuda")
        assert OnnxBackend(onnx_path, device="auto").device == torch.device("cpu")


def test_explicit_backend_names(artifacts):
    pt, onnx_path = artifacts
    assert isinstance(open_backend(onnx_path, backend="onnx", device="cpu"), OnnxBackend)
    with pytest.raises(SpleenError, match="not a readable ONNX model"):
        open_backend(pt, backend="onnx")  # a checkpoint is not an ONNX file
    with pytest.raises(SpleenError, match="unknown backend"):
        open_backend(onnx_path, backend="openvino")


def test_wrong_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07 definitely not a model \xff\xfe" * 20)
    with pytest.raises(SpleenError, match="not a readable ONNX model"):
        open_backend(junk)
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, None)
    y = onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["input"], ["output"])], "g", [x], [y])
    plain = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(SpleenError, match="without spleen_utils metadata"):
        open_backend(tmp_path / "plain.onnx")
    with pytest.raises(SpleenError, match="no such model file"):
        open_backend(tmp_path / "absent.onnx")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(SpleenError, match="cannot tell the backend"):
        open_backend(tmp_path / "model.bin")


def test_available_backends():
    av = available_backends()
    assert set(av) == {"torch", "onnx", "tensorrt"}
    assert av["torch"] == "available" and av["onnx"] == "available"
    assert isinstance(av["tensorrt"], str) and av["tensorrt"]


def test_available_backends_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    av = available_backends()
    assert av["tensorrt"] != "available" and "not installed" in av["tensorrt"]


def test_tensorrt_backend_guarded(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    (tmp_path / "m.engine.json").write_text(json.dumps({"format": "spleen_utils.onnx/1", "recipe": Recipe().to_dict()}))
    with pytest.raises(SpleenError, match="tensorrt backend cannot run here: the tensorrt Python package is not installed"):
        open_backend(engine)  # auto: .engine -> tensorrt
    with pytest.raises(SpleenError, match="cannot run here"):
        TensorRTBackend(engine)
