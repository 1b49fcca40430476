"""Typed configs: schemas, YAML loading, dotted overrides, validation errors."""

from hftlab.config.loader import ConfigError, apply_overrides, build, digest, flatten, load_config, to_dict
from hftlab.config.schema import Config

__all__ = ["Config", "ConfigError", "apply_overrides", "build", "digest", "flatten", "load_config", "to_dict"]
