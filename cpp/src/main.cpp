// spleen_infer: segment the spleen in a NIfTI CT with an ONNX model and ONNX Runtime (C++ API).
//
//   spleen_infer MODEL.onnx INPUT.nii[.gz] OUTPUT.nii[.gz] [--threads N]
//
// Everything the pipeline needs (spacing, orientation, HU window, sliding window) is read from the
// model's "recipe" metadata. The mask is written on the input's own grid (dims, qform/sform, pixdim).
// Exit status: 0 done, 2 unusable input (arguments, image, model, output path), 1 anything else.

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "errors.hpp"
#include "nifti_io.hpp"
#include "pipeline.hpp"
#include "recipe.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

using namespace spleen;

namespace {

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
    return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

const char* kUsage =
    "usage: spleen_infer MODEL.onnx INPUT.nii[.gz] OUTPUT.nii[.gz] [--threads N] [--window auto|whole|sliding]\n"
    "                    [--max-window-voxels N]\n"
    "  Segments the spleen in a 3D CT with an ONNX model exported by spleen_utils (its 'recipe'\n"
    "  metadata holds the preprocessing) and writes a uint8 mask on the input's grid.\n"
    "  --threads N   CPU threads for ONNX Runtime and the resampling (default: all cores)\n"
    "  --window W    how the network sees the preprocessed volume, as spleen_utils.infer.Predictor:\n"
    "                whole:   one window, the volume zero-padded to at least the ROI, multiples of 16;\n"
    "                sliding: the recipe's sw_roi / overlap / sw_batch_size windows, averaged;\n"
    "                auto (default): whole if the volume fits within the ROI and the padded one has\n                at most --max-window-voxels"
    "                voxels (default 20000000), else sliding\n";

struct Args {
    std::string model, input, output;
    int threads = 0;
    std::string window = "auto";
    int64_t max_window_voxels = 20000000;  // spleen_utils.infer.DEFAULT_MAX_WINDOW_VOXELS
};

// "--name value" or "--name=value"; advances i past a separate value
bool option_value(int argc, char** argv, int& i, const std::string& name, std::string& value) {
    std::string s = argv[i];
    if (s == name) {
        if (i + 1 >= argc) throw InputError(name + " needs a value.");
        value = argv[++i];
        return true;
    }
    if (s.rfind(name + "=", 0) == 0) {
        value = s.substr(name.size() + 1);
        return true;
    }
    return false;
}

int64_t whole_number(const std::string& name, const std::string& v, int64_t lo, int64_t hi) {
    char* end = nullptr;
    errno = 0;
    long long n = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno != 0 || n < lo || n > hi)
        throw InputError(name + " must be a whole number from " + std::to_string(lo) + " to " + std::to_string(hi) +
                         ", not '" + v + "'.");
    return n;
}

Args parse_args(int argc, char** argv) {
    Args a;
    std::vector<std::string> pos;
    for (int i = 1; i < argc; ++i) {
        std::string s = argv[i];
        if (s == "-h" || s == "--help") {
            std::fputs(kUsage, stdout);
            std::exit(0);
        } else if (std::string v; option_value(argc, argv, i, "--threads", v)) {
            a.threads = static_cast<int>(whole_number("--threads", v, 1, 1024));
        } else if (option_value(argc, argv, i, "--window", v)) {
            if (v != "auto" && v != "whole" && v != "sliding")
                throw InputError("--window must be auto, whole or sliding, not '" + v + "'.");
            a.window = v;
        } else if (option_value(argc, argv, i, "--max-window-voxels", v)) {
            a.max_window_voxels = whole_number("--max-window-voxels", v, 1, int64_t(1) << 40);
        } else if (s.size() > 1 && s[0] == '-') {
            throw InputError("unknown option '" + s + "'.");
        } else {
            pos.push_back(s);
        }
    }
    if (pos.size() != 3) throw InputError("expected MODEL INPUT OUTPUT, got " + std::to_string(pos.size()) + " paths.");
    a.model = pos[0];
    a.input = pos[1];
    a.output = pos[2];
    if (!is_nifti_name(a.output)) throw InputError(a.output + ": the output must be named .nii or .nii.gz.");
    return a;
}

