// The preprocessing recipe, read from the ONNX model's metadata (key "recipe", JSON): what
// spleen_utils.artifact.onnx_metadata writes from spleen_utils.config.Recipe.to_dict. The field
// names are Python's (spleen_utils/transforms.py: PREPROCESSING_FIELDS, WINDOW_FIELDS);
// tests/test_transforms.py parses recipe.cpp and main.cpp and checks them against the Python side.
#pragma once

#include <array>
#include <string>
#include <vector>

namespace spleen {

struct Recipe {
    std::array<double, 3> pixdim{};     // target spacing (mm) along the oriented axes
    std::string orientation;             // axis codes, e.g. "RAS"
    std::array<double, 2> hu_window{};   // [a_min, a_max] -> [0, 1], clipped
    std::array<int64_t, 3> sw_roi{};     // sliding-window size (voxels)
    int64_t sw_batch_size = 0;           // windows per network run
    double overlap = 0.0;                // sliding-window overlap in [0, 1)
    std::vector<std::string> labels;     // output channels, background first
    int64_t divisor = 1;                 // spatial sizes the network accepts are multiples of this

    std::string summary() const;
};

// Parses and validates the JSON text; throws InputError naming the bad or missing field.
Recipe parse_recipe(const std::string& json_text);

}  // namespace spleen
