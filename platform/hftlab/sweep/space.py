"""Search spaces over dotted config keys: the language of a sweep's `space` and of its `attack.space`.

`key: {grid|choice: [values]}` or `key: {uniform|loguniform: [low, high]}`; a grid or choice value that is a mapping
of dotted keys sets them together (e.g. a `method` axis of align.method + finetune.method pairs).
"""

from __future__ import annotations

import itertools
from typing import Any

from hftlab.config.errors import check

KINDS = ("grid", "choice", "uniform", "loguniform")


def number(value: Any) -> Any:
    """'1e-4' -> 0.0001 (YAML 1.1 reads 1e-4 as a string; the CLI's overrides read it as a number); others unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check_space(space: dict[str, Any], prefix: str = "space") -> None:
    """Raise ConfigError naming `<prefix>.<key>` for a malformed entry; numbers written as strings become numbers."""
    check(isinstance(space, dict), prefix, space, "must be a mapping of dotted config keys")
    for key, dist in space.items():
        ok = isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in KINDS
        check(ok, f"{prefix}.{key}", dist, f"must be a mapping with one of {list(KINDS)}")
        kind, values = next(iter(dist.items()))
        if isinstance(values, list):
            values = dist[kind] = [number(v) for v in values]
        if kind in ("grid", "choice"):
            check(isinstance(values, list) and len(values) > 0, f"{prefix}.{key}", dist, "needs a non-empty list")
        else:
            ok = (isinstance(values, list) and len(values) == 2 and all(isinstance(v, int | float) for v in values)
                  and values[0] < values[1] and (kind == "uniform" or values[0] > 0))
            check(ok, f"{prefix}.{key}", dist, "needs [low, high] with low < high (and low > 0 for loguniform)")


def axes(space: dict[str, Any]) -> dict[str, list]:
    """Each key's values to check: a grid's or choice's values, a range's two ends."""
    return {k: list(v) for k, d in space.items() for _, v in d.items()}


def points(axes_: dict[str, list], limit: int = 512) -> list[dict[str, Any]]:
    """Every combination of the axes' values, or each value alone when there are more than `limit` combinations."""
    combos = 1
    for values in axes_.values():
        combos *= len(values)
    if combos <= limit:
        return [dict(zip(axes_, vals, strict=True)) for vals in itertools.product(*axes_.values())]
    return [{k: v} for k, values in axes_.items() for v in values]


def grid_size(space: dict[str, Any]) -> int:
    """Points of the space's grid axes (1 when it has none)."""
    size = 1
    for dist in space.values():
        if "grid" in dist:
            size *= len(dist["grid"])
    return size
