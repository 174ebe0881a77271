"""Atomic outputs: build beside the destination, then rename into place."""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapter_surgery.errors import InvalidSpec, OutputExists

#: Suffix of the owner record beside a temporary output (``.<name>.tmp-<tag>.owner``).
OWNER_SUFFIX = ".owner"
#: The owner record inside a work directory (surgery's ``.<name>.surgery-<tag>``, an upload's scratch directory).
OWNER_FILE = ".adapter-surgery-owner.json"


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot; tells a reused pid apart), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def owner_record(job: str | None) -> dict[str, Any]:
    """Who writes a temporary path: the job id (None outside the service), host, pid (and its start time)."""
    return {"job": job, "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
            "created_at": datetime.now(UTC).isoformat()}


def write_owner(path: Path, job: str | None) -> None:
    path.write_text(json.dumps(owner_record(job)), encoding="utf-8")


def read_owner(tmp: Path) -> dict[str, Any] | None:
    """The owner record of temporary path ``tmp`` (beside it, or inside a work directory), None if it has none."""
    for p in (tmp.with_name(tmp.name + OWNER_SUFFIX), tmp / OWNER_FILE):
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return doc
    return None


def process_alive(record: dict[str, Any]) -> bool | None:
    """Whether the process of an owner record still runs: None when it ran on another host (unknowable here)."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = record.get("pid_start")
    return started is None or _process_start(pid) in (None, started)


def make_work_dir(path: Path, owner: str | None) -> None:
    """Create work directory ``path`` (parents too) with its owner record inside."""
    path.mkdir(parents=True)
    write_owner(path / OWNER_FILE, owner)


def _exists(path: Path) -> OutputExists:
    return OutputExists(f"output {str(path)!r} already exists", field="output",
                        fix='Choose another output path, or send "overwrite": true to replace it.')


def check_output_path(output: Path, checkpoint: Path, overwrite: bool, field: str = "output") -> None:
    """Refuse an output that exists (unless ``overwrite``), that overlaps the input checkpoint, or whose parent
    is a file.

    Raises:
        OutputExists: ``output`` exists and ``overwrite`` is false.
        InvalidSpec: ``output`` is the checkpoint, lies inside it, or contains it; a parent of it is a file.
    """
    out, src = output.resolve(), checkpoint.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise InvalidSpec(f"output {str(output)!r} overlaps the input checkpoint {str(checkpoint)!r}",
                          field=field, fix="Choose an output path outside the checkpoint; the input is never modified.")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InvalidSpec(f"output {str(output)!r} would be inside {str(blocker)!r}, which is a file", field=field,
                          fix="Choose an output path whose parent directories are directories.")
    if output.exists() and not overwrite:
        raise _exists(output)
    if overwrite and not _replaceable(output):
        raise InvalidSpec(f"output {str(output)!r} is a directory that holds no checkpoint or adapter; overwrite "
                          "replaces a previous output, never a directory of other files", field=field,
                          fix="Name the output directory itself (e.g. models/run-2), or empty that directory first.")


def _replaceable(output: Path) -> bool:
    """Whether ``overwrite`` may replace ``output``: absent, a file, an empty directory, or a directory holding a
    checkpoint or adapter at its top (``config.json``, ``adapter_config.json`` or a ``.safetensors`` file). A
    mistyped output naming a parent folder (``models`` for ``models/run-2``) would otherwise lose every model in
    it."""
    if not output.is_dir() or output.is_symlink():
        return True
    names = [p.name for p in itertools.islice(output.iterdir(), 10_000)]
    return not names or any(n in ("config.json", "adapter_config.json") or n.endswith(".safetensors") for n in names)


@contextmanager
def atomic_output(dest: Path, overwrite: bool = False, owner: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``dest``; on success move it to ``dest`` atomically.

    The temporary path is in the same directory, so the final rename is atomic. Without ``overwrite`` the move
    never replaces anything, even if another request created ``dest`` meanwhile (a directory is renamed onto a
    path that must not hold a non-empty directory; a file is hard-linked, which fails if the name exists): the
    later request gets ``OutputExists``. With ``overwrite`` an existing ``dest`` of the same kind (file or
    directory) is swapped out after the new output is complete, then removed. On any exception the temporary
    path is removed and ``dest`` is left as it was.

    Beside the temporary path, ``<tmp>.owner`` records its ``owner`` (job id), host and pid while it exists, so
    that a start-up sweep (``adapter_surgery.jobs``) removes only the temporaries of processes that are gone.

    Raises:
        OutputExists: ``dest`` exists and ``overwrite`` is false.
        InvalidSpec: with ``overwrite``, ``dest`` is a file and the output a directory, or the reverse.
    """
    if dest.exists() and not overwrite:
        raise _exists(dest)
    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    owner_file = tmp.with_name(tmp.name + OWNER_SUFFIX)
    done = False
    try:
        write_owner(owner_file, owner)
        yield tmp
        _readable(tmp)
        if overwrite and dest.exists():
            if dest.is_dir() != tmp.is_dir():
                kind = "a directory" if dest.is_dir() else "a file"
                raise InvalidSpec(f"output {str(dest)!r} is {kind}; overwrite replaces only an output of the same "
                                  "kind", field="output", fix="Choose another output path.")
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            _move_noreplace(tmp, dest)
        done = True
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
        owner_file.unlink(missing_ok=True)
        if not done:  # leave no directory behind that this call created
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()


def _move_noreplace(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest`` unless ``dest`` exists (a concurrent request got there first)."""
    try:
        if tmp.is_dir():
            if dest.exists() and not dest.is_dir():
                raise _exists(dest)
            os.rename(tmp, dest)  # fails on a non-empty directory: our outputs are never empty
        else:
            try:
                os.link(tmp, dest)  # fails if the name exists
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                if dest.exists():  # a filesystem without hard links: check, then rename
                    raise _exists(dest) from None
                os.rename(tmp, dest)
                return
            tmp.unlink()
    except (FileExistsError, IsADirectoryError, NotADirectoryError):
        raise _exists(dest) from None
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _exists(dest) from None
        raise


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
