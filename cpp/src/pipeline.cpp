#include "pipeline.hpp"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "errors.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spleen {

namespace {

constexpr double kAffineTol = 1e-3;  // monai.data.utils.AFFINE_TOL

int nthreads(int threads) {
#ifdef _OPENMP
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    return 1;
#endif
}

// np.round: half to even
double round_half_even(double x) { return std::nearbyint(x); }

// Cholesky factor L (lower) of a symmetric positive definite 3x3 matrix
Mat3 cholesky(const Mat3& m) {
    Mat3 l{};
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j <= i; ++j) {
            double s = m.a[i][j];
            for (int k = 0; k < j; ++k) s -= l.a[i][k] * l.a[j][k];
            if (i == j) {
                if (!(s > 0)) throw InputError("the image's affine is degenerate (its voxel axes are not independent).");
                l.a[i][i] = std::sqrt(s);
            } else {
                l.a[i][j] = s / l.a[j][j];
            }
        }
    return l;
}

}  // namespace

void window_intensities(std::vector<float>& data, double a_min, double a_max, int threads) {
    const float lo = static_cast<float>(a_min), range = static_cast<float>(a_max - a_min);
    const int64_t n = static_cast<int64_t>(data.size());
    float* p = data.data();
#pragma omp parallel for schedule(static) num_threads(nthreads(threads))
    for (int64_t i = 0; i < n; ++i) {
        float x = (p[i] - lo) / range;
        p[i] = x < 0.f ? 0.f : (x > 1.f ? 1.f : x);
    }
}

Box foreground_box(const Volume& v) {
    Box b;
    const int64_t nx = v.dim[0], ny = v.dim[1], nz = v.dim[2];
    Dims lo{nx, ny, nz}, hi{-1, -1, -1};
    const float* p = v.data.data();
    for (int64_t z = 0; z < nz; ++z)
        for (int64_t y = 0; y < ny; ++y) {
            const float* row = p + nx * (y + ny * z);
            int64_t first = -1, last = -1;
            for (int64_t x = 0; x < nx; ++x)
                if (row[x] > 0.f) {
                    if (first < 0) first = x;
                    last = x;
                }
            if (first < 0) continue;
            lo[0] = std::min(lo[0], first);
            hi[0] = std::max(hi[0], last);
            lo[1] = std::min(lo[1], y);
            hi[1] = std::max(hi[1], y);
            lo[2] = std::min(lo[2], z);
            hi[2] = std::max(hi[2], z);
        }
    if (hi[0] < 0) return b;
    b.empty = false;
    for (int i = 0; i < 3; ++i) {
        b.start[i] = lo[i];
        b.end[i] = hi[i] + 1;
    }
    return b;
}

Orientation orientation_to(const Mat4& affine, const std::string& axcodes) {
    // target axis codes -> (world axis, sign) per output axis, nibabel's default labels
    static const char* pos = "RAS";
    static const char* neg = "LPI";
    if (axcodes.size() != 3) throw InputError("the model's recipe orientation '" + axcodes + "' is not 3 axis codes.");
    std::array<int, 3> dst_world{}, dst_sign{};
    for (int k = 0; k < 3; ++k) {
        char c = axcodes[k];
        int w = -1, s = 0;
        for (int a = 0; a < 3; ++a) {
            if (c == pos[a]) w = a, s = 1;
            if (c == neg[a]) w = a, s = -1;
        }
        if (w < 0) throw InputError("the model's recipe orientation '" + axcodes + "' uses an unknown axis code.");
        for (int j = 0; j < k; ++j)
            if (dst_world[j] == w)
                throw InputError("the model's recipe orientation '" + axcodes + "' names an axis twice.");
        dst_world[k] = w;
        dst_sign[k] = s;
    }

    // nibabel.orientations.io_orientation: closest rotation (polar decomposition), then greedy
    Mat3 rs = Mat3::from(affine);
    for (int j = 0; j < 3; ++j) {
        double n = std::sqrt(rs.a[0][j] * rs.a[0][j] + rs.a[1][j] * rs.a[1][j] + rs.a[2][j] * rs.a[2][j]);
        if (n == 0) throw InputError("the image's affine is degenerate (a voxel axis has zero length).");
        for (int i = 0; i < 3; ++i) rs.a[i][j] /= n;
    }
    if (!(std::fabs(rs.det()) > 1e-8)) throw InputError("the image's affine is degenerate (its voxel axes are not independent).");
    Mat3 r = rs;  // Newton iteration for the orthogonal polar factor
    for (int it = 0; it < 100; ++it) {
        Mat3 it_t = r.inverse().transpose();
        Mat3 nr{};
        double diff = 0;
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) {
                nr.a[i][j] = 0.5 * (r.a[i][j] + it_t.a[i][j]);
                diff = std::max(diff, std::fabs(nr.a[i][j] - r.a[i][j]));
            }
        r = nr;
        if (diff < 1e-15) break;
    }
    std::array<int, 3> src_world{}, src_sign{};
    for (int in = 0; in < 3; ++in) {
        int best = 0;
        for (int i = 1; i < 3; ++i)
            if (std::fabs(r.a[i][in]) > std::fabs(r.a[best][in])) best = i;
        if (r.a[best][in] == 0.0) throw InputError("the image's affine is degenerate (cannot tell its orientation).");
        src_world[in] = best;
        src_sign[in] = r.a[best][in] < 0 ? -1 : 1;
        for (int j = 0; j < 3; ++j) r.a[best][j] = 0.0;
    }
    // nibabel.orientations.ornt_transform(src, dst)
    Orientation o;
    for (int in = 0; in < 3; ++in) {
        for (int k = 0; k < 3; ++k)
            if (dst_world[k] == src_world[in]) {
                o.axis[in] = k;
                o.sign[in] = src_sign[in] == dst_sign[k] ? 1 : -1;
            }
        o.input_codes += src_sign[in] > 0 ? pos[src_world[in]] : neg[src_world[in]];
    }
    return o;
}

