"""opstudio: operator-level profiling and optimization of ONNX models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("opstudio")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
