#include "nifti_io.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <limits>
#include <new>

#include "errors.hpp"

extern "C" {
#include <nifti2_io.h>
}

namespace spleen {

struct NiftiHeaderHandle {
    nifti_image* nim = nullptr;  // header only (data freed after conversion)
    ~NiftiHeaderHandle() {
        if (nim) nifti_image_free(nim);
    }
};

namespace {

constexpr int64_t kMaxVoxels = 1000000000;  // same limit as spleen_utils.io
constexpr int64_t kMaxExtensionBytes = int64_t(1) << 20;  // spleen_utils.io.MAX_EXTENSION_BYTES
constexpr double kMinSpacingMm = 1e-3, kMaxSpacingMm = 100.0;  // spleen_utils.infer.MIN/MAX_SPACING_MM

// ---- the header guard (spleen_utils.io.check_nifti_stream): the NIfTI-1/-2 header and its
// extension table checked with bounded reads before nifti_image_read(), which skips or trusts
// what it cannot parse and prints its own multi-line errors.

struct Znz {
    znzFile fp;
    ~Znz() {
        if (!znz_isnull(fp)) znzclose(fp);
    }
};

size_t read_upto(znzFile fp, unsigned char* dst, size_t n) {
    size_t got = 0;
    while (got < n) {
        size_t r = znzread(dst + got, 1, n - got, fp);
        if (r == 0) break;
        got += r;
    }
    return got;
}

template <typename T>
T field_at(const unsigned char* p, bool swap) {
    unsigned char b[sizeof(T)];
    std::memcpy(b, p, sizeof(T));
    if (swap) std::reverse(b, b + sizeof(T));
    T v;
    std::memcpy(&v, b, sizeof(T));
    return v;
}

bool known_datatype(int code) {
    switch (code) {
        case 1: case 2: case 4: case 8: case 16: case 32: case 64: case 128: case 255: case 256: case 512:
        case 768: case 1024: case 1280: case 1536: case 1792: case 2048: case 2304:
            return true;
        default:
            return false;
    }
}

void check_header_bytes(const std::string& path, int64_t file_size, bool gz) {
    Znz f{znzopen(path.c_str(), "rb", gz ? 1 : 0)};
    if (znz_isnull(f.fp)) throw InputError(path + ": cannot open the file.");
    unsigned char h[540];
    size_t got = read_upto(f.fp, h, 348);
    int hsize = 0;
    bool swap = false;
    if (got >= 4) {
        for (bool s : {false, true}) {
            int32_t v = field_at<int32_t>(h, s);
            if (v == 348 || v == 540) {
                hsize = v;
                swap = s;
                break;
            }
        }
    }
    if (hsize == 0) throw InputError(path + ": not a NIfTI file (its first bytes are not a NIfTI-1 or NIfTI-2 header).");
    if (got == 348 && hsize == 540) got += read_upto(f.fp, h + 348, 540 - 348);
    if (got < static_cast<size_t>(hsize))
        throw InputError(path + ": the file ends after " + std::to_string(got) + " bytes, inside its NIfTI header; it is truncated.");
    const bool two = hsize == 540;
    std::string magic(reinterpret_cast<const char*>(h + (two ? 4 : 344)), 3);
    bool single = magic == (two ? "n+2" : "n+1");
    if (!single && magic != (two ? "ni2" : "ni1")) throw InputError(path + ": not a NIfTI file (the header's magic string is wrong).");
    if (two) {
        const unsigned char* e = h + 8;
        bool ok = (e[0] == 13 && e[1] == 10 && e[2] == 26 && e[3] == 10) || (e[0] == 0 && e[1] == 0 && e[2] == 0 && e[3] == 0);
        if (!ok) throw InputError(path + ": the NIfTI-2 header's end-of-line check bytes are wrong; the file was corrupted in transfer.");
    }
    int64_t dim[8];
    for (int i = 0; i < 8; ++i)
        dim[i] = two ? field_at<int64_t>(h + 16 + 8 * i, swap) : field_at<int16_t>(h + 40 + 2 * i, swap);
    if (dim[0] < 1 || dim[0] > 7)
        throw InputError(path + ": the NIfTI header declares " + std::to_string(dim[0]) + " dimensions; a NIfTI image has 1 to 7.");
    for (int i = 1; i <= dim[0]; ++i)
        if (dim[i] < 0) throw InputError(path + ": the NIfTI header declares a negative size (dim " + std::to_string(dim[i]) + ").");
    int datatype = field_at<int16_t>(h + (two ? 12 : 70), swap);
    if (!known_datatype(datatype))
        throw InputError(path + ": the NIfTI header's voxel datatype code " + std::to_string(datatype) + " is not a NIfTI datatype.");
    double vox = two ? static_cast<double>(field_at<int64_t>(h + 168, swap)) : field_at<float>(h + 108, swap);
    if (!std::isfinite(vox) || vox < 0)
        throw InputError(path + ": the NIfTI header's voxel offset is negative or not a number.");
    if (vox > 9.0e18) throw InputError(path + ": the NIfTI header's voxel offset lies beyond the end of the file; it is truncated or corrupt.");
    const int64_t vox_offset = static_cast<int64_t>(vox);
    const int64_t single_offset = two ? 544 : 352;
    if (single && vox_offset > 0 && vox_offset < single_offset)
        throw InputError(path + ": the NIfTI header's voxel offset (" + std::to_string(vox_offset) + ") points inside the header itself.");
    if (file_size >= 0 && vox_offset > file_size)
        throw InputError(path + ": the NIfTI header's voxel offset (" + std::to_string(vox_offset) + ") lies beyond the end of the " +
                         std::to_string(file_size) + "-byte file; it is truncated or corrupt.");
    auto real = [&](int off1, int off2) { return two ? field_at<double>(h + off2, swap) : static_cast<double>(field_at<float>(h + off1, swap)); };
    for (int i = 1; i <= 3; ++i)
        if (!std::isfinite(real(76 + 4 * i, 104 + 8 * i))) throw InputError(path + ": the NIfTI header's pixdim holds NaN or infinite numbers.");
    int qcode = two ? field_at<int32_t>(h + 344, swap) : field_at<int16_t>(h + 252, swap);
    int scode = two ? field_at<int32_t>(h + 348, swap) : field_at<int16_t>(h + 254, swap);
    if (qcode > 0)
        for (int i = 0; i < 6; ++i)
            if (!std::isfinite(real(256 + 4 * i, 352 + 8 * i))) throw InputError(path + ": the NIfTI header's qform holds NaN or infinite numbers.");
    if (scode > 0)
        for (int i = 0; i < 12; ++i)
            if (!std::isfinite(real(280 + 4 * i, 400 + 8 * i))) throw InputError(path + ": the NIfTI header's sform holds NaN or infinite numbers.");

    unsigned char flag[4];
    if (read_upto(f.fp, flag, 4) < 4 || flag[0] == 0) return;
    // extensions until the voxel offset (to the end of the file when the offset is 0), as readers do
    int64_t pos = hsize + 4, remaining = vox_offset - pos, total = 0;
    std::vector<unsigned char> skip(1 << 16);
    while (remaining >= 16 || remaining < 0) {
        unsigned char eh[8];
        size_t n = read_upto(f.fp, eh, 8);
        if (n == 0 && remaining < 0) break;
        if (n < 8) throw InputError(path + ": the file ends inside a NIfTI header extension; it is truncated or corrupt.");
        int64_t esize = field_at<int32_t>(eh, swap);
        if (esize < 16 || esize % 16)
            throw InputError(path + ": a NIfTI header extension declares " + std::to_string(esize) +
                             " bytes; extension sizes are positive multiples of 16.");
        if (remaining >= 0 && esize > remaining)
            throw InputError(path + ": a NIfTI header extension of " + std::to_string(esize) +
                             " bytes runs past the start of the voxel data (offset " + std::to_string(vox_offset) + ").");
        if (file_size >= 0 && pos + esize > file_size)
            throw InputError(path + ": a NIfTI header extension of " + std::to_string(esize) + " bytes runs past the end of the " +
                             std::to_string(file_size) + "-byte file.");
        total += esize;
        if (total > kMaxExtensionBytes)
            throw InputError(path + ": the NIfTI header extensions take more than " + std::to_string(kMaxExtensionBytes >> 20) +
                             " MiB; this program accepts at most that much metadata.");
        for (int64_t left = esize - 8; left > 0;) {
            size_t want = static_cast<size_t>(std::min<int64_t>(left, static_cast<int64_t>(skip.size())));
            size_t r = read_upto(f.fp, skip.data(), want);
            if (r < want) throw InputError(path + ": the file ends inside a NIfTI header extension; it is truncated or corrupt.");
            left -= static_cast<int64_t>(r);
        }
        pos += esize;
        if (remaining >= 0) remaining -= esize;
    }
}

struct NimGuard {
    nifti_image* nim;
    ~NimGuard() {
        if (nim) nifti_image_free(nim);
    }
};

bool ends_with(const std::string& s, const std::string& suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

template <typename T>
void convert(const void* src, float* dst, int64_t n, bool scaled, double slope, double inter) {
    const T* p = static_cast<const T*>(src);
    if (scaled)
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(static_cast<double>(p[i]) * slope + inter);
    else
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(p[i]);
}

// nibabel's affine when neither qform nor sform is set: Analyze-style, x flipped, centred.
Mat4 base_affine(const std::array<int64_t, 3>& dim, const std::array<double, 3>& zooms) {
    Mat4 m = Mat4::identity();
    for (int i = 0; i < 3; ++i) {
        double z = zooms[i] == 0.0 ? 1.0 : std::fabs(zooms[i]);
        if (i == 0) z = -z;
        m.a[i][i] = z;
        m.a[i][3] = -(static_cast<double>(dim[i]) - 1.0) / 2.0 * z;
    }
    return m;
}

Mat4 from_dmat44(const nifti_dmat44& d) {
    Mat4 m{};
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) m.a[i][j] = d.m[i][j];
    return m;
}

// The voxels, read here rather than with nifti_image_load(): that one silently turns NaN and
// infinite floats into 0, which would hide a damaged image (spleen_utils.io rejects them).
void read_voxels(nifti_image* nim, const std::string& path) {
    const int64_t nbytes = static_cast<int64_t>(nim->nvox) * nim->nbyper;
    if (nim->iname == nullptr || nim->iname_offset < 0 || nbytes <= 0)
        throw InputError(path + ": the header's voxel offset or size is invalid.");
    nim->data = std::malloc(static_cast<size_t>(nbytes));
    if (!nim->data) throw std::bad_alloc();
    znzFile fp = znzopen(nim->iname, "rb", nifti_is_gzfile(nim->iname));
    if (znz_isnull(fp)) throw InputError(path + ": cannot open the voxel data.");
    // znzseek returns 0 (fseek) or the new offset (gzseek); -1 on failure
    bool ok = znzseek(fp, static_cast<znz_off_t>(nim->iname_offset), SEEK_SET) >= 0;
    char* dst = static_cast<char*>(nim->data);
    int64_t done = 0;
    while (ok && done < nbytes) {
        size_t chunk = static_cast<size_t>(std::min<int64_t>(nbytes - done, int64_t(1) << 28));
        size_t got = znzread(dst + done, 1, chunk, fp);
        if (got == 0) break;
        done += static_cast<int64_t>(got);
    }
    znzclose(fp);
    if (!ok || done < nbytes)
        throw InputError(path + ": cannot read the voxels; the file is truncated or corrupt (" +
                         std::to_string(done) + " of " + std::to_string(nbytes) + " bytes).");
    if (nim->swapsize > 1 && nim->byteorder != nifti_short_order())
        nifti_swap_Nbytes(static_cast<int64_t>(nim->nvox), nim->swapsize, nim->data);
}

}  // namespace

bool is_nifti_name(const std::string& path) { return ends_with(path, ".nii") || ends_with(path, ".nii.gz"); }

Volume read_volume(const std::string& path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) throw InputError(path + ": no such file.");
    if (S_ISDIR(st.st_mode)) throw InputError(path + ": is a folder, not a NIfTI file.");
    if (!is_nifti_name(path)) throw InputError(path + ": not a NIfTI file name (expected .nii or .nii.gz).");

