#!/usr/bin/env bash
# The prepared GPU check (issue 11), for a machine with PyTorch + CUDA and no network.
#
#   make gpu-wheels      # beforehand, where pip reaches PyPI: fills gpu_wheels/ (about 10 MB)
#   make gpu-check       # on the GPU machine: this script
#
# It installs MONAI, nibabel and this project from gpu_wheels/ into a private folder (no
# network, no dependency resolution: torch, numpy, scipy, scikit-image, tqdm, psutil and onnx are
# expected there already), then runs `spleen-seg gpu-check` from outside the source tree, so the
# installed wheel is what runs. Records go to book/records/ of this checkout. Extra arguments pass
# through, e.g. `scripts/gpu_check.sh --parts patch` or `--model outputs/runs/quick/best_model.pt`.
# GPU_CHECK_DEVICE=cpu with --smoke --records DIR tries the install and every step on a CPU.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="${GPU_WHEELS:-$REPO/gpu_wheels}"
PY="${PYTHON:-python3}"
SITE="${GPU_SITE:-/tmp/spleen-gpu-site}"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "gpu_check.sh: no wheels in $WHEELS; run 'make gpu-wheels' where pip reaches PyPI first." >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
MODEL=()
if [ -f "$REPO/outputs/runs/quick/best_model.pt" ]; then
  MODEL=(--model "$REPO/outputs/runs/quick/best_model.pt")  # a trained model for the end-to-end part, when carried
fi
cd /tmp
"$PY" -c "import spleen_utils, monai, nibabel; print('spleen_utils', spleen_utils.__file__, 'monai', monai.__version__, 'nibabel', nibabel.__version__)"
exec "$PY" -m spleen_utils.cli gpu-check --device "${GPU_CHECK_DEVICE:-cuda}" --records "$REPO/book/records" --work /tmp/spleen-gpu-work "${MODEL[@]}" "$@"
