"""The benchmark: its record, its baseline (the MONAI tutorial pipeline), and agreement with the default path.

Timings are recorded, never asserted; what is asserted is structure, units and agreement.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleen_utils.bench import (
    BENCH_FORMAT,
    PeakMemory,
    baseline_predict,
    bench_end_to_end,
    count_flops,
    format_report,
    report_markdown,
    plot_benchmark,
    run_benchmark,
    summarize_times,
)
from spleen_utils.config import Recipe
from spleen_utils.infer import Predictor
from spleen_utils.io import load_nifti
from spleen_utils.metrics import dice
from spleen_utils.model import build_network, save_checkpoint
from spleen_utils.synthetic import make_phantom

TINY = Recipe(channels=(4, 8, 16, 32, 64), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), sw_batch_size=2)


class BoxNet(torch.nn.Module):
    """A 3x3x3 mean filter with two logits (0.5 - m, m - 0.5): deterministic, position-sensitive."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0] -= 1.0 / 27
            self.conv.weight[1] += 1.0 / 27
            self.conv.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return self.conv(x)


class BoxBackend:
    name, device, precision, meta = "box", torch.device("cpu"), "fp32", {}

    def __init__(self, recipe=Recipe()):
        self.recipe, self.net = recipe, BoxNet().eval()

    @torch.no_grad()
    def __call__(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    torch.manual_seed(0)
    model = save_checkpoint(build_network(TINY), TINY, d / "tiny.pt", epoch=1)
    from spleen_utils.export import export_onnx

    onnx_path = d / "tiny.onnx"
    export_onnx(model, onnx_path, opset=17, validate=False)
    img, _, aff = make_phantom(5, "LAS", (5.0, 5.0, 6.0))
    image = d / "case.nii.gz"
    nib.save(nib.Nifti1Image(img, aff), str(image))
    return model, onnx_path, image


def test_summaries_and_flops():
    s = summarize_times([1.0, 2.0, 3.0, 4.0, 5.0])
    assert s["median_s"] == 3.0 and s["n"] == 5 and s["p10_s"] == pytest.approx(1.4) and s["p90_s"] == pytest.approx(4.6)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    assert count_flops(conv, (1, 1, 8, 8, 8)) == 2 * 1 * 2 * 27 * 8**3  # a multiply-add is two FLOPs


def _touch_fresh_pages(mib: int = 64) -> None:
    """Make RSS rise by ``mib`` and fall again: an anonymous mapping, every page written, then unmapped.

    A numpy array would not do: after the inference tests the allocator can serve 64 MiB from heap
    it already holds, and RSS does not grow (which is what the measurement should then say).
    """
    size = mib * 2**20
    with mmap.mmap(-1, size) as m:
        for offset in range(0, size, mmap.PAGESIZE):
            m[offset] = 1


def test_peak_memory_sees_an_allocation():
    with PeakMemory() as m:
        _touch_fresh_pages()
    assert m.rss_increase_mb > 40 and m.peak_rss_mb >= m.rss_increase_mb
    if Path("/proc/self/clear_refs").exists():  # Linux: the kernel's peak mark sees it without the sampler
        with PeakMemory(interval=60.0) as m:
            _touch_fresh_pages()
        assert m.rss_increase_mb > 40 and m.peak_rss_mb >= m.rss_increase_mb


def test_peak_memory_reports_no_rise_when_nothing_is_allocated():
    with PeakMemory(interval=60.0) as m:
        pass
    assert m.rss_increase_mb < 8


def test_baseline_is_the_tutorial_pipeline_and_agrees_with_the_default_path(files, tmp_path):
    _, _, image = files
    base, t = baseline_predict(BoxNet().eval(), image, tmp_path / "base", Recipe())
    assert set(t) == {"read_s", "preprocess_s", "inference_s", "invert_s", "write_s", "total_s"}
    written = tmp_path / "base" / "case" / "case_seg.nii.gz"  # SaveImaged's layout
    src, out = nib.load(str(image)), nib.load(str(written))
    assert out.shape == src.shape and np.allclose(out.affine, src.affine, atol=1e-4)
    assert np.array_equal(np.asarray(out.dataobj).astype(np.uint8), base)
    ours, _ = Predictor(BoxBackend(), lcc=False).predict_volume(load_nifti(image))
    assert base.sum() > 100 and ours.sum() > 100
    assert dice(base, ours) >= 0.99


def test_end_to_end_record(files, tmp_path):
    model, _, image = files
    rec = bench_end_to_end(model, [image], device="cpu", repeats=1, warmup=0, predictor=Predictor(BoxBackend(), lcc=False), baseline_model=BoxNet().eval())
    (case,) = rec["cases"]
    assert case["shape"] == list(nib.load(str(image)).shape)
    assert case["speedup"] > 0 and case["window_plan"] in ("whole", "sliding") and len(case["preprocessed_shape"]) == 3
    assert case["dice_agreement"] >= 0.99 and case["dice_agreement"] == case["dice_agreement_raw"]  # no LCC on either side
    assert case["differing_voxels"] <= 0.01 * case["baseline"]["spleen_voxels"]
    assert case["baseline"]["spleen_voxels"] > 100
    assert {"read_s", "preprocess_s", "inference_s", "invert_s", "write_s"} <= set(case["baseline"]["stages_median_s"])
    assert {"preprocess_s", "inference_s", "postprocess_s", "write_s", "load_s"} <= set(case["default"]["stages_median_s"])
    # the same five stages for both pipelines, each a positive time that adds up to no more than the whole
    for who in ("baseline", "default"):
        st = case["stages_s"][who]
        assert list(st) == ["read", "preprocess", "network", "invert", "write"] and all(v > 0 for v in st.values())
        assert sum(st.values()) <= case[who]["median_s"] * 1.01
    assert rec["stages"] == ["read", "preprocess", "network", "invert", "write"]
    (row,) = rec["agreement"]  # no variants given: the default's row only
    assert row["default"] and row["dice_min"] == case["dice_agreement"] and row["meets_target"] == (case["dice_agreement"] >= 0.99)
    assert case["baseline"]["memory"]["peak_rss_mb"] > 0
    assert rec["baseline"]["roi"] == [160, 160, 160] and rec["baseline"]["precision"] == "fp32"


@pytest.mark.slow
def test_run_benchmark_writes_the_record(files, tmp_path):
    model, onnx_path, image = files
    out = tmp_path / "bench.json"
    rec = run_benchmark(model, onnx_path=onnx_path, images=[image], device="cpu", repeats=1, warmup=0, patch_repeats=2, batch_sizes=(1, 2),
                        patch=(32, 32, 32), threads=torch.get_num_threads(), json_out=out, process_repeats=1)
    doc = json.loads(out.read_text())
    assert doc["format"] == BENCH_FORMAT and doc == json.loads(json.dumps(rec, default=str))
    assert {"date", "hardware", "versions", "model", "settings", "patch", "end_to_end"} <= set(doc)
    hw = doc["hardware"]
    assert hw["cpu"] and hw["cpu_cores"] >= 1 and hw["cpu_threads"] >= 1 and "gpu" in hw
    assert doc["settings"]["torch_threads"] == torch.get_num_threads() and hw["load_average_1min"] is not None
    p = doc["patch"]
    assert p["patch"] == [32, 32, 32] and p["flops_per_patch"] > 0
    seen = {(r["backend"], r["precision"], r["batch"]) for r in p["rows"]}
    assert {("torch", "fp32", 1), ("torch", "fp32", 2), ("onnx", "fp32", 1), ("onnx", "fp32", 2)} <= seen
    for r in p["rows"]:
        assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["ms_per_patch"] == pytest.approx(r["median_ms"] / r["batch"])
        assert r["achieved_gflops"] > 0 and r["peak_rss_mb"] > 0
        assert r["fraction_of_peak"] == "unknown" or 0 < r["fraction_of_peak"] < 1
    assert any(m["backend"] == "tensorrt" for m in p["unavailable"])  # listed with its reason
    e = doc["end_to_end"]
    assert len(e["cases"]) == 1 and e["cases"][0]["speedup"] > 0 and 0 <= e["dice_agreement_min"] <= 1
    # every backend / precision measured has its agreement with the tutorial's masks; the rest says why not
    # tiny.onnx lies beside tiny.pt and names its digest: the default runs it, torch fp32 is the other row
    pipelines = {a["pipeline"]: a for a in e["agreement"]}
    assert set(pipelines) == {"default", "torch fp32"} and pipelines["default"]["default"] and not pipelines["torch fp32"]["default"]
    assert pipelines["default"]["backend"] == "onnx (fp32, cpu; tiny.onnx, the export of tiny.pt)"  # precision auto is fp32
    assert pipelines["torch fp32"]["backend"].startswith("torch (fp32, cpu")
    for a in e["agreement"]:
        assert set(a["dice_by_case"]) == {"case"} and 0 <= a["dice_min"] <= 1 and a["meets_target"] == (a["dice_min"] >= 0.99)
    # torch fp32 and ONNX Runtime fp32 compute the same network: their masks agree with the tutorial's alike
    assert abs(pipelines["torch fp32"]["dice_min"] - pipelines["default"]["dice_min"]) < 0.01
    if not hw["cpu_bf16_native"]:
        assert any(m["pipeline"] == "torch bf16" for m in e["agreement_not_run"])
    # whole processes, start-up included, side by side
    w = e["whole_process"]
    assert set(w["processes"]) == {"baseline", "default", "torch"} and w["image"] == "case.nii.gz"
    assert w["commands"]["torch"].endswith("--backend torch --output torch.nii.gz") and "tiny.pt" in w["commands"]["default"]
    assert all(v["n"] == 1 and v["median_s"] > 0 for v in w["processes"].values())
    assert set(w["speedup"]) == {"default", "torch"} and set(w["speedup_beyond_startup"]) == {"default", "torch"}
    assert all(w["processes"][k]["median_s"] > w["in_process_s"][k] * 0.5 for k in w["in_process_s"])
    text = format_report(doc)
    assert "end to end" in text and "onnx" in text and "speedup" in text
    assert "seconds per stage" in text and "whole processes" in text and "agreement with the tutorial" in text
    md = report_markdown(doc)  # what notebook 08 shows: tables, not fixed-width text
    # patch, end to end, stages, agreement, whole processes
    assert sum(line.startswith("|---") for line in md.splitlines()) == 5 and "| onnx | fp32 |" in md
    assert any(line.startswith("Not run here:") and "tensorrt" in line for line in md.splitlines())
    assert max(len(line) for line in md.splitlines() if not line.startswith("|")) < 1200  # prose wraps in a page
    import matplotlib

    matplotlib.use("Agg")
    fig = plot_benchmark(doc)
    assert len(fig.axes) == 4  # per patch, end to end, per stage, whole processes
    assert fig.axes[-1].get_title() == "whole processes, case"


def test_the_other_rows_follow_the_default(files, tmp_path):
    """With the checkpoint alone the default is torch and ONNX Runtime is the other row; with its
    export beside it, the reverse (run_benchmark above measures the second case)."""
    from spleen_utils.bench import process_commands
    from spleen_utils.bench.end_to_end import _end_to_end_variants

    model, onnx_path, image = files
    variants, _ = _end_to_end_variants(model, onnx_path, torch.device("cpu"), "auto")
    assert variants[0][0] == "onnx fp32" and variants[0][1].backend.name == "onnx"
    variants, _ = _end_to_end_variants(model, None, torch.device("cpu"), "auto", torch_fp32=True)
    assert variants[0][0] == "torch fp32" and variants[0][1].backend.name == "torch"
    labels = [label for label, _ in process_commands(model, image, tmp_path, onnx_path)]
    assert labels == ["baseline", "default", "onnx"]
    cmds = dict(process_commands(model, image, tmp_path, None, torch_row=True))
    assert list(cmds) == ["baseline", "default", "torch"] and cmds["torch"][-4:-2] == ["--backend", "torch"]


def test_agreement_filters_a_copy():
    """The largest-component filter used for the agreement must not change the baseline's mask."""
    from spleen_utils.postprocess import keep_one_component

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    mask[10:18, 10:18, 10:18] = 1
    before = mask.copy()
    kept = keep_one_component(mask)
    assert np.array_equal(mask, before) and kept.sum() == 8**3


def test_half_precision_reference_only_where_it_is_native(tmp_path, monkeypatch):
    """An emulated bf16 matrix product took minutes on a CPU without AVX512-BF16 and measured nothing useful."""
    from spleen_utils import bench
    from spleen_utils.bench import patch as bench_patch
    from spleen_utils.config import Recipe
    from spleen_utils.model import build_network, save_checkpoint

    recipe = Recipe(channels=(4, 8, 16, 32, 64))
    model = save_checkpoint(build_network(recipe), recipe, tmp_path / "m.pt")
    dtypes = []
    monkeypatch.setattr(bench_patch, "matmul_gflops", lambda dev, dtype, **k: dtypes.append(dtype) or 1.0)
    monkeypatch.setattr("spleen_utils.model.cpu_supports_bf16", lambda: False)
    rec = bench.bench_patches(model, None, None, "cpu", [1], 1, patch=(16, 16, 16))
    assert dtypes == [torch.float32] and rec["matmul_gflops"]["bf16"] is None
    dtypes.clear()
    monkeypatch.setattr("spleen_utils.model.cpu_supports_bf16", lambda: True)
    rec = bench.bench_patches(model, None, None, "cpu", [1], 1, patch=(16, 16, 16))
    assert dtypes == [torch.float32, torch.bfloat16] and rec["matmul_gflops"]["bf16"] == 1.0