std::string dims_str(const Dims& d) {
    return std::to_string(d[0]) + "x" + std::to_string(d[1]) + "x" + std::to_string(d[2]);
}

struct Model {
    Ort::Env env{ORT_LOGGING_LEVEL_ERROR, "spleen_infer"};
    Ort::Session session{nullptr};
    std::string input_name, output_name;
    Recipe recipe;
    int64_t channels = 0;
};

void open_model(Model& m, const std::string& path, int threads) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) throw InputError(path + ": cannot open the model (" + std::strerror(errno) + ").");
    std::fclose(f);
    Ort::SessionOptions so;
    if (threads > 0) so.SetIntraOpNumThreads(threads);
    so.SetInterOpNumThreads(1);
    so.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    try {
        m.session = Ort::Session(m.env, path.c_str(), so);
    } catch (const Ort::Exception& e) {
        std::string msg = e.what();
        if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
        throw InputError(path + ": not a usable ONNX model (" + msg + ").");
    }
    Ort::AllocatorWithDefaultOptions alloc;
    Ort::ModelMetadata meta = m.session.GetModelMetadata();
    Ort::AllocatedStringPtr fmt = meta.LookupCustomMetadataMapAllocated("spleen_utils.format", alloc);
    if (fmt && std::string(fmt.get()) != "spleen_utils.onnx/1")
        throw InputError(path + ": spleen_utils ONNX format '" + fmt.get() + "' is not the one this program reads (spleen_utils.onnx/1).");
    Ort::AllocatedStringPtr text = meta.LookupCustomMetadataMapAllocated("recipe", alloc);
    if (!text) throw InputError(path + ": the model has no 'recipe' metadata; export it with spleen_utils.export.");
    m.recipe = parse_recipe(text.get());

    if (m.session.GetInputCount() != 1 || m.session.GetOutputCount() < 1)
        throw InputError(path + ": the model must have one input and an output.");
    m.input_name = m.session.GetInputNameAllocated(0, alloc).get();
    m.output_name = m.session.GetOutputNameAllocated(0, alloc).get();
    Ort::TypeInfo in_type = m.session.GetInputTypeInfo(0), out_type = m.session.GetOutputTypeInfo(0);
    if (in_type.GetONNXType() != ONNX_TYPE_TENSOR || out_type.GetONNXType() != ONNX_TYPE_TENSOR)
        throw InputError(path + ": the model's input and output must be tensors.");
    auto in_info = in_type.GetTensorTypeAndShapeInfo();  // views into in_type / out_type
    auto out_info = out_type.GetTensorTypeAndShapeInfo();
    if (in_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || in_info.GetDimensionsCount() != 5)
        throw InputError(path + ": the model's input must be a float32 tensor (N, 1, X, Y, Z).");
    if (out_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || out_info.GetDimensionsCount() != 5)
        throw InputError(path + ": the model's output must be a float32 tensor (N, C, X, Y, Z).");
    int64_t c = out_info.GetShape()[1];
    m.channels = static_cast<int64_t>(m.recipe.labels.size());
    if (c > 0 && c != m.channels)
        throw InputError(path + ": the model has " + std::to_string(c) + " output channels but its recipe lists " +
                         std::to_string(m.channels) + " labels.");
}

