"""Caches the user names (``--fisher FILE``): reused when they match, never overwritten silently.

A cache file holds minutes of computation and is the user's file: a cache made for other settings is
refused with a message that says which settings differ, and is replaced only when the user asks for
it (``--overwrite-cache``). Each cache records what it was made for as a JSON "key" in its
safetensors metadata; anything that is not such a file is refused as well, so a mistyped path never
destroys an unrelated file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqz_export.errors import UserError

OVERWRITE_OPTION = "--overwrite-cache"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def key_differences(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``name: stored -> wanted`` for every leaf setting that differs, in name order."""
    old, new = _flatten(stored), _flatten(wanted)
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(old.keys() | new.keys()) if old.get(name) != new.get(name)]


def reusable_cache(path: Path | None, key: dict[str, Any], field: str, what: str, *, overwrite: bool) -> bool:
    """Whether ``path`` holds a cache made for ``key`` (so it can be read instead of recomputed).

    Args:
        path: the cache file, or None when there is no cache.
        key: the settings the cache must have been made for (JSON-serializable).
        field: the safetensors metadata field that holds the key.
        what: how the user names the cache in messages ("--fisher").
        overwrite: the user allows replacing a cache made for other settings, or another file.

    Returns:
        True to read the cache; False when there is none (it will be written) or it may be replaced.

    Raises:
        UserError: ``path`` exists but is not a cache of this kind, or was made for other settings,
            and ``overwrite`` is not set; the message names the differing settings.
    """
    from safetensors import SafetensorError, safe_open

    if path is None or not path.exists():
        return False
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; expected a .safetensors cache file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            stored_text = (handle.metadata() or {}).get(field)
    except (SafetensorError, OSError) as exc:
        if overwrite:
            return False
        raise UserError(f"{what} {path} is not a safetensors cache ({exc}); pass another file, or {OVERWRITE_OPTION} to replace it") from exc
    try:
        stored = json.loads(stored_text) if stored_text else None
    except json.JSONDecodeError:
        stored = None
    if stored == key:
        return True
    if overwrite:
        return False
    if not isinstance(stored, dict):
        raise UserError(f"{what} {path} is a safetensors file but not this kind of cache (no {field!r} metadata); pass another file, or {OVERWRITE_OPTION} to replace it")
    raise UserError(
        f"{what} {path} was made for other settings ({'; '.join(key_differences(stored, key))}); "
        f"pass another file to keep it, or {OVERWRITE_OPTION} to recompute and replace it"
    )
