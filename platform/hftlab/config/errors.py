"""ConfigError and check(): what every schema section raises, with the dotted field and the bad value."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value is wrong; the message starts with `dotted.field=value`."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field, self.value, self.reason = field, value, reason
        super().__init__(f"{field}={value!r}: {reason}")

    def under(self, prefix: str) -> ConfigError:
        """The same error, with its field placed under `prefix`."""
        return ConfigError(f"{prefix}.{self.field}" if self.field else prefix, self.value, self.reason)


def check(ok: bool, field: str, value: Any, reason: str) -> None:
    """Raise a ConfigError for `field` unless `ok`; used by the schemas' `__post_init__`."""
    if not ok:
        raise ConfigError(field, value, reason)