int run(const Args& args) {
    const auto t_start = Clock::now();
    const int threads = args.threads;
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#endif

    auto t0 = Clock::now();
    Model model;
    open_model(model, args.model, threads);
    const Recipe& rc = model.recipe;
    const double t_load = ms_since(t0);
    std::printf("model    %s (ONNX Runtime %s, C API %d)\n", args.model.c_str(), Ort::GetVersionString().c_str(),
                ORT_API_VERSION);
    std::printf("recipe   %s\n", rc.summary().c_str());

    t0 = Clock::now();
    Volume vol = read_volume(args.input);
    const double t_read = ms_since(t0);
    std::printf("input    %s: %s %s, spacing %.4gx%.4gx%.4g mm, affine from %s\n", args.input.c_str(),
                dims_str(vol.dim).c_str(), vol.datatype.c_str(), vol.pixdim[0], vol.pixdim[1], vol.pixdim[2],
                vol.affine_source.c_str());

    // preprocess: window -> crop to foreground -> orient -> resample
    t0 = Clock::now();
    window_intensities(vol.data, rc.hu_window[0], rc.hu_window[1], threads);
    Box box = foreground_box(vol);
    Plan plan;
    std::vector<float> image;
    if (!box.empty) {
        try {
            plan = make_plan(vol, box, rc);  // bounds the resampled grid before it is allocated
        } catch (const InputError& e) {
            throw InputError(args.input + ": " + e.what());
        }
        std::vector<float> ras = gather_oriented(vol, plan, threads);
        image = plan.identity ? std::move(ras) : resample(ras.data(), plan.ras_dim, plan.res_to_ras, plan.res_dim, threads);
    }
    vol.data.clear();
    vol.data.shrink_to_fit();
    const double t_pre = ms_since(t0);

    double t_inf = 0, t_post = 0;
    std::vector<uint8_t> mask;
    WindowStats ws;
    const char* window_used = "none";
    if (box.empty) {
        std::printf("note     no voxel above the HU window's low end (%g): the mask is empty\n", rc.hu_window[0]);
        mask.assign(static_cast<size_t>(vol.size()), 0);
    } else {
        std::printf("grid     %s foreground %s -> %s %s -> %s at %.4gx%.4gx%.4g mm%s\n", plan.ornt.input_codes.c_str(),
                    dims_str(box.size()).c_str(), rc.orientation.c_str(), dims_str(plan.ras_dim).c_str(),
                    dims_str(plan.res_dim).c_str(), plan.res_spacing[0], plan.res_spacing[1], plan.res_spacing[2],
                    plan.identity ? " (no resampling needed)" : "");

        // inference
        t0 = Clock::now();
        Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
        const char* in_names[] = {model.input_name.c_str()};
        const char* out_names[] = {model.output_name.c_str()};
        Ort::RunOptions ro;
        const int64_t C = model.channels;
        NetFn net = [&](const float* in, int64_t n, const Dims& roi, float* out) {
            const int64_t vox = numel(roi);
            std::array<int64_t, 5> ishape{n, 1, roi[0], roi[1], roi[2]};
            std::array<int64_t, 5> oshape{n, C, roi[0], roi[1], roi[2]};
            Ort::Value x = Ort::Value::CreateTensor<float>(mem, const_cast<float*>(in), static_cast<size_t>(n * vox),
                                                           ishape.data(), ishape.size());
            Ort::Value y = Ort::Value::CreateTensor<float>(mem, out, static_cast<size_t>(n * C * vox), oshape.data(),
                                                           oshape.size());
            model.session.Run(ro, in_names, &x, 1, out_names, &y, 1);
        };
        // spleen_utils.infer.Predictor's window="auto": a volume within the ROI runs as one window
        // zero-padded to at least the ROI (a tighter pad starves the network of the context it
        // was trained with: Dice 0.20 at multiples of 16), rounded to the strides' product; a
        // larger one takes the recipe's overlapping sliding window
        Dims whole{};
        bool within_roi = true;
        for (int k = 0; k < 3; ++k) {
            int64_t n = std::max<int64_t>(plan.res_dim[k], rc.sw_roi[k]);
            whole[k] = (n + rc.divisor - 1) / rc.divisor * rc.divisor;
            within_roi = within_roi && plan.res_dim[k] <= rc.sw_roi[k];
        }
        bool use_whole = args.window == "whole" ||
                         (args.window == "auto" && within_roi &&
                          static_cast<double>(numel(whole)) <= static_cast<double>(args.max_window_voxels));
        std::vector<float> logits = use_whole
            ? sliding_window(image, plan.res_dim, whole, 0.0, 1, C, net, ws, threads)
            : sliding_window(image, plan.res_dim, rc.sw_roi, rc.overlap, rc.sw_batch_size, C, net, ws, threads);
        window_used = use_whole ? "whole" : "sliding";
        image.clear();
        image.shrink_to_fit();
        t_inf = ms_since(t0);
        std::printf("windows  %s: %lld of %s (image padded to %s) in %lld run(s)\n", window_used,
                    (long long)ws.windows, dims_str(ws.roi).c_str(), dims_str(ws.padded).c_str(), (long long)ws.runs);

        // postprocess: logits back to the oriented input grid, argmax, back to the input grid.
        // Two labels: resample the margin (spleen - background) only; its sign is the argmax.
        t0 = Clock::now();
        const int64_t nres = numel(plan.res_dim), nras = numel(plan.ras_dim);
        std::vector<uint8_t> labels(static_cast<size_t>(nras), 0);
        if (C == 2) {
            std::vector<float> margin(static_cast<size_t>(nres));
            for (int64_t i = 0; i < nres; ++i) margin[i] = logits[nres + i] - logits[i];
            logits.clear();
            logits.shrink_to_fit();
            std::vector<float> back =
                plan.identity ? std::move(margin) : resample(margin.data(), plan.res_dim, plan.ras_to_res, plan.ras_dim, threads);
            for (int64_t i = 0; i < nras; ++i) labels[i] = back[i] > 0.f ? 1 : 0;
        } else {
            std::vector<float> best(static_cast<size_t>(nras));
            for (int64_t c = 0; c < C; ++c) {
                std::vector<float> back =
                    plan.identity ? std::vector<float>(logits.begin() + c * nres, logits.begin() + (c + 1) * nres)
                                  : resample(logits.data() + c * nres, plan.res_dim, plan.ras_to_res, plan.ras_dim, threads);
                for (int64_t i = 0; i < nras; ++i)
                    if (c == 0 || back[i] > best[i]) best[i] = back[i], labels[i] = static_cast<uint8_t>(c);
            }
        }
        mask = scatter_to_input(labels, vol, plan, threads);
        t_post = ms_since(t0);
    }

    int64_t fg = 0;
    for (uint8_t m : mask) fg += m != 0;
    const double voxel_ml = std::fabs(Mat3::from(vol.affine).det()) / 1000.0;
    std::printf("result   %lld %s voxels (%.1f mL)\n", (long long)fg, rc.labels.size() == 2 ? rc.labels[1].c_str() : "foreground",
                fg * voxel_ml);

    t0 = Clock::now();
    write_mask(args.output, vol, mask);
    const double t_write = ms_since(t0);
    const double t_total = ms_since(t_start);
    std::printf("output   %s\n", args.output.c_str());
    std::printf("timing   load_model %.1f ms, read %.1f ms, preprocess %.1f ms, inference %.1f ms, postprocess %.1f ms, "
                "write %.1f ms, total %.1f ms\n",
                t_load, t_read, t_pre, t_inf, t_post, t_write, t_total);
    std::printf("{\"timings_ms\": {\"load_model\": %.3f, \"read\": %.3f, \"preprocess\": %.3f, \"inference\": %.3f, "
                "\"postprocess\": %.3f, \"write\": %.3f, \"total\": %.3f}, \"windows\": %lld, \"runs\": %lld, "
                "\"window\": \"%s\", \"foreground_voxels\": %lld, \"threads\": %d}\n",
                t_load, t_read, t_pre, t_inf, t_post, t_write, t_total, (long long)ws.windows, (long long)ws.runs,
                window_used, (long long)fg, threads);
    return 0;
}

std::string one_line(std::string s) {
    for (char& c : s)
        if (c == '\n' || c == '\r') c = ' ';
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        Args args = parse_args(argc, argv);
        return run(args);
    } catch (const InputError& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "spleen_infer: error: %s%s\n", one_line(e.what()).c_str(),
                     argc < 4 ? " (spleen_infer --help shows the usage)" : "");
        return 2;
    } catch (const Ort::Exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "spleen_infer: error: ONNX Runtime failed: %s\n", one_line(e.what()).c_str());
        return 1;
    } catch (const std::bad_alloc&) {
        std::fflush(stdout);
        std::fprintf(stderr, "spleen_infer: error: out of memory.\n");
        return 1;
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "spleen_infer: error: %s\n", one_line(e.what()).c_str());
        return 1;
    }
}
