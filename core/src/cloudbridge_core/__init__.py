"""CloudBridge core: plugin system, configuration, errors and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cloudbridge-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
