#!/usr/bin/env bash
# Build cpp/build/spleen_infer, installing whatever the build needs first (idempotent).
#
#   cpp/build.sh            # or: JOBS=4 cpp/build.sh, ONNXRUNTIME_ROOT=/opt/onnxruntime-linux-x64-1.22.0 cpp/build.sh
#
# Dependencies and where they come from:
#   - compiler, CMake, nifti_clib (libnifti2-dev), nlohmann-json: apt (Debian), installed if missing;
#   - ONNX Runtime: $ONNXRUNTIME_ROOT if set (an official SDK folder: include/ + lib/); otherwise
#     cpp/third_party/onnxruntime is assembled from
#       * the shared library of the `onnxruntime` Python wheel (the project's .venv, $PYTHON or
#         python3; else the wheel is fetched with `pip download` into cpp/third_party/wheels), and
#       * the C/C++ headers of Debian trixie's libonnxruntime-dev, fetched with `apt-get download`
#         through a private apt configuration in cpp/third_party/apt and unpacked with `dpkg -x`
#         (nothing is installed system-wide). The C API is backward compatible: headers of an
#         older release work with a newer library.
# Exit status: 0 built; 77 a prerequisite cannot be obtained on this machine; other: build failure.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
TP="$HERE/third_party"
BUILD="$HERE/build"
JOBS="${JOBS:-2}"
ORT_HEADERS_SUITE="${ORT_HEADERS_SUITE:-trixie}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

say() { echo "build.sh: $*"; }
unavailable() {
    echo "build.sh: prerequisite unavailable: $*" >&2
    exit 77
}

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

# --- 1. system packages ----------------------------------------------------------------------
APT_PKGS=(cmake make g++ pkg-config zlib1g-dev libnifti2-dev nlohmann-json3-dev)
if command -v dpkg-query >/dev/null 2>&1; then
    missing=()
    for p in "${APT_PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing with apt: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt_install() { as_root apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${missing[@]}"; }
        if ! apt_install >/dev/null 2>&1; then
            as_root apt-get -o DPkg::Lock::Timeout=300 update -q >/dev/null 2>&1 || unavailable "apt-get update failed (not root, or no network?)"
            apt_install >/dev/null || unavailable "apt-get install ${missing[*]} failed"
        fi
    fi
else
    say "no dpkg here: assuming cmake, a C++17 compiler, nifti_clib (CMake package NIFTI) and nlohmann_json are installed"
fi
command -v cmake >/dev/null 2>&1 || unavailable "cmake is not installed"

# --- 2. ONNX Runtime ----------------------------------------------------------------------------
find_wheel_lib() {  # prints the libonnxruntime.so.* of an installed onnxruntime wheel
    local py
    for py in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        [ -n "$py" ] || continue
        command -v "$py" >/dev/null 2>&1 || [ -x "$py" ] || continue
        "$py" - <<'EOF' 2>/dev/null && return 0
import glob, importlib.util, os, sys
spec = importlib.util.find_spec("onnxruntime")
if spec is None or not spec.submodule_search_locations:
    sys.exit(1)
libs = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], "capi", "libonnxruntime.so.*")))
if not libs:
    sys.exit(1)
print(libs[-1])
EOF
    done
    return 1
}

download_wheel_lib() {  # pip download the wheel and unpack its library; prints its path
    local py="" cand
    for cand in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        [ -n "$cand" ] || continue
        if "$cand" -m pip --version >/dev/null 2>&1; then py="$cand"; break; fi
    done
    if [ -z "$py" ]; then
        as_root apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends python3-pip >/dev/null 2>&1 ||
            return 1
        py=python3
    fi
    # the version the project pins (pyproject.toml), unless ORT_VERSION says otherwise
    local version="${ORT_VERSION:-$(sed -n 's/.*"onnxruntime==\([0-9.]*\)".*/\1/p' "$ROOT/pyproject.toml" 2>/dev/null | head -n1)}"
    mkdir -p "$TP/wheels"
    say "pip download onnxruntime${version:+==$version}" >&2
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$TP/wheels" "onnxruntime${version:+==$version}" >&2 ||
        return 1
    "$py" - "$TP/wheels" "$TP/wheels/lib" <<'EOF'
import glob, os, sys, zipfile
wheels = sorted(glob.glob(os.path.join(sys.argv[1], "onnxruntime-*.whl")))
if not wheels:
    sys.exit(1)
with zipfile.ZipFile(wheels[-1]) as z:
    names = [n for n in z.namelist() if "/capi/libonnxruntime.so." in n]
    if not names:
        sys.exit(1)
    os.makedirs(sys.argv[2], exist_ok=True)
    target = os.path.join(sys.argv[2], os.path.basename(names[0]))
    with z.open(names[0]) as src, open(target, "wb") as dst:
        dst.write(src.read())
print(target)
EOF
}

