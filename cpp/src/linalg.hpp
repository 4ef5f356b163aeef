// Small 4x4 / 3x3 affine algebra in double precision (what MONAI and nibabel compute in float64).
#pragma once

#include <array>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace spleen {

using Vec3 = std::array<double, 3>;
using Vec4 = std::array<double, 4>;

struct Mat4 {
    double a[4][4];

    static Mat4 identity() {
        Mat4 m{};
        for (int i = 0; i < 4; ++i) m.a[i][i] = 1.0;
        return m;
    }
    static Mat4 zeros() { return Mat4{}; }

    Mat4 operator*(const Mat4& o) const {
        Mat4 r{};
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) {
                double s = 0.0;
                for (int k = 0; k < 4; ++k) s += a[i][k] * o.a[k][j];
                r.a[i][j] = s;
            }
        return r;
    }
    Vec4 operator*(const Vec4& v) const {
        Vec4 r{};
        for (int i = 0; i < 4; ++i) {
            double s = 0.0;
            for (int k = 0; k < 4; ++k) s += a[i][k] * v[k];
            r[i] = s;
        }
        return r;
    }
    // the image of a voxel index (homogeneous 1 appended)
    Vec3 apply(const Vec3& v) const {
        Vec3 r{};
        for (int i = 0; i < 3; ++i) r[i] = a[i][0] * v[0] + a[i][1] * v[1] + a[i][2] * v[2] + a[i][3];
        return r;
    }
    bool finite() const {
        for (auto& row : a)
            for (double x : row)
                if (!std::isfinite(x)) return false;
        return true;
    }
    std::string str() const {
        std::string s = "[";
        for (int i = 0; i < 4; ++i) {
            s += i ? ", [" : "[";
            for (int j = 0; j < 4; ++j) {
                char buf[32];
                std::snprintf(buf, sizeof buf, j ? ", %.6g" : "%.6g", a[i][j]);
                s += buf;
            }
            s += "]";
        }
        return s + "]";
    }
};

// Gauss-Jordan inverse with partial pivoting; throws on a singular matrix.
inline Mat4 inverse(const Mat4& m) {
    double w[4][8];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 8; ++j) w[i][j] = j < 4 ? m.a[i][j] : (j - 4 == i ? 1.0 : 0.0);
    for (int c = 0; c < 4; ++c) {
        int p = c;
        for (int r = c + 1; r < 4; ++r)
            if (std::fabs(w[r][c]) > std::fabs(w[p][c])) p = r;
        if (!(std::fabs(w[p][c]) > 1e-300)) throw std::runtime_error("singular affine matrix");
        if (p != c)
            for (int j = 0; j < 8; ++j) std::swap(w[p][j], w[c][j]);
        double d = w[c][c];
        for (int j = 0; j < 8; ++j) w[c][j] /= d;
        for (int r = 0; r < 4; ++r) {
            if (r == c) continue;
            double f = w[r][c];
            if (f != 0.0)
                for (int j = 0; j < 8; ++j) w[r][j] -= f * w[c][j];
        }
    }
    Mat4 r{};
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) r.a[i][j] = w[i][j + 4];
    return r;
}

// numpy.allclose semantics: |a - b| <= atol + rtol * |b|
inline bool allclose(const Mat4& a, const Mat4& b, double atol, double rtol = 1e-5) {
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
            if (!(std::fabs(a.a[i][j] - b.a[i][j]) <= atol + rtol * std::fabs(b.a[i][j]))) return false;
    return true;
}

struct Mat3 {
    double a[3][3];
    static Mat3 from(const Mat4& m) {
        Mat3 r{};
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) r.a[i][j] = m.a[i][j];
        return r;
    }
    Mat3 operator*(const Mat3& o) const {
        Mat3 r{};
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j)
                for (int k = 0; k < 3; ++k) r.a[i][j] += a[i][k] * o.a[k][j];
        return r;
    }
    Mat3 transpose() const {
        Mat3 r{};
        for (int i = 0; i < 3; ++i)
            for (int j = 0; j < 3; ++j) r.a[i][j] = a[j][i];
        return r;
    }
    double det() const {
        return a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1]) - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0]) +
               a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]);
    }
    Mat3 inverse() const {
        double d = det();
        if (!(std::fabs(d) > 1e-300) || !std::isfinite(d)) throw std::runtime_error("singular 3x3 matrix");
        Mat3 r{};
        r.a[0][0] = (a[1][1] * a[2][2] - a[1][2] * a[2][1]) / d;
        r.a[0][1] = (a[0][2] * a[2][1] - a[0][1] * a[2][2]) / d;
        r.a[0][2] = (a[0][1] * a[1][2] - a[0][2] * a[1][1]) / d;
        r.a[1][0] = (a[1][2] * a[2][0] - a[1][0] * a[2][2]) / d;
        r.a[1][1] = (a[0][0] * a[2][2] - a[0][2] * a[2][0]) / d;
        r.a[1][2] = (a[0][2] * a[1][0] - a[0][0] * a[1][2]) / d;
        r.a[2][0] = (a[1][0] * a[2][1] - a[1][1] * a[2][0]) / d;
        r.a[2][1] = (a[0][1] * a[2][0] - a[0][0] * a[2][1]) / d;
        r.a[2][2] = (a[0][0] * a[1][1] - a[0][1] * a[1][0]) / d;
        return r;
    }
};

}  // namespace spleen
