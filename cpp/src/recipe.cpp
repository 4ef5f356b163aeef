#include "recipe.hpp"

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "errors.hpp"

namespace spleen {

namespace {

using nlohmann::json;

const json& field(const json& j, const char* key) {
    auto it = j.find(key);
    if (it == j.end()) throw InputError(std::string("the model's recipe has no '") + key + "' field.");
    return *it;
}

template <size_t N>
std::array<double, N> numbers(const json& j, const char* key) {
    const json& v = field(j, key);
    if (!v.is_array() || v.size() != N)
        throw InputError(std::string("the model's recipe field '") + key + "' must be a list of " + std::to_string(N) +
                         " numbers.");
    std::array<double, N> out{};
    for (size_t i = 0; i < N; ++i) {
        if (!v[i].is_number() || !std::isfinite(v[i].get<double>()))
            throw InputError(std::string("the model's recipe field '") + key + "' holds a non-number.");
        out[i] = v[i].get<double>();
    }
    return out;
}

int64_t positive_int(const json& v, const std::string& what) {
    if (!v.is_number_integer() || v.get<int64_t>() < 1)
        throw InputError("the model's recipe field '" + what + "' must be a positive integer.");
    return v.get<int64_t>();
}

}  // namespace

Recipe parse_recipe(const std::string& text) {
    json j;
    try {
        j = json::parse(text);
    } catch (const json::exception& e) {
        throw InputError(std::string("the model's 'recipe' metadata is not valid JSON (") + e.what() + ").");
    }
    if (!j.is_object()) throw InputError("the model's 'recipe' metadata is not a JSON object.");
    Recipe r;
    r.pixdim = numbers<3>(j, "pixdim");
    for (double d : r.pixdim)  // spleen_utils.config.MIN_PIXDIM_MM / MAX_PIXDIM_MM
        if (!(d >= 0.05 && d <= 50.0))
            throw InputError("the model's recipe field 'pixdim' must be 3 voxel sizes from 0.05 to 50 mm.");

    const json& o = field(j, "orientation");
    if (!o.is_string()) throw InputError("the model's recipe field 'orientation' must be a string such as \"RAS\".");
    r.orientation = o.get<std::string>();

    r.hu_window = numbers<2>(j, "hu_window");
    if (!(r.hu_window[1] > r.hu_window[0]))
        throw InputError("the model's recipe field 'hu_window' must be [low, high] with high > low.");

    const json& roi = field(j, "sw_roi");
    if (!roi.is_array() || roi.size() != 3)
        throw InputError("the model's recipe field 'sw_roi' must be a list of 3 positive integers.");
    for (int i = 0; i < 3; ++i) {
        r.sw_roi[i] = positive_int(roi[i], "sw_roi");
        if (r.sw_roi[i] > 1024)  // spleen_utils.config.MAX_ROI
            throw InputError("the model's recipe field 'sw_roi' must be whole numbers from 1 to 1024.");
    }

    r.sw_batch_size = positive_int(field(j, "sw_batch_size"), "sw_batch_size");
    if (r.sw_batch_size > 1024) throw InputError("the model's recipe field 'sw_batch_size' must be a whole number from 1 to 1024.");

    const json& ov = field(j, "overlap");
    if (!ov.is_number() || !(ov.get<double>() >= 0.0 && ov.get<double>() < 1.0))
        throw InputError("the model's recipe field 'overlap' must be a number in [0, 1).");
    r.overlap = ov.get<double>();

    const json& labels = field(j, "labels");
    if (!labels.is_array() || labels.size() < 2 || labels.size() > 256)
        throw InputError("the model's recipe field 'labels' must list 2 to 256 label names.");
    for (const auto& l : labels) {
        if (!l.is_string()) throw InputError("the model's recipe field 'labels' must hold strings.");
        r.labels.push_back(l.get<std::string>());
    }

    // the network halves each spatial size once per stride: sizes must divide by their product
    r.divisor = 1;
    auto st = j.find("strides");
    if (st != j.end() && st->is_array()) {
        for (const auto& s : *st) {
            if (!s.is_number_integer() || s.get<int64_t>() < 1 || s.get<int64_t>() > 8)
                throw InputError("the model's recipe field 'strides' must hold whole numbers from 1 to 8.");
            if (r.divisor > 1024) throw InputError("the model's recipe field 'strides' multiplies to more than 1024.");
            r.divisor *= s.get<int64_t>();
        }
    }
    for (int i = 0; i < 3; ++i)
        if (r.sw_roi[i] % r.divisor != 0)
            throw InputError("the model's recipe 'sw_roi' is not a multiple of " + std::to_string(r.divisor) +
                             ", which the network's strides require.");
    return r;
}

std::string Recipe::summary() const {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "pixdim %gx%gx%g mm, %s, HU window [%g, %g], roi %lldx%lldx%lld, overlap %g, %lld windows/run, "
                  "%zu labels",
                  pixdim[0], pixdim[1], pixdim[2], orientation.c_str(), hu_window[0], hu_window[1],
                  (long long)sw_roi[0], (long long)sw_roi[1], (long long)sw_roi[2], overlap, (long long)sw_batch_size,
                  labels.size());
    return buf;
}

}  // namespace spleen