    check_header_bytes(path, nifti_is_gzfile(path.c_str()) ? -1 : static_cast<int64_t>(st.st_size),
                       nifti_is_gzfile(path.c_str()) != 0);
    nifti_set_debug_level(0);  // our own one-line messages replace nifti_clib's
    NimGuard g{nifti_image_read(path.c_str(), 0)};
    nifti_image* nim = g.nim;
    if (!nim)
        throw InputError(path + ": not a readable NIfTI file (the header is missing, truncated or not NIfTI).");
    if (nim->nifti_type == NIFTI_FTYPE_ASCII) throw InputError(path + ": is an ASCII NIfTI file, not a binary one.");

    // dimensions: a trailing singleton (x, y, z, 1) is a 3D image written as 4D
    int ndim = static_cast<int>(nim->dim[0]);
    if (ndim < 1 || ndim > 7) throw InputError(path + ": the header declares " + std::to_string(ndim) + " dimensions.");
    std::vector<int64_t> shape(nim->dim + 1, nim->dim + 1 + ndim);
    while (shape.size() > 3 && shape.back() == 1) shape.pop_back();
    std::string shape_str;
    for (size_t i = 0; i < shape.size(); ++i) shape_str += (i ? "x" : "") + std::to_string(shape[i]);
    if (shape.size() != 3)
        throw InputError(path + ": the image is " + std::to_string(shape.size()) + "D (shape " + shape_str +
                         "); a 3D CT volume is needed.");
    for (int64_t s : shape)
        if (s < 1) throw InputError(path + ": the image has an empty dimension (shape " + shape_str + ").");
    if (static_cast<double>(shape[0]) * static_cast<double>(shape[1]) * static_cast<double>(shape[2]) >
        static_cast<double>(kMaxVoxels))
        throw InputError(path + ": the header declares " + shape_str + " voxels, more than this program accepts.");

