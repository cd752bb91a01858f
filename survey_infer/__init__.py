"""survey-infer: batch inference of physical properties from survey images and spectra."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("survey-infer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