Plan make_plan(const Volume& v, const Box& box, const Recipe& rc) {
    Plan p;
    p.box = box;
    p.ornt = orientation_to(v.affine, rc.orientation);
    const Dims cdim = box.size();

    // crop: the cropped grid's origin moves to the box start
    Mat4 crop = Mat4::identity();
    for (int i = 0; i < 3; ++i) crop.a[i][3] = static_cast<double>(box.start[i]);
    // orientation: oriented index j -> cropped index i
    Mat4 t = Mat4::zeros();
    t.a[3][3] = 1.0;
    for (int in = 0; in < 3; ++in) {
        int out = p.ornt.axis[in];
        p.ras_dim[out] = cdim[in];
        t.a[in][out] = p.ornt.sign[in];
        t.a[in][3] = p.ornt.sign[in] > 0 ? 0.0 : static_cast<double>(cdim[in] - 1);
    }
    p.ras_affine = v.affine * crop * t;

    // Spacing (MONAI, diagonal=False): keep the directions, set the column norms to the target
    const Mat4& a = p.ras_affine;
    std::array<double, 3> out_d{};
    for (int j = 0; j < 3; ++j) {
        double n = std::sqrt(a.a[0][j] * a.a[0][j] + a.a[1][j] * a.a[1][j] + a.a[2][j] * a.a[2][j]);
        double target = rc.pixdim[j];
        out_d[j] = (target - kAffineTol <= n && n <= target + kAffineTol) ? n : target;
    }
    p.res_spacing = out_d;
    Mat3 rzs = Mat3::from(a);
    Mat3 zs = cholesky(rzs.transpose() * rzs).transpose();  // upper triangular
    Mat3 rot = rzs * zs.inverse();
    Mat4 na = Mat4::identity();
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) na.a[i][j] = rot.a[i][j] * (zs.a[j][j] < 0 ? -out_d[j] : out_d[j]);

    // monai.data.utils.compute_shape_offset(scale_extent=False)
    Mat4 m = inverse(na) * a;
    double corners[3][8], out_c[3][8];
    for (int c = 0; c < 8; ++c) {
        Vec3 in{(c & 4) ? double(p.ras_dim[0] - 1) : 0.0, (c & 2) ? double(p.ras_dim[1] - 1) : 0.0,
                (c & 1) ? double(p.ras_dim[2] - 1) : 0.0};
        Vec3 o = m.apply(in);
        Vec3 w = a.apply(in);
        for (int i = 0; i < 3; ++i) {
            out_c[i][c] = o[i];
            corners[i][c] = w[i];
        }
    }
    // the resampled grid, bounded before anything is allocated (spleen_utils.infer.check_resampled_size):
    // each axis checked as a double before it becomes an integer, the product overflow-checked
    std::array<double, 3> extent{};
    for (int i = 0; i < 3; ++i) {
        double lo = *std::min_element(out_c[i], out_c[i] + 8), hi = *std::max_element(out_c[i], out_c[i] + 8);
        extent[i] = round_half_even(hi - lo + 1.0);
    }
    auto too_large = [&]() {
        char buf[320];
        std::snprintf(buf, sizeof buf,
                      "at the model's %gx%gx%g mm voxels the image would become %.6gx%.6gx%.6g voxels, more than the "
                      "%lld this program accepts (check the header's voxel size).",
                      rc.pixdim[0], rc.pixdim[1], rc.pixdim[2], extent[0], extent[1], extent[2],
                      static_cast<long long>(kMaxResampledVoxels));
        return InputError(buf);
    };
    int64_t total = 1;
    for (int i = 0; i < 3; ++i) {
        if (!std::isfinite(extent[i])) throw InputError("the image's grid on the model's spacing is not a finite size.");
        if (extent[i] > static_cast<double>(kMaxResampledVoxels)) throw too_large();
        p.res_dim[i] = extent[i] < 1.0 ? 1 : static_cast<int64_t>(extent[i]);
        if (__builtin_mul_overflow(total, p.res_dim[i], &total) || total > kMaxResampledVoxels) throw too_large();
    }
    bool found = false;
    Vec3 offset{};
    for (int c = 0; c < 8 && !found; ++c) {
        bool is_min = true;
        for (int i = 0; i < 3; ++i) {
            double mn = 0;
            for (int k = 0; k < 8; ++k) mn = std::min(mn, out_c[i][k] - out_c[i][c]);
            if (!(std::fabs(mn) <= 1e-8)) is_min = false;
        }
        if (is_min) {
            found = true;
            for (int i = 0; i < 3; ++i) offset[i] = corners[i][c];
        }
    }
    if (!found)  // centre-aligned, as MONAI falls back to
        for (int i = 0; i < 3; ++i) {
            offset[i] = a.a[i][3];
            for (int j = 0; j < 3; ++j)
                offset[i] += a.a[i][j] * (p.ras_dim[j] / 2.0) - na.a[i][j] * (p.res_dim[j] / 2.0);
        }
    for (int i = 0; i < 3; ++i) na.a[i][3] = offset[i];
    p.res_affine = na;
    p.res_to_ras = inverse(p.ras_affine) * p.res_affine;
    p.ras_to_res = inverse(p.res_affine) * p.ras_affine;
    bool same_size = p.res_dim == p.ras_dim;
    p.identity = same_size && (allclose(p.ras_affine, p.res_affine, kAffineTol) ||
                               allclose(p.res_to_ras, Mat4::identity(), kAffineTol));
    if (p.identity) {  // MONAI keeps the image and its affine as they are
        p.res_affine = p.ras_affine;
        p.res_to_ras = p.ras_to_res = Mat4::identity();
    }
    return p;
}

