"""stemdist: distributed self-supervised denoising of low-dose 4D-STEM cubes.

The package follows the data, one stage per folder, imports pointing down the pipeline:
``io`` (stores, formats, conversion, exports) -> ``data`` (tiles, sharded dataset) -> ``train`` (model,
losses, LightningModule, trainer) -> ``quality`` (metrics, baselines, evaluate, figures) -> ``run`` (the
cycle pipeline, inference, the final estimate, hardware and ranks) -> ``bench``; ``config``, ``layout``,
``console`` and ``errors`` are shared by all; ``cli`` and ``api`` are thin entry points.
"""

from .errors import ConfigError, InputError, StemdistError

__version__ = "0.1.0"
__all__ = ["denoise", "ConfigError", "InputError", "StemdistError", "__version__"]


def __getattr__(name: str):
    if name == "denoise":  # imported on first use: `stemdist --help` does not pay for torch
        from .api import denoise

        return denoise
    raise AttributeError(f"module 'stemdist' has no attribute {name!r}")