    switch (nim->datatype) {
        case DT_UINT8: case DT_INT8: case DT_INT16: case DT_UINT16: case DT_INT32: case DT_UINT32:
        case DT_INT64: case DT_UINT64: case DT_FLOAT32: case DT_FLOAT64: case DT_FLOAT128:
            break;
        default:
            throw InputError(path + ": the image has voxel type " + nifti_datatype_string(nim->datatype) +
                             "; a numeric (integer or float) type is needed.");
    }

    read_voxels(nim, path);

    Volume v;
    v.dim = {shape[0], shape[1], shape[2]};
    const int64_t n = v.size();
    if (static_cast<int64_t>(nim->nvox) < n) throw InputError(path + ": the header's voxel count is inconsistent.");
    v.datatype = nifti_datatype_string(nim->datatype);
    if (v.datatype.rfind("DT_", 0) == 0) v.datatype = v.datatype.substr(3);
    v.pixdim = {nim->dx, nim->dy, nim->dz};

    // intensity scaling as nibabel applies it: a zero or non-finite slope means unscaled
    double slope = nim->scl_slope, inter = nim->scl_inter;
    bool scaled = std::isfinite(slope) && slope != 0.0;
    if (!std::isfinite(inter)) inter = 0.0;
    if (scaled && slope == 1.0 && inter == 0.0) scaled = false;