std::vector<float> gather_oriented(const Volume& v, const Plan& p, int threads) {
    const Dims& rd = p.ras_dim;
    const Dims cdim = p.box.size();
    std::vector<float> out(static_cast<size_t>(numel(rd)));
    // for each input axis: stride in the input array, and how it runs along the output axis
    const int64_t stride_in[3] = {1, v.dim[0], v.dim[0] * v.dim[1]};
    int64_t base = p.box.start[0] * stride_in[0] + p.box.start[1] * stride_in[1] + p.box.start[2] * stride_in[2];
    int64_t step[3] = {0, 0, 0};  // input offset per unit step of output axis k
    for (int in = 0; in < 3; ++in) {
        int k = p.ornt.axis[in];
        if (p.ornt.sign[in] > 0) {
            step[k] = stride_in[in];
        } else {
            step[k] = -stride_in[in];
            base += (cdim[in] - 1) * stride_in[in];
        }
    }
    const float* src = v.data.data();
#pragma omp parallel for schedule(static) num_threads(nthreads(threads))
    for (int64_t i0 = 0; i0 < rd[0]; ++i0)
        for (int64_t i1 = 0; i1 < rd[1]; ++i1) {
            const float* s = src + base + i0 * step[0] + i1 * step[1];
            float* d = out.data() + (i0 * rd[1] + i1) * rd[2];
            for (int64_t i2 = 0; i2 < rd[2]; ++i2) d[i2] = s[i2 * step[2]];
        }
    return out;
}

