"""ONNX export: one self-contained, self-describing file that agrees with PyTorch; TensorRT guard."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from spleen_utils import export
from spleen_utils.config import Recipe
from spleen_utils.errors import SpleenError
from spleen_utils.artifact import ONNX_FORMAT, file_sha256, read_engine_sidecar
from spleen_utils.export import (
    build_trt_engine,
    export_onnx,
    read_onnx_metadata,
    tensorrt_available,
    trtexec_command,
)
from spleen_utils.model import build_network, load_model, save_checkpoint

pytestmark = pytest.mark.slow  # exports and validates a full-size network (make test-fast skips it)


def real_image() -> Path | None:
    """The real CT fixture when it is here (found as conftest's ``real_dir`` finds it)."""
    from spleen_utils.samples import real_data_dir

    d = real_data_dir("totalseg_ct_3mm.nii.gz")
    return d / "totalseg_ct_3mm.nii.gz" if d else None


def random_network(seed: int = 0) -> torch.nn.Module:
    """Random weights, and batch-norm statistics away from (0, 1) so that folding them is tested."""
    torch.manual_seed(seed)
    net = build_network(Recipe())
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    return save_checkpoint(random_network(), Recipe(), d / "m.pt", epoch=7, best_metric=0.25)


@pytest.fixture(scope="module")
def exported(ckpt):
    """The default export (opset 18, dynamo), validated, with the real patch when it is here."""
    return export_onnx(ckpt, ckpt.parent / "m.onnx", real_image=real_image())


@pytest.fixture(scope="module")
def reference(ckpt):
    """PyTorch, as the checkpoint loads."""
    return load_model(ckpt)[0]


def test_report_and_single_file(exported, ckpt):
    path = ckpt.parent / "m.onnx"
    assert exported["path"] == str(path) and path.exists()
    assert exported["checker"] == "ok" and exported["opset"] == 18 and exported["exporter"] == "dynamo"
    assert exported["size_bytes"] == path.stat().st_size > 5_000_000  # the ~19 MB of weights are inline
    # one self-contained file: nothing else beside the checkpoint (no external data, no temp file)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["m.onnx", "m.pt"]
    model = onnx.load(str(path), load_external_data=False)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(str(path), full_check=True)
    assert exported["seconds"] > 0 and exported["validated"]


def test_validation_diffs(exported):
    diffs = exported["max_abs_diff"]
    assert {"random_1x1x96x96x96", "random_2x1x64x80x96"} <= set(diffs)
    assert all(0 <= d < 1e-4 for d in diffs.values()), diffs


def test_real_patch_validated(exported, real_dir):
    keys = [k for k in exported["max_abs_diff"] if k.startswith("real_totalseg_ct_3mm")]
    assert keys and exported["max_abs_diff"][keys[0]] < 1e-4
    patch = export.real_patch(real_dir / "totalseg_ct_3mm.nii.gz", Recipe())
    assert patch.shape == (1, 1, 96, 96, 96) and patch.dtype == np.float32
    assert 0.0 <= patch.min() and patch.max() <= 1.0 and 0.05 < patch.mean() < 0.95  # real, windowed anatomy


def test_metadata_round_trip(exported, ckpt):
    path = ckpt.parent / "m.onnx"
    meta = read_onnx_metadata(path)
    assert meta["format"] == ONNX_FORMAT
    assert Recipe.from_dict(meta["recipe"]) == Recipe()
    assert meta["network"] == Recipe().network_kwargs()
    assert meta["labels"] == ["background", "spleen"]
    assert meta["source_checkpoint_sha256"] == file_sha256(ckpt) == exported["source_checkpoint_sha256"]
    assert meta["opset"] == 18 and meta["exporter"] == "dynamo"
    assert meta["versions"]["torch"] == torch.__version__ and meta["versions"]["onnx"] == onnx.__version__
    assert meta["source_checkpoint"]["epoch"] == 7 and meta["source_checkpoint"]["file"] == "m.pt"
    # the raw string keys that the C++ program reads, exactly
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert props["spleen_utils.format"] == ONNX_FORMAT and props["opset"] == "18"
    recipe = json.loads(props["recipe"])
    assert recipe["pixdim"] == [1.5, 1.5, 2.0] and recipe["hu_window"] == [-57.0, 164.0]
    assert recipe["sw_roi"] == [160, 160, 160] and recipe["sw_batch_size"] == 4
    assert recipe["overlap"] == 0.25 and recipe["orientation"] == "RAS"


def test_graph_io_is_dynamic(exported):
    model = onnx.load(exported["path"], load_external_data=False)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and out.name == "output"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims_in = inp.type.tensor_type.shape.dim
    dims_out = out.type.tensor_type.shape.dim
    assert dims_in[1].dim_value == 1 and dims_out[1].dim_value == 2
    for dims in (dims_in, dims_out):
        for ax in (0, 2, 3, 4):
            assert dims[ax].dim_param and not dims[ax].dim_value, (ax, dims[ax])


@pytest.mark.parametrize("shape", [(3, 1, 32, 48, 64), (1, 1, 48, 32, 16)])
def test_dynamic_shapes_match_torch(exported, reference, shape):
    session = ort.InferenceSession(exported["path"], providers=["CPUExecutionProvider"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    got = session.run(["output"], {"input": x.numpy()})[0]
    with torch.inference_mode():
        ref = reference(x).numpy()
    assert got.shape == (shape[0], 2, *shape[2:])
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_opset12_with_torchscript(ckpt, tmp_path, reference):
    report = export_onnx(ckpt, tmp_path / "m12.onnx", opset=12)
    assert report["opset"] == 12 and report["exporter"] == "torchscript"
    assert all(d < 1e-4 for d in report["max_abs_diff"].values())
    model = onnx.load(report["path"], load_external_data=False)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [12]
    assert read_onnx_metadata(report["path"])["opset"] == 12
    # dynamic at another batch and size than validation used
    session = ort.InferenceSession(report["path"], providers=["CPUExecutionProvider"])
    x = torch.rand(3, 1, 16, 32, 48)
    with torch.inference_mode():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], reference(x).numpy(), atol=1e-4, rtol=0)


def test_dynamo_below_opset18_refused(ckpt, tmp_path):
    with pytest.raises(SpleenError, match="opset 18 or newer"):
        export_onnx(ckpt, tmp_path / "x.onnx", opset=12, exporter="dynamo")
    with pytest.raises(SpleenError, match="unknown exporter"):
        export_onnx(ckpt, tmp_path / "x.onnx", exporter="tracing")
    assert not list(tmp_path.iterdir())


def test_failed_validation_writes_nothing(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", 0.0)  # random weights still differ by ~1e-7 somewhere
    with pytest.raises(SpleenError, match="disagree"):
        export_onnx(ckpt, tmp_path / "bad.onnx", opset=12)
    assert not list(tmp_path.iterdir())  # neither the target nor a temporary file


def test_missing_and_damaged_checkpoints(tmp_path):
    with pytest.raises(SpleenError, match="no such model file"):
        export_onnx(tmp_path / "nope.pt", tmp_path / "m.onnx")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    with pytest.raises(SpleenError, match="not a readable PyTorch checkpoint"):
        export_onnx(bad, tmp_path / "m.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_read_metadata_of_foreign_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xff not protobuf \xff" * 50)
    with pytest.raises(SpleenError, match="not a readable ONNX model"):
        read_onnx_metadata(junk)
    with pytest.raises(SpleenError, match="no such ONNX file"):
        read_onnx_metadata(tmp_path / "absent.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(SpleenError, match="without spleen_utils metadata"):
        read_onnx_metadata(tmp_path / "plain.onnx")


def test_tensorrt_available_never_raises(monkeypatch):
    ok, reason = tensorrt_available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    ok, reason = tensorrt_available()
    assert not ok and "not installed" in reason


def test_trt_build_without_tensorrt_says_what_to_run(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    engine = tmp_path / "m.engine"
    with pytest.raises(SpleenError) as e:
        build_trt_engine(exported["path"], engine)
    msg = str(e.value)
    assert msg.startswith("TensorRT is not installed here;") and "the equivalent trtexec command is: trtexec --onnx=" in msg
    assert "--maxShapes=input:8x1x160x160x160" in msg
    assert not engine.exists()


def test_trtexec_command_text(exported, tmp_path):
    cmd = trtexec_command(exported["path"], tmp_path / "my model.engine")
    assert cmd.startswith(f"trtexec --onnx={exported['path']} ")
    assert f"--saveEngine='{tmp_path / 'my model.engine'}'" in cmd  # shell-quoted
    # batch 1..8 (opt 4 = the sliding-window batch), from the 96^3 patch to the 160^3 window
    assert "--minShapes=input:1x1x96x96x96" in cmd
    assert "--optShapes=input:4x1x160x160x160" in cmd
    assert "--maxShapes=input:8x1x160x160x160" in cmd
    assert "--memPoolSize=workspace:4096" in cmd and cmd.endswith("--fp16")
    cmd32 = trtexec_command(exported["path"], "e.engine", fp16=False, max_batch=2, opt_batch=2, spatial=[(96,) * 3] * 3)
    assert "--fp16" not in cmd32 and "--maxShapes=input:2x1x96x96x96" in cmd32
    with pytest.raises(SpleenError, match="min <= opt <= max"):
        trtexec_command(exported["path"], "e.engine", min_batch=4, opt_batch=2)
    with pytest.raises(SpleenError, match="multiples of 16"):
        trtexec_command(exported["path"], "e.engine", spatial=[(90,) * 3] * 3)


class _RecordingTensorRT:
    """A stand-in for the ``tensorrt`` module that records how build_trt_engine drives it.

    It checks our use of the documented TensorRT 10 build API (names, arguments, order), not
    TensorRT itself: no engine is built here.
    """

    __version__ = "10.16.1"

    def __init__(self):
        self.calls: list[tuple] = []
        rec = self.calls

        class Logger:
            WARNING = "warning"

            def __init__(self, severity):
                rec.append(("Logger", severity))

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                rec.append(("set_shape", name, tuple(lo), tuple(opt), tuple(hi)))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                rec.append(("pool", pool, size))

            def set_flag(self, flag):
                rec.append(("flag", flag))

            def add_optimization_profile(self, profile):
                rec.append(("add_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                rec.append(("create_network", flags))
                return "network"

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                rec.append(("build", network))
                return b"serialized-engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                assert network == "network"

            def parse_from_file(self, path):
                rec.append(("parse", path))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": "workspace"})
        self.BuilderFlag = type("BuilderFlag", (), {"FP16": "fp16"})


def test_trt_build_drives_the_tensorrt10_api(exported, tmp_path, monkeypatch):
    fake = _RecordingTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(export, "tensorrt_available", lambda: (True, "fake TensorRT"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    engine = build_trt_engine(exported["path"], tmp_path / "m.engine", workspace_gb=2)
    assert engine.read_bytes() == b"serialized-engine"
    calls = fake.calls
    assert ("create_network", 0) in calls and ("parse", exported["path"]) in calls
    assert ("pool", "workspace", 2 << 30) in calls and ("flag", "fp16") in calls
    assert ("set_shape", "input", (1, 1, 96, 96, 96), (4, 1, 160, 160, 160), (8, 1, 160, 160, 160)) in calls
    assert calls.index(("add_profile",)) < calls.index(("build", "network"))
    side = read_engine_sidecar(engine)  # <engine>.json: the ONNX metadata plus the profile
    assert side == {**read_onnx_metadata(exported["path"]), "engine": side["engine"]}
    assert side["engine"]["profile"]["max"] == [8, 1, 160, 160, 160] and side["engine"]["precision"] == "fp16"
    assert side["engine"]["source_onnx_sha256"] == file_sha256(exported["path"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]