    v.data.resize(static_cast<size_t>(n));
    float* dst = v.data.data();
    const void* src = nim->data;
    switch (nim->datatype) {
        case DT_UINT8: convert<uint8_t>(src, dst, n, scaled, slope, inter); break;
        case DT_INT8: convert<int8_t>(src, dst, n, scaled, slope, inter); break;
        case DT_INT16: convert<int16_t>(src, dst, n, scaled, slope, inter); break;
        case DT_UINT16: convert<uint16_t>(src, dst, n, scaled, slope, inter); break;
        case DT_INT32: convert<int32_t>(src, dst, n, scaled, slope, inter); break;
        case DT_UINT32: convert<uint32_t>(src, dst, n, scaled, slope, inter); break;
        case DT_INT64: convert<int64_t>(src, dst, n, scaled, slope, inter); break;
        case DT_UINT64: convert<uint64_t>(src, dst, n, scaled, slope, inter); break;
        case DT_FLOAT32: convert<float>(src, dst, n, scaled, slope, inter); break;
        case DT_FLOAT64: convert<double>(src, dst, n, scaled, slope, inter); break;
        case DT_FLOAT128: convert<long double>(src, dst, n, scaled, slope, inter); break;
    }
    for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(dst[i])) throw InputError(path + ": the image contains NaN or infinite voxels.");

    // voxel -> world: sform if its code is set, else qform, else nibabel's pixdim fallback
    if (nim->sform_code > 0) {
        v.affine = from_dmat44(nim->sto_xyz);
        v.affine_source = "sform";
    } else if (nim->qform_code > 0) {
        v.affine = from_dmat44(nim->qto_xyz);
        v.affine_source = "qform";
    } else {
        v.affine = base_affine(v.dim, v.pixdim);
        v.affine_source = "pixdim (no qform/sform code)";
    }
    v.affine.a[3][0] = v.affine.a[3][1] = v.affine.a[3][2] = 0.0;
    v.affine.a[3][3] = 1.0;
    if (!v.affine.finite()) throw InputError(path + ": the image's " + v.affine_source + " affine is not finite.");
    // plausible voxel sizes (spleen_utils.infer.check_spacing): beyond them the header is wrong
    {
        std::array<double, 3> sp{};
        char text[128];
        for (int j = 0; j < 3; ++j)
            sp[j] = std::sqrt(v.affine.a[0][j] * v.affine.a[0][j] + v.affine.a[1][j] * v.affine.a[1][j] +
                              v.affine.a[2][j] * v.affine.a[2][j]);
        std::snprintf(text, sizeof text, "%.4gx%.4gx%.4g", sp[0], sp[1], sp[2]);
        for (double s : sp)
            if (!(s >= kMinSpacingMm && s <= kMaxSpacingMm))
                throw InputError(path + ": a voxel size of " + text + " mm is outside the 0.001 to 100 mm this program accepts; "
                                 "the header's geometry is wrong.");
        if (!(std::fabs(Mat3::from(v.affine).det()) >= 1e-9 * sp[0] * sp[1] * sp[2]))
            throw InputError(path + ": the affine is degenerate (its voxel axes are not independent).");
    }

    // keep the header (not the voxels) for writing the mask
    free(nim->data);
    nim->data = nullptr;
    v.header = std::make_shared<NiftiHeaderHandle>();
    v.header->nim = nim;
    g.nim = nullptr;
    return v;
}