std::vector<float> resample(const float* src, const Dims& sd, const Mat4& xf, const Dims& dd, int threads) {
    std::vector<float> out(static_cast<size_t>(numel(dd)));
    const double lim[3] = {double(sd[0] - 1), double(sd[1] - 1), double(sd[2] - 1)};
    const int64_t s1 = sd[1] * sd[2], s2 = sd[2];
#pragma omp parallel for schedule(static) num_threads(nthreads(threads))
    for (int64_t o0 = 0; o0 < dd[0]; ++o0)
        for (int64_t o1 = 0; o1 < dd[1]; ++o1) {
            float* d = out.data() + (o0 * dd[1] + o1) * dd[2];
            for (int64_t o2 = 0; o2 < dd[2]; ++o2) {
                double c[3];
                int64_t lo[3], hi[3];
                double w[3];
                for (int k = 0; k < 3; ++k) {
                    double x = xf.a[k][0] * o0 + xf.a[k][1] * o1 + xf.a[k][2] * o2 + xf.a[k][3];
                    x = x < 0 ? 0 : (x > lim[k] ? lim[k] : x);  // border padding
                    c[k] = std::floor(x);
                    w[k] = x - c[k];
                    lo[k] = static_cast<int64_t>(c[k]);
                    hi[k] = lo[k] + 1 > (int64_t)lim[k] ? lo[k] : lo[k] + 1;  // its weight is 0 there
                }
                const float* b00 = src + lo[0] * s1 + lo[1] * s2;
                const float* b01 = src + lo[0] * s1 + hi[1] * s2;
                const float* b10 = src + hi[0] * s1 + lo[1] * s2;
                const float* b11 = src + hi[0] * s1 + hi[1] * s2;
                double v00 = b00[lo[2]] + w[2] * (double(b00[hi[2]]) - b00[lo[2]]);
                double v01 = b01[lo[2]] + w[2] * (double(b01[hi[2]]) - b01[lo[2]]);
                double v10 = b10[lo[2]] + w[2] * (double(b10[hi[2]]) - b10[lo[2]]);
                double v11 = b11[lo[2]] + w[2] * (double(b11[hi[2]]) - b11[lo[2]]);
                double v0 = v00 + w[1] * (v01 - v00), v1 = v10 + w[1] * (v11 - v10);
                d[o2] = static_cast<float>(v0 + w[0] * (v1 - v0));
            }
        }
    return out;
}

namespace {

// monai.data.utils.dense_patch_slices: window starts along one axis
std::vector<int64_t> window_starts(int64_t size, int64_t roi, double overlap) {
    int64_t interval = roi == size ? roi : std::max<int64_t>(static_cast<int64_t>(roi * (1.0 - overlap)), 1);
    int64_t num = static_cast<int64_t>(std::ceil(static_cast<double>(size) / interval));
    int64_t scan = 1;
    for (int64_t d = 0; d < num; ++d)
        if (d * interval + roi >= size) {
            scan = d + 1;
            break;
        }
    std::vector<int64_t> starts;
    for (int64_t i = 0; i < scan; ++i) {
        int64_t s = i * interval;
        s -= std::max<int64_t>(s + roi - size, 0);
        starts.push_back(s);
    }
    return starts;
}

}  // namespace

