"""spleen_utils: the library behind the 3D spleen segmentation tutorial (MONAI + PyTorch)."""

__version__ = "0.1.0"

from .config import Config, Recipe, get_config  # noqa: E402
from .errors import DataError, SpleenError  # noqa: E402

__all__ = ["Config", "Recipe", "get_config", "SpleenError", "DataError", "__version__"]
