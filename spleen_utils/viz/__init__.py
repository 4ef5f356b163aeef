"""Figures, GIFs, tables and the slice viewer of the tutorial.

Everything here is headless: figures are :class:`matplotlib.figure.Figure` objects drawn with the
Agg canvas (no pyplot state, no GUI, no figure left open), GIFs are written with imageio. In a
Jupyter kernel a returned figure shows inline (the package registers the formatter): a figure of
CT slices as a JPEG, any other as a PNG.

- :mod:`.view`: the case a figure draws (:class:`ViewCase`, :func:`load_view`, LPS display
  convention, colours, display window);
- :mod:`.figures`: the data, training, prediction and benchmark figures;
- :mod:`.animation`: frames, GIFs, the rotating surface, the JavaScript slider and the viewer;
- :mod:`.tables`: Markdown tables, a dataset's geometry table, a run's metrics.

Every name is also available here, as ``viz.<name>``.
"""

from .animation import (SliceViewer, axial_frame, frame_indices, gif_frame_count, js_slider, overlay_rgb,
                        show_gif, slice_frames, slice_gif, slice_viewer, slider_start, surface_frames,
                        surface_gif, surface_mesh, write_gif)
from .figures import (ORGANS, agreement_heatmap, appearance_gallery, bar_chart, case_gallery, comparison_figure,
                      data_uri, figure_to_png, geometry_figure, grouped_bars, hu_histogram_figure, hu_histograms,
                      organ_hu_figure, organ_hu_histograms, organ_masks, prediction_overlay, training_curves,
                      volume_figure)
from ..config import SYNTHETIC_NOTE  # figure titles say when the data is generated (notebook 07 reads viz.SYNTHETIC_NOTE)
from .tables import dataset_table, markdown_table, natural_key, read_metrics
from .view import (DISPLAY_WINDOW, GT_COLOR, PRED_COLOR, SliceFigure, ViewCase, largest_slice,
                   load_view, spleen_slices, to_lps, window01)

__all__ = [
    "DISPLAY_WINDOW", "GT_COLOR", "ORGANS", "PRED_COLOR", "SYNTHETIC_NOTE", "SliceFigure", "SliceViewer", "ViewCase",
    "agreement_heatmap", "appearance_gallery", "axial_frame", "bar_chart", "case_gallery", "comparison_figure",
    "data_uri", "dataset_table", "figure_to_png", "frame_indices", "geometry_figure", "gif_frame_count",
    "grouped_bars", "hu_histogram_figure", "hu_histograms", "js_slider", "largest_slice", "load_view",
    "markdown_table", "natural_key", "organ_hu_figure", "organ_hu_histograms", "organ_masks", "overlay_rgb",
    "prediction_overlay", "read_metrics", "show_gif", "slice_frames", "slice_gif", "slice_viewer", "slider_start",
    "spleen_slices", "surface_frames", "surface_gif", "surface_mesh", "to_lps", "training_curves",
    "volume_figure", "window01", "write_gif",
]
