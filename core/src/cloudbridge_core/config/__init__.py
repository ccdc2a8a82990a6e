"""Configuration: schema, sources (defaults < file < env < flags), validation.

Hot reload (:mod:`cloudbridge_core.config.reload`) is imported by what watches the file.
"""

from cloudbridge_core.config.loader import (
    Config,
    RawConfig,
    load_config,
    read_sources,
    search_path,
    validate,
)
from cloudbridge_core.config.schema import merged_schema

__all__ = [
    "Config",
    "RawConfig",
    "load_config",
    "merged_schema",
    "read_sources",
    "search_path",
    "validate",
]
