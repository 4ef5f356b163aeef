"""``python -m spleen_utils.bench baseline --model M --input CT --output-dir D``: the MONAI
tutorial's inference on one file, as one process (:func:`spleen_utils.bench.baseline._baseline_main`)."""

import sys

from .baseline import _baseline_main

if __name__ == "__main__":
    sys.exit(_baseline_main())
