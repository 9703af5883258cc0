"""xrdscale: XRD-CT campaigns of working batteries to chemical maps with uncertainty."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xrdscale")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
