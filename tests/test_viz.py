"""spleen_utils.viz on tiny arrays: figures draw, files are written, GIFs have the frames asked for."""

from __future__ import annotations

import base64
import json

import nibabel as nib
import numpy as np
import pytest
from matplotlib.figure import Figure

from spleen_utils import viz


def _ellipsoid(shape=(24, 20, 12), center=(14, 9, 6), radii=(6, 5, 4)) -> np.ndarray:
    grid = np.indices(shape).astype(np.float32)
    r = sum(((g - c) / rr) ** 2 for g, c, rr in zip(grid, center, radii))
    return r <= 1.0


@pytest.fixture()
def case() -> viz.ViewCase:
    label = _ellipsoid()
    rng = np.random.default_rng(0)
    image = rng.normal(0, 20, label.shape).astype(np.float32) + 120 * label
    pred = np.roll(label, 1, axis=0)
    return viz.ViewCase("tiny", image, (1.5, 1.0, 3.0), label=label, pred=pred)


def _write_case(tmp_path, name, affine):
    label = _ellipsoid().astype(np.uint8)
    image = (np.random.default_rng(1).normal(0, 20, label.shape) + 120 * label).astype(np.int16)
    (tmp_path / "imagesTr").mkdir(exist_ok=True)
    (tmp_path / "labelsTr").mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "imagesTr" / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "labelsTr" / f"{name}.nii.gz"))
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


@pytest.fixture()
def dataset(tmp_path):
    ras = np.diag([1.5, 1.0, 3.0, 1.0])
    lps = np.diag([-0.8, -0.8, 2.0, 1.0])
    items = [_write_case(tmp_path, "spleen_1", ras), _write_case(tmp_path, "spleen_2", lps)]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": items, "test": []}))
    return tmp_path


def test_to_lps_reorients_voxels_and_spacing():
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    # RAS storage: axis 0 runs towards the patient's right, so LPS flips axes 0 and 1
    out, spacing = viz.to_lps(a, np.diag([2.0, 3.0, 4.0, 1.0]))
    assert np.array_equal(out, a[::-1, ::-1, :])
    assert spacing == (2.0, 3.0, 4.0)
    # axes stored as (S, P, L): permuted back to (L, P, S) with their spacings
    aff = np.array([[0, 0, -4.0, 0], [0, -3.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    out, spacing = viz.to_lps(a, aff)
    assert out.shape == (4, 3, 2) and spacing == (4.0, 3.0, 2.0)
    assert np.array_equal(out, a.transpose(2, 1, 0))


def test_load_view_rejects_a_mask_on_another_grid(dataset):
    img = dataset / "imagesTr" / "spleen_1.nii.gz"
    view = viz.load_view(img, dataset / "labelsTr" / "spleen_1.nii.gz")
    assert view.name == "spleen_1" and view.label.dtype == bool and view.label.sum() == _ellipsoid().sum()
    other = dataset / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), np.eye(4)), str(other))
    with pytest.raises(ValueError, match="grid"):
        viz.load_view(img, pred=other)


