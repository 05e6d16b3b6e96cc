"""APIX: a multi-tenant, real-time-first backend for AI-agent products."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("apix")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
