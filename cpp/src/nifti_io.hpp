// NIfTI-1/-2 reading and writing with nifti_clib (libnifti2): 3D numeric volumes in, uint8 masks out.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "linalg.hpp"


namespace spleen {

struct NiftiHeaderHandle;  // opaque: the input's header, reused when writing the mask

struct Volume {
    std::array<int64_t, 3> dim{};  // nx, ny, nz
    std::vector<float> data;       // NIfTI order: x fastest, index x + nx * (y + ny * z)
    Mat4 affine;                   // voxel index -> world (mm), nibabel's choice (sform, qform, fallback)
    std::string affine_source;     // "sform", "qform" or "pixdim (no qform/sform code)"
    std::string datatype;          // e.g. "INT16"
    std::array<double, 3> pixdim{};
    std::shared_ptr<NiftiHeaderHandle> header;

    int64_t size() const { return dim[0] * dim[1] * dim[2]; }
};

// Reads a 3D numeric NIfTI (any integer/float type, scl_slope/inter applied) as float32.
// Throws InputError with one sentence for anything unreadable, 2D/4D, non-numeric or non-finite.
Volume read_volume(const std::string& path);

// Writes `mask` (NIfTI order, same dims as `ref`) as uint8 with ref's dims, pixdim, qform and
// sform, to a temporary file beside `path` which is then renamed onto `path`.
void write_mask(const std::string& path, const Volume& ref, const std::vector<uint8_t>& mask);

// "file.nii" or "file.nii.gz"
bool is_nifti_name(const std::string& path);

}  // namespace spleen