std::vector<float> sliding_window(const std::vector<float>& image, const Dims& d, const Dims& roi, double overlap,
                                  int64_t batch, int64_t channels, const NetFn& net, WindowStats& stats, int threads) {
    // pad (constant 0) to at least one window, half before and half after, as MONAI does
    Dims P{}, before{};
    for (int k = 0; k < 3; ++k) {
        P[k] = std::max(d[k], roi[k]);
        before[k] = (P[k] - d[k]) / 2;
    }
    std::vector<float> padded;
    const float* img = image.data();
    if (P != d) {
        padded.assign(static_cast<size_t>(numel(P)), 0.f);
        for (int64_t i0 = 0; i0 < d[0]; ++i0)
            for (int64_t i1 = 0; i1 < d[1]; ++i1)
                std::copy_n(image.data() + (i0 * d[1] + i1) * d[2], d[2],
                            padded.data() + ((i0 + before[0]) * P[1] + i1 + before[1]) * P[2] + before[2]);
        img = padded.data();
    }
    std::array<std::vector<int64_t>, 3> starts;
    for (int k = 0; k < 3; ++k) starts[k] = window_starts(P[k], roi[k], overlap);
    std::vector<Dims> wins;
    for (int64_t a : starts[0])
        for (int64_t b : starts[1])
            for (int64_t c : starts[2]) wins.push_back({a, b, c});
    stats.roi = roi;
    stats.padded = P;
    stats.windows = static_cast<int64_t>(wins.size());

    // constant blending: each voxel's count is the product of its per-axis window counts
    std::array<std::vector<float>, 3> cnt;
    for (int k = 0; k < 3; ++k) {
        cnt[k].assign(static_cast<size_t>(P[k]), 0.f);
        for (int64_t s : starts[k])
            for (int64_t i = s; i < s + roi[k]; ++i) cnt[k][i] += 1.f;
    }

    const int64_t wv = numel(roi);
    std::vector<float> sum(static_cast<size_t>(channels * numel(P)), 0.f);
    std::vector<float> in(static_cast<size_t>(std::min<int64_t>(batch, stats.windows) * wv));
    std::vector<float> out(static_cast<size_t>(std::min<int64_t>(batch, stats.windows) * channels * wv));
    for (size_t first = 0; first < wins.size(); first += batch) {
        const int64_t n = std::min<int64_t>(batch, static_cast<int64_t>(wins.size() - first));
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads(threads))
        for (int64_t b = 0; b < n; ++b)
            for (int64_t i0 = 0; i0 < roi[0]; ++i0) {
                const Dims& s = wins[first + b];
                for (int64_t i1 = 0; i1 < roi[1]; ++i1)
                    std::copy_n(img + ((s[0] + i0) * P[1] + s[1] + i1) * P[2] + s[2], roi[2],
                                in.data() + b * wv + (i0 * roi[1] + i1) * roi[2]);
            }
        net(in.data(), n, roi, out.data());
        stats.runs += 1;
        // windows overlap one another: add them one after the other, in MONAI's order
        for (int64_t b = 0; b < n; ++b) {
            const Dims& s = wins[first + b];
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads(threads))
            for (int64_t c = 0; c < channels; ++c)
                for (int64_t i0 = 0; i0 < roi[0]; ++i0)
                    for (int64_t i1 = 0; i1 < roi[1]; ++i1) {
                        const float* y = out.data() + ((b * channels + c) * roi[0] + i0) * roi[1] * roi[2] + i1 * roi[2];
                        float* t = sum.data() + c * numel(P) + ((s[0] + i0) * P[1] + s[1] + i1) * P[2] + s[2];
                        for (int64_t i2 = 0; i2 < roi[2]; ++i2) t[i2] += y[i2];
                    }
        }
    }
    // average and crop the padding away
    std::vector<float> res(static_cast<size_t>(channels * numel(d)));
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads(threads))
    for (int64_t c = 0; c < channels; ++c)
        for (int64_t i0 = 0; i0 < d[0]; ++i0)
            for (int64_t i1 = 0; i1 < d[1]; ++i1) {
                const int64_t p0 = i0 + before[0], p1 = i1 + before[1];
                const float c01 = cnt[0][p0] * cnt[1][p1];
                const float* t = sum.data() + c * numel(P) + (p0 * P[1] + p1) * P[2] + before[2];
                float* r = res.data() + c * numel(d) + (i0 * d[1] + i1) * d[2];
                for (int64_t i2 = 0; i2 < d[2]; ++i2) r[i2] = t[i2] / (c01 * cnt[2][before[2] + i2]);
            }
    return res;
}

std::vector<uint8_t> scatter_to_input(const std::vector<uint8_t>& ras, const Volume& v, const Plan& p, int threads) {
    std::vector<uint8_t> mask(static_cast<size_t>(v.size()), 0);
    if (p.box.empty) return mask;
    const Dims cdim = p.box.size();
    const Dims& rd = p.ras_dim;
    const int64_t rstride[3] = {rd[1] * rd[2], rd[2], 1};
    int64_t base = 0, step[3];
    for (int in = 0; in < 3; ++in) {
        int k = p.ornt.axis[in];
        if (p.ornt.sign[in] > 0) {
            step[in] = rstride[k];
        } else {
            step[in] = -rstride[k];
            base += (cdim[in] - 1) * rstride[k];
        }
    }
    const int64_t nx = v.dim[0], ny = v.dim[1];
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads(threads))
    for (int64_t z = 0; z < cdim[2]; ++z)
        for (int64_t y = 0; y < cdim[1]; ++y) {
            const uint8_t* s = ras.data() + base + z * step[2] + y * step[1];
            uint8_t* d = mask.data() + p.box.start[0] + nx * (p.box.start[1] + y + ny * (p.box.start[2] + z));
            for (int64_t x = 0; x < cdim[0]; ++x) d[x] = s[x * step[0]];
        }
    return mask;
}

}  // namespace spleen
