"""stemdist: distributed self-supervised denoising of low-dose 4D-STEM cubes."""

from .api import denoise
from .errors import ConfigError, InputError, StemdistError

__version__ = "0.1.0"
__all__ = ["denoise", "ConfigError", "InputError", "StemdistError", "__version__"]
