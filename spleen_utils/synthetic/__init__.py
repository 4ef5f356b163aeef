"""Synthetic CT-like abdominal phantoms, written as a dataset in the exact MSD Task09 Spleen layout.

This is the data of the ``quick`` profile: a set that a residual 3D UNet learns on a laptop CPU in
minutes, yet one that cannot be solved by a threshold. A case is made in three steps, one module
each, all drawing from one :class:`numpy.random.Generator` per case (so everything is
deterministic per seed):

* :mod:`.anatomy`: where every tissue lies (body wall, abdominal organs, spine, ribs, lung bases
  and the spleen on the patient's left, posterior and superior), as a map of :class:`Tissue` codes;
* :mod:`.appearance`: Hounsfield units on that map (spleen and liver enhance alike, so location
  and shape, not intensity, identify the spleen), texture, partial volume and noise;
* :mod:`.header`: the sampling grid (in-plane spacing 0.6-1.0 mm, slices 1.5-5 mm, 120-200 mm
  along z around the spleen) and the storage orientation (RAS, LPS or LAS): voxels and affine are
  reoriented together, so the anatomy's world coordinates do not depend on how a file stores it.

:func:`generate_case` (in :mod:`.phantom`) runs the three; :mod:`.dataset` writes a whole set,
phantoms and cases painted on real label maps (:mod:`spleen_utils.labelmaps`), with its
``dataset.json``.
"""

from .anatomy import SPLEEN_VOLUME_ML, Tissue
from .dataset import VERSION, case_plan, case_seed, dataset_json, write_profile_dataset, write_synthetic_dataset
from .header import INPLANE_SPACING_MM, MAX_VOXELS, ORIENTATIONS, SLICE_SPACING_MM, Phantom
from .phantom import generate_case, make_phantom

__all__ = [
    "INPLANE_SPACING_MM", "MAX_VOXELS", "ORIENTATIONS", "SLICE_SPACING_MM", "SPLEEN_VOLUME_ML", "VERSION",
    "Phantom", "Tissue", "case_plan", "case_seed", "dataset_json", "generate_case", "make_phantom",
    "write_profile_dataset", "write_synthetic_dataset",
]
