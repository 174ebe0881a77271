"""Atomic outputs: build beside the destination, then rename into place."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapter_surgery.errors import InvalidSpec, OutputExists


def check_output_path(output: Path, checkpoint: Path, overwrite: bool, field: str = "output") -> None:
    """Refuse an output that exists (unless ``overwrite``) or that overlaps the input checkpoint.

    Raises:
        OutputExists: ``output`` exists and ``overwrite`` is false.
        InvalidSpec: ``output`` is the checkpoint, lies inside it, or contains it.
    """
    out, src = output.resolve(), checkpoint.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise InvalidSpec(f"output {output.name!r} overlaps the input checkpoint {checkpoint.name!r}",
                          field=field, fix="Choose an output path outside the checkpoint; the input is never modified.")
    if output.exists() and not overwrite:
        raise OutputExists(f"output {output.name!r} already exists", field=field,
                           fix='Choose another output path, or send "overwrite": true to replace it.')


@contextmanager
def atomic_output(dest: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``dest``; on success rename it to ``dest``.

    The temporary path is in the same directory, so the final ``os.replace`` is atomic. On any exception
    the temporary path is removed and ``dest`` is left as it was. With ``overwrite`` an existing ``dest``
    is swapped out after the new output is complete, then removed.

    Raises:
        OutputExists: ``dest`` exists and ``overwrite`` is false.
    """
    if dest.exists() and not overwrite:
        raise OutputExists(f"output {dest.name!r} already exists", field="output",
                           fix='Choose another output path, or send "overwrite": true to replace it.')
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    done = False
    try:
        yield tmp
        _readable(tmp)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
        done = True
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        if not done:  # leave no directory behind that this call created
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()


def _readable(root: Path) -> None:
    """Give new files the process umask's usual mode: some writers (safetensors' ``save_file``) make them 0600,
    which a trainer running as another user of the same group cannot read. Hard-linked files (shared with an
    input) are left alone: their mode is the input's, which is never modified."""
    umask = _umask()
    paths = [root] if root.is_file() else [root, *root.rglob("*")]
    for p in paths:
        st = p.lstat()
        if p.is_symlink() or (p.is_file() and st.st_nlink > 1):
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would, for a moment, for every thread)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
