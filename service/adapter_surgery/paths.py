"""Resolving request paths under the data directory."""

from __future__ import annotations

from pathlib import Path

from adapter_surgery.errors import PathOutsideDataDir


def resolve_under(data_dir: Path, value: str, field: str) -> Path:
    """``data_dir / value`` resolved (symlinks followed), refused if it leaves ``data_dir``.

    Raises:
        PathOutsideDataDir: ``value`` is absolute, climbs out with ``..``, or resolves outside through a symlink.
    """
    root = data_dir.resolve()
    if not value or Path(value).is_absolute():
        raise PathOutsideDataDir(f"{field} {value!r} must be a relative path under the data directory",
                                 field=field, fix="Give a path relative to the data directory, e.g. 'models/base'.")
    candidate = (root / value).resolve()
    if candidate != root and root not in candidate.parents:
        raise PathOutsideDataDir(f"{field} {value!r} resolves outside the data directory", field=field,
                                 fix="Remove '..' and symlinks that point outside the data directory.")
    if candidate == root:
        raise PathOutsideDataDir(f"{field} {value!r} is the data directory itself", field=field,
                                 fix="Name a file or directory inside the data directory.")
    return candidate