fetch_headers() {  # Debian's libonnxruntime-dev headers via a private apt configuration
    local apt="$TP/apt"
    mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/etc/preferences.d" "$apt/deb"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -f "$keyring" ] || unavailable "$keyring is missing (package debian-archive-keyring)"
    echo "deb [arch=amd64 signed-by=$keyring] $DEBIAN_MIRROR $ORT_HEADERS_SUITE main" >"$apt/etc/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$apt/etc/preferences.d"
        -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o Dir::State::status=/dev/null
        -o Acquire::Languages=none -o APT::Architectures=amd64 -o APT::Sandbox::User=root)
    say "fetching the ONNX Runtime headers: libonnxruntime-dev from Debian $ORT_HEADERS_SUITE"
    apt-get "${opts[@]}" update -q >/dev/null 2>&1 || return 1
    (cd "$apt/deb" && rm -f ./*.deb && apt-get "${opts[@]}" download libonnxruntime-dev >/dev/null 2>&1) || return 1
    rm -rf "$apt/x"
    dpkg -x "$apt"/deb/libonnxruntime-dev_*.deb "$apt/x" || return 1
    [ -f "$apt/x/usr/include/onnxruntime/onnxruntime_cxx_api.h" ] || return 1
    rm -rf "$1" && mkdir -p "$1" && cp -r "$apt/x/usr/include/onnxruntime/." "$1/"
    rm -rf "$apt/lists" "$apt/cache" "$apt/x"  # the package index (~10 MB) is not needed any more
}

if [ -n "${ONNXRUNTIME_ROOT:-}" ]; then
    ORT="$ONNXRUNTIME_ROOT"
    [ -f "$ORT/include/onnxruntime_cxx_api.h" ] || [ -f "$ORT/include/onnxruntime/onnxruntime_cxx_api.h" ] ||
        unavailable "ONNXRUNTIME_ROOT=$ORT has no include/onnxruntime_cxx_api.h"
else
    ORT="$TP/onnxruntime"
    if [ ! -f "$ORT/.complete" ]; then
        rm -rf "$ORT"
        mkdir -p "$ORT/lib"
        lib="$(find_wheel_lib || true)"
        if [ -z "$lib" ]; then
            say "no onnxruntime wheel installed: downloading it with pip"
            lib="$(download_wheel_lib)" || unavailable "cannot find or download the onnxruntime wheel"
        fi
        name="$(basename "$lib")"          # libonnxruntime.so.1.32.0
        version="${name#libonnxruntime.so.}"  # 1.32.0
        cp "$lib" "$ORT/lib/$name"
        if [ "${lib#"$TP/wheels/"}" != "$lib" ]; then  # unpacked from a downloaded wheel: keep one copy
            lib="$(basename "$(ls "$TP"/wheels/onnxruntime-*.whl | tail -n1)")"
            rm -rf "$TP/wheels"
        fi
        ln -sf "$name" "$ORT/lib/libonnxruntime.so.${version%%.*}"  # the SONAME
        ln -sf "$name" "$ORT/lib/libonnxruntime.so"
        fetch_headers "$ORT/include" || unavailable "cannot download libonnxruntime-dev from $DEBIAN_MIRROR ($ORT_HEADERS_SUITE)"
        api="$(sed -n 's/^#define ORT_API_VERSION \([0-9]*\).*/\1/p' "$ORT/include/onnxruntime_c_api.h")"
        minor="$(echo "$version" | cut -d. -f2)"
        if [ -n "$api" ] && [ "$api" -gt "$minor" ]; then
            unavailable "headers declare ORT API $api but the library $version provides only up to $minor"
        fi
        printf 'library %s (from %s)\nheaders ORT_API_VERSION %s (Debian %s libonnxruntime-dev)\n' \
            "$version" "$lib" "$api" "$ORT_HEADERS_SUITE" >"$ORT/SOURCE"
        touch "$ORT/.complete"
    fi
fi
say "ONNX Runtime: $(tr '\n' ';' <"$ORT/SOURCE" 2>/dev/null || echo "$ORT")"

# --- 3. configure and build ---------------------------------------------------------------------
# SANITIZE=1 builds a second copy with AddressSanitizer and UBSan into cpp/build/sanitize (the
# tests run the hostile-input corpus through it); exit 77 when the compiler lacks them.
BUILD_TYPE=Release
CMAKE_EXTRA=()
if [ "${SANITIZE:-0}" = 1 ]; then
    BUILD="$HERE/build/sanitize"
    BUILD_TYPE=RelWithDebInfo
    SAN_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
    probe="$(mktemp -d)"
    echo 'int main(int c, char**) { int* p = new int[2]; p[0] = c; int r = p[0] - 1; delete[] p; return r; }' >"$probe/p.cpp"
    if ! "${CXX:-c++}" $SAN_FLAGS "$probe/p.cpp" -o "$probe/p" >/dev/null 2>&1 || ! "$probe/p"; then
        rm -rf "$probe"
        unavailable "the C++ compiler cannot build or run with -fsanitize=address,undefined (libasan/libubsan missing?)"
    fi
    rm -rf "$probe"
    CMAKE_EXTRA=("-DCMAKE_CXX_FLAGS=$SAN_FLAGS" "-DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address,undefined")
fi
cmake -S "$HERE" -B "$BUILD" -DCMAKE_BUILD_TYPE="$BUILD_TYPE" -DONNXRUNTIME_ROOT="$ORT" "${CMAKE_EXTRA[@]}" >/dev/null
cmake --build "$BUILD" -j "$JOBS"
say "built $BUILD/spleen_infer"
