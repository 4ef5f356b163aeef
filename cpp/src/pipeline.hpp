// The geometry and intensity steps of the spleen pipeline. The spec they mirror is the one in
// spleen_utils/transforms.py (its MONAI reference chain, _deterministic / inference_transforms)
// and its fast array path spleen_utils.preprocess.prepare: window HU -> crop to foreground -> orient
// (RAS) -> resample to the recipe spacing, and back to the input grid after the network.
// Every constant comes from the ONNX file's "recipe" metadata (recipe.cpp), the same fields
// spleen_utils.transforms names: hu_window, orientation, pixdim (PREPROCESSING_FIELDS) and
// sw_roi, sw_batch_size, overlap (WINDOW_FIELDS); tests/test_transforms.py checks the keys match.
// Arrays here are C-order over (i0, i1, i2): index (i0 * d1 + i1) * d2 + i2, the layout of the
// network's (N, C, X, Y, Z) tensors. The input Volume keeps NIfTI order (x fastest).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "linalg.hpp"
#include "nifti_io.hpp"
#include "recipe.hpp"

namespace spleen {

using Dims = std::array<int64_t, 3>;

// the most voxels a volume may have on the recipe's grid (spleen_utils.preprocess.MAX_RESAMPLED_VOXELS)
constexpr int64_t kMaxResampledVoxels = int64_t(1) << 28;

inline int64_t numel(const Dims& d) { return d[0] * d[1] * d[2]; }

// ScaleIntensityRange(a_min, a_max -> 0, 1, clip=True), in place
void window_intensities(std::vector<float>& data, double a_min, double a_max, int threads);

struct Box {
    Dims start{}, end{};  // end exclusive
    bool empty = true;
    Dims size() const { return {end[0] - start[0], end[1] - start[1], end[2] - start[2]}; }
};

// CropForeground's bounding box of voxels > 0
Box foreground_box(const Volume& v);

// Reorientation of the cropped volume: input axis i becomes output axis `axis[i]`, reversed if
// sign[i] < 0 (nibabel's io_orientation + ornt_transform, as MONAI's Orientation uses them).
struct Orientation {
    std::array<int, 3> axis{};
    std::array<int, 3> sign{};
    std::string input_codes;  // the input's axis codes, e.g. "LAS"
};
Orientation orientation_to(const Mat4& affine, const std::string& axcodes);

struct Plan {
    Box box;                // crop on the input grid
    Orientation ornt;
    Dims ras_dim{};         // cropped + oriented grid
    Mat4 ras_affine;
    Dims res_dim{};         // resampled to the recipe's spacing
    Mat4 res_affine;
    std::array<double, 3> res_spacing{};
    Mat4 res_to_ras;        // resampled voxel index -> oriented voxel index
    Mat4 ras_to_res;        // and back
    bool identity = false;  // the spacing step changes nothing (MONAI skips it)
};

Plan make_plan(const Volume& v, const Box& box, const Recipe& r);

// the cropped, oriented volume (C-order over ras_dim)
std::vector<float> gather_oriented(const Volume& v, const Plan& p, int threads);

// trilinear resampling with border padding (torch grid_sample, align_corners=False semantics):
// dst[o] = src(xform * o) for every voxel index o of `dd`
std::vector<float> resample(const float* src, const Dims& sd, const Mat4& xform, const Dims& dd, int threads);

// Sliding-window inference (monai.inferers.sliding_window_inference, constant blending).
// `net(in, n, out)` runs n windows: in (n, 1, roi...) -> out (n, channels, roi...).
struct WindowStats {
    Dims roi{}, padded{};
    int64_t windows = 0, runs = 0;
};
using NetFn = std::function<void(const float* in, int64_t n, const Dims& roi, float* out)>;
std::vector<float> sliding_window(const std::vector<float>& image, const Dims& d, const Dims& roi, double overlap,
                                  int64_t batch, int64_t channels, const NetFn& net, WindowStats& stats, int threads);

// from labels on the oriented grid (C-order over ras_dim) back to the input grid (NIfTI order)
std::vector<uint8_t> scatter_to_input(const std::vector<uint8_t>& ras_labels, const Volume& v, const Plan& p,
                                      int threads);

}  // namespace spleen
