"""``python -m spleen_utils.cli``: the ``spleen-seg`` command (what torchrun and the tests run)."""

import sys

from . import main

sys.exit(main())