void write_mask(const std::string& path, const Volume& ref, const std::vector<uint8_t>& mask) {
    if (!is_nifti_name(path)) throw InputError(path + ": the output must be named .nii or .nii.gz.");
    if (static_cast<int64_t>(mask.size()) != ref.size()) throw std::logic_error("mask size differs from the input grid");
    const nifti_image* in = ref.header->nim;

    NimGuard g{nifti_copy_nim_info(in)};
    nifti_image* out = g.nim;
    if (!out) throw std::runtime_error("cannot allocate the output NIfTI header");
    nifti_free_extensions(out);

    // the input's exact grid: dims, pixdim, qform and sform are kept from the copied header
    out->ndim = out->dim[0] = 3;
    out->nx = out->dim[1] = ref.dim[0];
    out->ny = out->dim[2] = ref.dim[1];
    out->nz = out->dim[3] = ref.dim[2];
    out->nt = out->nu = out->nv = out->nw = 1;
    for (int i = 4; i < 8; ++i) out->dim[i] = 1;
    out->nvox = static_cast<int64_t>(mask.size());
    out->datatype = DT_UINT8;
    out->nbyper = 1;
    out->swapsize = 0;
    out->scl_slope = 1.0;
    out->scl_inter = 0.0;
    out->cal_min = 0.0;
    out->cal_max = 0.0;
    out->intent_code = NIFTI_INTENT_NONE;
    out->intent_p1 = out->intent_p2 = out->intent_p3 = 0.0;
    std::memset(out->intent_name, 0, sizeof out->intent_name);
    std::memset(out->descrip, 0, sizeof out->descrip);
    std::snprintf(out->descrip, sizeof out->descrip, "spleen_infer segmentation");
    out->byteorder = nifti_short_order();
    bool big = ref.dim[0] > 32767 || ref.dim[1] > 32767 || ref.dim[2] > 32767;
    out->nifti_type = (in->nifti_type == NIFTI_FTYPE_NIFTI2_1 || in->nifti_type == NIFTI_FTYPE_NIFTI2_2 || big)
                          ? NIFTI_FTYPE_NIFTI2_1
                          : NIFTI_FTYPE_NIFTI1_1;

    // write beside the target, then rename: an interrupted run never leaves a half file. The
    // temporary file lies in a fresh private folder (mkdtemp: a random name, mode 0700, created
    // O_EXCL), so no one can plant a symlink where nifti_clib opens it; it is fsync'ed before the
    // rename and the folder after it.
    std::string dir = ".", base = path;
    size_t slash = path.find_last_of('/');
    if (slash != std::string::npos) {
        dir = slash == 0 ? "/" : path.substr(0, slash);
        base = path.substr(slash + 1);
    }
    struct stat st {};
    if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
        throw InputError(path + ": the output folder " + dir + " does not exist.");
    std::string tmpl = (dir == "/" ? std::string("") : dir) + "/." + base + ".XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (mkdtemp(buf.data()) == nullptr) {
        int err = errno;
        throw InputError(path + ": cannot create a temporary folder beside the mask (" + std::strerror(err) + ").");
    }
    struct TempDir {
        std::string dir, file;
        ~TempDir() {
            if (!file.empty()) unlink(file.c_str());
            rmdir(dir.c_str());
        }
    } td{buf.data(), ""};
    td.file = td.dir + (ends_with(path, ".gz") ? "/mask.nii.gz" : "/mask.nii");
    const std::string& tmp = td.file;

    if (nifti_set_filenames(out, tmp.c_str(), 0, 1) != 0) throw std::runtime_error("cannot set the output file name");
    out->data = const_cast<uint8_t*>(mask.data());
    znzFile fp = nifti_image_write_hdr_img2(out, 3 /* write data, leave open */, "wb", nullptr, nullptr);
    out->data = nullptr;  // not ours to free
    int rc = znz_isnull(fp) ? -1 : znzclose(fp);
    if (rc != 0) {
        int err = errno;
        throw InputError(path + ": cannot write the mask (" + std::string(err ? std::strerror(err) : "write error") + ").");
    }
    int fd = open(tmp.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
        int err = errno;
        if (fd >= 0) close(fd);
        throw InputError(path + ": cannot flush the mask to disk (" + std::strerror(err) + ").");
    }
    close(fd);
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
        int err = errno;
        throw InputError(path + ": cannot move the mask into place (" + std::strerror(err) + ").");
    }
    td.file.clear();  // moved: nothing to remove but the folder
    int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);  // the rename is durable once the folder is (best effort: not every file system allows it)
        close(dfd);
    }
}

}  // namespace spleen