def test_dataset_table_and_figures(dataset, tmp_path):
    rows = viz.dataset_table(dataset)
    assert [r["case"] for r in rows] == ["spleen_1", "spleen_2"]
    assert rows[0]["orientation"] == "RAS" and rows[1]["orientation"] == "LPS"
    assert rows[0]["spleen_ml"] == pytest.approx(_ellipsoid().sum() * 1.5 * 1.0 * 3.0 / 1000, abs=0.05)
    out = tmp_path / "figs" / "geometry.png"
    viz.figure_to_png(viz.geometry_figure(rows, "geometry"), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    from spleen_utils.data import load_datalist

    items = load_datalist(dataset)
    hist = viz.hu_histograms(items)
    assert hist["spleen"].sum() == 2 * _ellipsoid().sum()  # every spleen voxel falls in [-400, 400)
    assert hist["body"].sum() > 0
    assert isinstance(viz.hu_histogram_figure(hist, (-57, 164), "HU"), Figure)
    views = [viz.load_view(i["image"], i["label"]) for i in items]
    assert len(viz.case_gallery(views, "gallery").axes) == 4


def test_training_curves_from_metrics_jsonl(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "loss": 1 / e, "val_dice": (0.1 * e if e % 2 == 0 else None)} for e in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 7, "lo')  # a cut last line
    assert len(viz.read_metrics(path)) == 6
    fig = viz.training_curves(path, "curves")
    legend = fig.axes[1].get_legend().get_texts()[0].get_text()
    assert "best 0.600 (epoch 6)" in legend
    with pytest.raises(ValueError):
        viz.training_curves([])


def test_overlays_and_comparison(case):
    fig = viz.prediction_overlay(case, n_slices=3, title="t")
    assert len(fig.axes) == 3
    empty = viz.ViewCase("empty", case.image, case.spacing, label=np.zeros_like(case.label), pred=None)
    assert len(viz.comparison_figure([("a", case), ("b", empty)], "cmp").axes) == 2
    assert viz.spleen_slices(case.label, 3, case.shape[2]) == sorted(set(viz.spleen_slices(case.label, 3, case.shape[2])))


def test_frame_indices():
    assert viz.frame_indices(5, 10) == [0, 1, 2, 3, 4]
    idx = viz.frame_indices(100, 10)
    assert len(idx) == 10 and idx[0] == 0 and idx[-1] == 99 and idx == sorted(idx)
    assert viz.frame_indices(0, 10) == []


def test_overlay_rgb_colours_outlines():
    img = np.zeros((10, 10), np.float32)
    lab = np.zeros((10, 10), bool)
    lab[3:7, 3:7] = True
    pred = np.zeros((10, 10), bool)
    rgb = viz.overlay_rgb(img, lab, pred)
    assert rgb.dtype == np.uint8 and rgb.shape == (10, 10, 3)
    assert tuple(rgb[3, 3]) == tuple(int(c * 255 + 0.5) for c in viz.GT_COLOR)
    assert tuple(rgb[0, 0]) == (int(0.4 * 255 + 0.5),) * 3  # 0 HU in the (-160, 240) window


def test_slice_gif_has_one_frame_per_slice(case, tmp_path):
    path = viz.slice_gif(case, tmp_path / "gifs" / "slices.gif", max_frames=50, width=64)
    assert path.exists() and viz.gif_frame_count(path) == case.shape[2]
    capped = viz.slice_gif(case, tmp_path / "capped.gif", max_frames=5, width=64)
    assert viz.gif_frame_count(capped) == 5
    import imageio.v3 as iio

    frame = iio.imread(capped, index=0)
    assert frame.shape[1] == 64  # requested width; height follows the millimetre aspect (+ caption)


def test_surface_gif_rotates(case, tmp_path):
    verts, _faces = viz.surface_mesh(case.label, case.spacing)
    extent = verts.max(axis=0) - verts.min(axis=0)
    assert extent[0] == pytest.approx(2 * 6 * 1.5, rel=0.25)  # ellipsoid radius 6 voxels x 1.5 mm
    path = viz.surface_gif(case.label, case.spacing, tmp_path / "surface.gif", n_frames=6, size_px=96)
    assert viz.gif_frame_count(path) == 6
    import imageio.v3 as iio

    frames = iio.imread(path, index=None)
    assert not np.array_equal(frames[0], frames[3])  # it turns
    with pytest.raises(ValueError, match="empty"):
        viz.surface_mesh(np.zeros((4, 4, 4), bool), (1, 1, 1))


def test_js_slider_is_self_contained_html(case):
    html = viz.js_slider(case, max_frames=4, width=64)
    assert "<script" in html and "data:image/jpeg;base64" in html
    assert html.count("data:image/jpeg;base64") == 4


def test_slice_viewer_widget(case):
    pytest.importorskip("ipywidgets")
    viewer = viz.slice_viewer(case, width=64)
    slider, image = viewer.widget.children
    first = image.value
    slider.value = 0 if slider.value else 1
    assert image.value != first  # moving the slider redraws the slice
    assert "needs a running Jupyter kernel" in repr(viewer)
    assert viewer._repr_mimebundle_()["text/plain"] == repr(viewer)


def test_tables_and_bar_chart():
    md = viz.markdown_table([{"a": 0.12345, "b": None, "c": [1, 2]}])
    assert md.splitlines()[2] == "| 0.123 | n/a | 1 × 2 |"
    fig = viz.bar_chart(["torch", "onnx"], [5.0, 3.0], "ms per patch", "latency")
    assert isinstance(fig, Figure)
    png = viz.figure_to_png(fig)
    assert viz.data_uri(png).startswith("data:image/png;base64,")


def test_volume_figure_and_comparison_slice(case):
    rows = [{"name": "a", "label_ml": 100.0, "ml_before": 120.0, "ml_after": 101.0}, {"name": "b", "label_ml": 80.0, "ml_before": None, "ml_after": 75.0}]
    fig = viz.volume_figure(rows, "volumes")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["ground truth", "prediction, raw", "prediction, largest component"]
    fig = viz.comparison_figure([("before", case), ("after", case)], z=2)
    assert fig.axes[0].get_title() == "before"


def test_load_view_takes_arrays_on_the_image_grid(dataset):
    img = dataset / "imagesTr" / "spleen_2.nii.gz"  # stored LPS: no reorientation needed
    mask = _ellipsoid()
    view = viz.load_view(img, dataset / "labelsTr" / "spleen_2.nii.gz", pred=mask)
    assert np.array_equal(view.pred, mask)
    assert view.image.dtype == np.float32 and view.image.min() < -20  # the CT itself, not a mask
    assert np.array_equal(view.image, nib.load(str(img)).get_fdata().astype(np.float32))
    with pytest.raises(ValueError, match="grid"):
        viz.load_view(img, pred=mask[:-1])


def test_agreement_heatmap_prints_every_value():
    m = np.array([[1.0, 0.9991], [0.9991, 1.0]])
    fig = viz.agreement_heatmap(["torch-fp32", "onnx-fp32"], m, "agreement")
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["0.9991", "0.9991", "1.0000", "1.0000"]


def test_grouped_bars_one_bar_per_series_and_name():
    fig = viz.grouped_bars(["a", "b", "c"], {"torch": [0.9, 0.8, None], "onnx": [0.9, 0.8, 0.7]}, "Dice", "t", (0, 1))
    ax = fig.axes[0]
    assert len(ax.patches) == 6 and [t.get_text() for t in ax.get_legend().get_texts()] == ["torch", "onnx"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_geometry_figure_orders_cases_naturally(dataset):
    rows = viz.dataset_table(dataset)
    rows = [dict(rows[0], case=f"spleen_{n}") for n in (10, 2, 1)]
    fig = viz.geometry_figure(rows)
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["1", "2", "10"]


def test_js_slider_opens_on_the_spleen_and_has_a_legend(case):
    html = viz.js_slider(case, max_frames=4, width=64)
    start = viz.slider_start(case, 4)
    z = viz.largest_slice(case.label)
    idx = viz.frame_indices(case.shape[2], 4)
    assert abs(idx[start] - z) == min(abs(i - z) for i in idx)  # the frame nearest the most spleen
    if start:
        assert f".set_frame({start})" in html
    assert "ground truth" in html and "prediction" in html


def test_ct_slice_figures_show_as_jpeg_and_charts_as_png_in_a_kernel(case, monkeypatch):
    from IPython.core.interactiveshell import InteractiveShell

    from spleen_utils.viz import view

    shell = InteractiveShell.instance()
    try:
        monkeypatch.setattr(shell, "kernel", object(), raising=False)  # what the registration looks for
        view._register_inline_formatter()
        overlay = viz.prediction_overlay(case, n_slices=2)
        chart = viz.bar_chart(["torch", "onnx"], [5.0, 3.0], "ms per patch")
        assert isinstance(overlay, viz.SliceFigure) and not isinstance(chart, viz.SliceFigure)
        assert repr(overlay).startswith("<Figure size")  # the stored text form of a figure output is unchanged
        shown, _ = shell.display_formatter.format(overlay)
        assert "image/jpeg" in shown and "image/png" not in shown
        assert base64.b64decode(shown["image/jpeg"])[:2] == b"\xff\xd8"  # a JPEG stream
        shown, _ = shell.display_formatter.format(chart)
        assert "image/png" in shown and "image/jpeg" not in shown
    finally:
        InteractiveShell.clear_instance()
