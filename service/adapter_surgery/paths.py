"""Resolving request paths under the data directory, and keeping server directories out of messages."""

from __future__ import annotations

from pathlib import Path

from adapter_surgery.errors import InvalidSpec, PathOutsideDataDir

#: The service's own state under the data directory (job queue, upload scratch): no request path may name it.
STATE_DIR = ".adapter-surgery"
#: Path components a request path may have at most (deeper ones would exhaust ``mkdir(parents=True)``'s recursion).
MAX_PARTS = 64


def resolve_under(data_dir: Path, value: str, field: str) -> Path:
    """``data_dir / value`` resolved (symlinks followed), refused if it leaves ``data_dir``.

    A directory's own entries are checked too: a symlink in it that leads outside is refused as well. An
    ``output`` (``field`` ``output`` or ``*.output``) whose last component is a symlink is refused: overwriting it
    would rewrite what it links to.

    Raises:
        PathOutsideDataDir: ``value`` is absolute, climbs out with ``..``, resolves outside through a symlink, or
            resolves into the service's state directory ``<data_dir>/.adapter-surgery``.
        InvalidSpec: ``value`` holds a NUL character, an over-long name, more than 64 components, or a symlink
            loop; an output is a symlink.
    """
    root = data_dir.resolve()
    if not value or Path(value).is_absolute():
        raise PathOutsideDataDir(f"{field} {value!r} must be a relative path under the data directory",
                                 field=field, fix="Give a path relative to the data directory, e.g. 'models/base'.")
    if "\0" in value or any(len(part.encode()) > 255 for part in Path(value).parts) or len(value) > 4096:
        raise InvalidSpec(f"{field} is not a usable path (a NUL character, a name over 255 bytes, or over 4096 "
                          "characters)", field=field, fix="Use a shorter path of ordinary names.")
    if len(Path(value).parts) > MAX_PARTS:
        raise InvalidSpec(f"{field} has {len(Path(value).parts)} path components, over the {MAX_PARTS} accepted",
                          field=field, fix=f"Use a path of at most {MAX_PARTS} directories.")
    try:
        candidate = (root / value).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loops, names the OS refuses
        raise InvalidSpec(f"{field} {value!r} cannot be resolved ({exc})", field=field,
                          fix="Use a plain path without symlink loops.") from None
    if candidate != root and root not in candidate.parents:
        raise PathOutsideDataDir(f"{field} {value!r} resolves outside the data directory", field=field,
                                 fix="Remove '..' and symlinks that point outside the data directory.")
    if candidate == root:
        raise PathOutsideDataDir(f"{field} {value!r} is the data directory itself", field=field,
                                 fix="Name a file or directory inside the data directory.")
    if candidate.relative_to(root).parts[0] == STATE_DIR:
        raise PathOutsideDataDir(f"{field} {value!r} lies in the service's state directory {STATE_DIR!r}",
                                 field=field, fix=f"Name a path outside {STATE_DIR!r} (the job queue and upload "
                                                  "scratch space live there).")
    try:
        is_link = (root / value).is_symlink()  # the last component itself, unresolved
    except OSError:
        is_link = False
    if is_link and (field == "output" or field.endswith(".output")):
        raise InvalidSpec(f"{field} is a symbolic link ({value!r}); writing it would rewrite what it points to",
                          field=field, fix="Name the output by a path that is not a symbolic link (a new name, or "
                                           "the real directory it points to).")
    if candidate.is_dir():
        for child in candidate.iterdir():  # a checkpoint's files are read and copied: none may lead outside
            if child.is_symlink() and root not in child.resolve().parents:
                raise PathOutsideDataDir(f"{field} {value!r} holds {child.name!r}, a symlink that leads outside "
                                         "the data directory", field=field,
                                         fix="Replace the symlink by the file it points to.")
    return candidate


def without_dirs(text: str, root: Path) -> str:
    """``text`` with the absolute directory ``root`` (and what lies above it) removed from paths it quotes, so
    that results and errors name paths relative to the data directory, never the server's (or an upload's
    temporary work directory)."""
    for form in dict.fromkeys((str(root), str(root.resolve()))):
        if form not in ("", "/", "."):
            text = text.replace(form.rstrip("/") + "/", "").replace(form, ".")
    return text
